"""Coordinator load and restart: 200 concurrent simulated devices over loopback HTTPS.

A coordinator process (uvicorn + TLS, SQLite state, a synthetic 2 MiB float32 adapter, goal =
200 so the round closes when all are in) and, in this process, 200 asyncio devices that each
register, check in, upload a 2 MiB update in 1 MiB chunks and commit, all signed. Reported:
p50/p99 latency per request kind and per device (check-in to commit), throughput, errors, and
the time the commit of the 200-update round takes. Then the restart: 50 devices upload into the
next round, the coordinator is SIGKILLed and restarted on the same state; reported is the time
from restart to serving, and whether every recorded update survived (and none is taken twice).

Client and server share the machine's cores, so the figures are a floor for the server alone.
Run alone: `.venv/bin/python bench/bench_server.py`; `run()` returns the rows for bench/run.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEVICES = 200
RESTART_DEVICES = 50
SHAPE = (512, 1024)  # float32: 2 MiB per update
CHUNK = 2**20


def _config(goal: int) -> dict[str, Any]:
    return {"sim": {"rounds": 100, "seed": 0},
            "deploy": {"goal": goal, "overselect": 1.0, "quorum": 1, "deadline_s": 600.0, "retry_s": 1.0,
                       "max_upload_mb": 4.0, "min_free_memory_mb": 0}}


def serve(db: str, port: int, certs: str) -> None:
    """The coordinator process (child)."""
    import torch
    import uvicorn

    from pocketfed.config import load_config
    from pocketfed.server.coordinator import open_coordinator
    from pocketfed.server.http.app import create_app

    t0 = time.perf_counter()
    cfg = load_config(None, _config(DEVICES))
    coord = open_coordinator(Path(db), cfg, "synthetic-2mib",
                             lambda: {"layer.lora_A.weight": torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))})
    print(json.dumps({"ready_s": time.perf_counter() - t0}), flush=True)
    uvicorn.run(create_app(coord), host="127.0.0.1", port=port, log_level="error", backlog=1024,
                ssl_certfile=f"{certs}/server.pem", ssl_keyfile=f"{certs}/server.key")


def _start(db: Path, port: int, certs: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--serve", str(db), str(port), str(certs)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_ready(url: str, ctx: ssl.SSLContext, timeout: float = 120.0) -> float:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            if httpx.get(f"{url}/v1/status", verify=ctx, timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the coordinator did not come up")


async def _device(i: int, client: Any, payload: bytes, lat: dict[str, list[float]], errors: list[str], token: str) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from pocketfed.protocol import auth

    key = Ed25519PrivateKey.generate()

    async def call(kind: str, method: str, path: str, body: bytes, ctype: str = "application/json") -> Any:
        t = time.perf_counter()
        headers = {"content-type": ctype, **auth.sign_headers(key, method, path, body)}
        r = await client.request(method, path, content=body, headers=headers)
        lat[kind].append(time.perf_counter() - t)
        if r.status_code >= 400:
            raise RuntimeError(f"{kind}: {r.status_code} {r.text[:120]}")
        return r.json()

    try:
        pub = auth.public_hex(key)
        await call("register", "POST", "/v1/register", json.dumps({"name": f"d{i:04d}", "public_key": pub, "enrollment_token": token}).encode())
        t0 = time.perf_counter()
        elig = {"charging": True, "idle": True, "unmetered": True, "free_memory_mb": 4096}
        task = (await call("checkin", "POST", "/v1/checkin", json.dumps({"eligibility": elig}).encode()))["task"]
        if task is None:
            raise RuntimeError("no task")
        rid = task["round_id"]
        for off in range(0, len(payload), CHUNK):
            await call("chunk", "PUT", f"/v1/rounds/{rid}/upload?offset={off}", payload[off : off + CHUNK],
                       "application/octet-stream")
        commit = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest(), "num_tokens": 100 + i,
                  "metrics": {"train_loss": 1.0}}
        await call("commit", "POST", f"/v1/rounds/{rid}/commit", json.dumps(commit).encode())
        lat["device"].append(time.perf_counter() - t0)
    except Exception as e:  # counted, reported
        errors.append(f"device {i}: {e}")


async def _load(url: str, ctx: ssl.SSLContext, first: int, n: int, payloads: list[bytes], db: Path) -> tuple[dict, list[str], float]:
    import httpx

    from pocketfed.server.coordinator import enroll
    from pocketfed.server.store import Store

    tokens = enroll(Store(db), n)  # as an operator would (`pocketfed enroll`), beside the running server

    lat: dict[str, list[float]] = {k: [] for k in ("register", "checkin", "chunk", "commit", "device")}
    errors: list[str] = []
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, verify=ctx, timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(_device(first + i, client, payloads[i % len(payloads)], lat, errors, tokens[i]) for i in range(n)))
        wall = time.perf_counter() - t0
    return lat, errors, wall


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def _payloads(k: int) -> list[bytes]:
    import torch

    from pocketfed import codec
    from pocketfed.config import Codec

    g = torch.Generator().manual_seed(1)
    return [codec.encode({"layer.lora_A.weight": 1e-3 * torch.randn(SHAPE, generator=g)}, Codec.float32) for _ in range(k)]


def run() -> list[dict[str, Any]]:
    from pocketfed.server.http.certs import make_dev_certs

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pocketfed-bench-server-") as tmp:
        root = Path(tmp)
        certs, db = make_dev_certs(root / "certs"), root / "state"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"https://127.0.0.1:{port}"
        ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        payloads = _payloads(8)
        server = _start(db, port, certs)
        try:
            _wait_ready(url, ctx)
            # ---- 200 devices, one round ----------------------------------------------------------
            lat, errors, wall = asyncio.run(_load(url, ctx, 0, DEVICES, payloads, db))
            con = sqlite3.connect(db / "state.sqlite")
            metrics = json.loads(con.execute("SELECT metrics FROM rounds WHERE round_id = 1").fetchone()[0] or "{}")
            con.close()
            mb = DEVICES * len(payloads[0]) / 1e6
            rows.append({
                "name": f"coordinator: {DEVICES} concurrent devices, 2 MiB update each (HTTPS, loopback)",
                "devices": DEVICES, "errors": len(errors),
                "device_p50_s": round(_pct(lat["device"], 0.5), 3), "device_p99_s": round(_pct(lat["device"], 0.99), 3),
                **{f"{k}_p50_ms": round(1e3 * _pct(lat[k], 0.5), 1) for k in ("checkin", "chunk", "commit")},
                **{f"{k}_p99_ms": round(1e3 * _pct(lat[k], 0.99), 1) for k in ("checkin", "chunk", "commit")},
                "wall_s": round(wall, 2), "devices_per_s": round(DEVICES / wall, 1), "upload_MB_per_s": round(mb / wall, 1),
                "round_commit_s": round(metrics.get("commit_seconds", float("nan")), 2),
                "notes": "load client shares the CPU with the server; commit = aggregation of 200 updates"
                         + (f"; first error: {errors[0]}" if errors else ""),
            })
            # ---- restart: SIGKILL mid-round, restart, resume ------------------------------------------
            lat2, errors2, _ = asyncio.run(_load(url, ctx, DEVICES, RESTART_DEVICES, payloads, db))
            con = sqlite3.connect(db / "state.sqlite")
            before = con.execute("SELECT round_id, device_id, blob_sha FROM updates ORDER BY 1, 2").fetchall()
            con.close()
            server.send_signal(signal.SIGKILL)
            server.wait()
            server = _start(db, port, certs)
            ready = _wait_ready(url, ctx)
            con = sqlite3.connect(db / "state.sqlite")
            after = con.execute("SELECT round_id, device_id, blob_sha FROM updates ORDER BY 1, 2").fetchall()
            open_round = con.execute("SELECT round_id, status FROM rounds WHERE status = 'open'").fetchall()
            versions = con.execute("SELECT COUNT(*) FROM versions").fetchone()[0]
            con.close()
            rows.append({
                "name": f"coordinator restart after SIGKILL mid-round ({RESTART_DEVICES} updates in)",
                "restart_to_serving_s": round(ready, 2), "errors": len(errors2),
                "updates_kept": f"{len(after)}/{len(before)}", "versions": versions,
                "resumed_round_open": bool(open_round),
                "notes": "restart = new process: Python + torch import, SQLite open, state check, TLS listen"
                         + ("" if after == before else "; UPDATES DIFFER")
                         + (f"; first error: {errors2[0]}" if errors2 else ""),
            })
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGKILL)
                server.wait()
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        for row in run():
            print(json.dumps(row))
