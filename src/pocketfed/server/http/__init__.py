"""The coordinator's HTTP side: the FastAPI app and development certificates."""
