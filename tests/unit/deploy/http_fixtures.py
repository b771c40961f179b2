"""A coordinator on a small synthetic adapter (no model), its app, and signed device clients."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from pocketfed import codec
from pocketfed.config import Codec, load_config
from pocketfed.server import coordinator as co
from pocketfed.server.http.app import create_app
from pocketfed.device.http_client import DeviceClient, ServerRefused
from pocketfed.protocol.wire import Eligibility

SHAPES = {"base_model.model.l0.lora_A.weight": (2, 8), "base_model.model.l0.lora_B.weight": (8, 2)}
OK = Eligibility(charging=True, idle=True, unmetered=True, free_memory_mb=4096)


def init_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) if "lora_A" in k else torch.zeros(s) for k, s in SHAPES.items()}


def make_coordinator(folder: Path, **deploy) -> co.Coordinator:
    cfg = load_config(None, {"sim": {"rounds": 3, "seed": 0},
                             "deploy": {"goal": 2, "quorum": 1, "overselect": 1.5, "deadline_s": 60.0,
                                        "retry_s": 1.0, **deploy}})
    return co.open_coordinator(folder, cfg, "synthetic", init_params)


class Clock:
    """Real time plus an offset a test can move (signatures use the real time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def device(app, name: str) -> DeviceClient:
    """A registered device, enrolled as a real one is: a one-time token from the coordinator."""
    c = DeviceClient(TestClient(app), Ed25519PrivateKey.generate())
    c.register(name, co.enroll(app.state.coordinator.store)[0])
    return c


def update(scale: float = 0.01, codec_=Codec.float32, **override) -> bytes:
    u = {k: torch.full(s, scale) for k, s in SHAPES.items()}
    u.update(override)
    return codec.encode(u, codec_)


def snapshot(folder: Path) -> dict[str, list]:
    """Every table's rows but the nonces and last-seen times (which legitimately change)."""
    db = sqlite3.connect(folder / "state.sqlite")
    try:
        out = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
               for t in ("versions", "rounds", "assignments", "updates")}
        out["devices"] = db.execute("SELECT device_id, public_key FROM devices ORDER BY 1").fetchall()
        return out
    finally:
        db.close()


def app_for(c: co.Coordinator, clock: Clock | None = None):
    return create_app(c, clock=clock or Clock())


def operator_token(folder: Path) -> str:
    """The operator token the app made in the coordinator's state folder (for GET /v1/status)."""
    from pocketfed.server import operator

    return operator.load_or_create(folder)


def refused(fn, status: int, code: str) -> ServerRefused:
    """fn() is refused with this HTTP status and error code, and a sentence that says why."""
    with pytest.raises(ServerRefused) as e:
        fn()
    assert (e.value.status, e.value.code) == (status, code), e.value
    assert e.value.detail and e.value.detail != "None"
    return e.value
