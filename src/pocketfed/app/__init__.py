"""The device app: a local page (`pocketfed app --home H`) to type with on-device suggestions,
see the privacy lock, the model's provenance and what left this device.

Layer 1 (a command and its page): imports the on-device runtime (`pocketfed.runtime`) and the
foundations (`pocketfed.egress`), never `pocketfed.server`, `pocketfed.device` or torch, so it
starts as lightly as `pocketfed suggest`.

- `server.create_app(home)` builds the FastAPI app: the page's assets (package data, no CDN) and
  a small JSON API (`/api/suggest`, `/api/lock`, `/api/ledger`), served with a
  Content-Security-Policy of 'self' only, and only to a Host header naming this machine;
- `ledger_rows.read(home)` reads the ledger a person sees ("What left this device");
- `cli.app_cmd` is `pocketfed app`: loads the model once, verifies the lock, serves on 127.0.0.1.
"""
