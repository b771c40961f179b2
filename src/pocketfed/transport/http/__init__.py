"""HTTP deployment: the coordinator's ASGI app (FastAPI), the device client, request signing,
wire models and dev certificates. Wire version: see `wire.WIRE_VERSION`."""
