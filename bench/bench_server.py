"""Coordinator load and restart over loopback HTTPS, the load client in its own process. Goals:
check-in p50 <= 100 ms and >= 100 check-ins/s with 1,000 devices; the commit of 200 updates within
2 s. Before issue 12 (the load client then shared the bench's process): check-in p50 4.9 s,
15.9 devices/s at 200 devices, commit 2.0 s.

Three processes: this one (orchestrates, reads the SQLite state), the coordinator (uvicorn + TLS,
SQLite state, a synthetic 2 MiB float32 adapter, goal = 200 so a round closes when all are in) and
a load client (asyncio devices on httpx, every request Ed25519-signed). Phases:

    round    200 devices register, check in, upload a 2 MiB update in 1 MiB chunks and commit:
             p50/p99 per request kind and per device, throughput, and the round's commit time
             (decode + aggregate + apply + write blobs for the 200 updates)
    checkin  1,000 devices register up front, then (a) poll: each checks in every POLL_S seconds
             for CHECKIN_S seconds, starting at a random offset, so 1,000 / POLL_S check-ins per
             second are offered; p50/p99 and the check-ins/s served; (b) burst: all 1,000 check
             in at once, the throughput ceiling (its p50 is mostly queueing)
    restart  50 of the devices given a task in the checkin phase upload into that round, the
             coordinator is SIGKILLed and restarted on the same state: time to serving, and
             whether every recorded update survived (and none is taken twice)

The client and the coordinator share the machine's cores, so the figures are a floor for the
coordinator alone. Run alone: `.venv/bin/python bench/bench_server.py`; `run()` returns the rows
for bench/run.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
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

DEVICES = 200  # the round phase, = the round's goal
CHECKIN_DEVICES = 1000
POLL_S = 5.0  # each device's check-in interval in the poll phase: 200 check-ins/s offered
CHECKIN_S = 20.0  # how long the poll phase runs
RESTART_DEVICES = 50
SHAPE = (512, 1024)  # float32: 2 MiB per update
CHUNK = 2**20
ELIGIBLE = {"charging": True, "idle": True, "unmetered": True, "free_memory_mb": 4096}


def _config(goal: int) -> dict[str, Any]:
    return {"sim": {"rounds": 100, "seed": 0},
            "deploy": {"goal": goal, "overselect": 1.0, "quorum": 1, "deadline_s": 600.0, "retry_s": POLL_S,
                       "max_upload_mb": 4.0, "min_free_memory_mb": 0}}


# ---- the coordinator process ------------------------------------------------------------------------
def serve(db: str, port: int, certs: str) -> None:
    import torch
    import uvicorn

    from pocketfed.config import load_config
    from pocketfed.server.coordinator import open_coordinator
    from pocketfed.server.http.app import create_app

    cfg = load_config(None, _config(DEVICES))
    coord = open_coordinator(Path(db), cfg, "synthetic-2mib",
                             lambda: {"layer.lora_A.weight": torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))})
    # devices keep their TLS connection between polls (keep-alive longer than POLL_S)
    uvicorn.run(create_app(coord), host="127.0.0.1", port=port, log_level="error", access_log=False, backlog=2048,
                timeout_keep_alive=int(3 * POLL_S), ssl_certfile=f"{certs}/server.pem", ssl_keyfile=f"{certs}/server.key")


def _start(db: Path, port: int, certs: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--serve", str(db), str(port), str(certs)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_ready(url: str, ctx: ssl.SSLContext, db: Path, timeout: float = 120.0) -> float:
    """Seconds until GET /v1/status answers 200 with the operator token (the server writes it to
    <db>/operator.token on its first start)."""
    import httpx

    from pocketfed.server import operator

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            token_file = operator.token_path(db)
            if token_file.is_file():
                auth = {"authorization": f"Bearer {operator.read(token_file)}"}
                if httpx.get(f"{url}/v1/status", verify=ctx, timeout=2, headers=auth).status_code == 200:
                    return time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the coordinator did not come up")


# ---- the load client process ------------------------------------------------------------------------
class Connection:
    """One device's keep-alive HTTP/1.1 connection over TLS, as a phone holds one. Deliberately
    minimal: a pooled client (httpx) over 1,000 connections spent more CPU picking a connection
    (its pool scans every connection per request) than the coordinator spent answering, and the
    client shares the machine's cores with the coordinator."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext):
        self.host, self.port, self.ctx = host, port, ctx
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        """(status, body). A kept-alive connection the server closed is reopened once, for a request
        it never read (`headers` are signed afresh by the caller's retry, not here)."""
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port, ssl=self.ctx, limit=2**20)
        reader, writer = self.streams
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-length: {len(body)}\r\n{head}\r\n".encode() + body)
        try:
            await writer.drain()
            status = await reader.readline()
            if not status:
                raise ConnectionResetError("the server closed the connection")
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                elif name.lower() == "connection":
                    close = value.strip().lower() == "close"
            data = await reader.readexactly(length)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.close()
            raise
        if close:
            self.close()
        return int(status.split()[1]), data

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


class Device:
    """One simulated device: a fixed key (so every phase's process can speak for it) and its connection."""

    def __init__(self, i: int, conn: Connection, lat: dict[str, list[float]]):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.i, self.conn, self.lat = i, conn, lat
        self.key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"pocketfed-bench-{i}".encode()).digest())

    async def call(self, kind: str, method: str, path: str, body: bytes, ctype: str = "application/json") -> Any:
        from pocketfed.protocol import auth

        t = time.perf_counter()
        for retry in (False, True):
            headers = {"content-type": ctype, **auth.sign_headers(self.key, method, path, body)}
            try:
                status, data = await self.conn.request(method, path, headers, body)
                break
            except ConnectionResetError:  # an idle connection the server let go: reconnect once
                if retry:
                    raise
        self.lat[kind].append(time.perf_counter() - t)
        if status >= 400:
            raise RuntimeError(f"{kind}: {status} {data[:120]!r}")
        return json.loads(data)

    async def register(self, token: str) -> None:
        from pocketfed.protocol import auth

        body = {"name": f"d{self.i:04d}", "public_key": auth.public_hex(self.key)}
        if token:  # a device registered before re-registers without one (same name and key)
            body["enrollment_token"] = token
        await self.call("register", "POST", "/v1/register", json.dumps(body).encode())

    async def checkin(self) -> dict[str, Any] | None:
        return (await self.call("checkin", "POST", "/v1/checkin", json.dumps({"eligibility": ELIGIBLE}).encode()))["task"]

    async def train_and_upload(self, payload: bytes) -> None:
        t0 = time.perf_counter()
        task = await self.checkin()
        if task is None:
            raise RuntimeError("no task")
        rid = task["round_id"]
        for off in range(0, len(payload), CHUNK):
            await self.call("chunk", "PUT", f"/v1/rounds/{rid}/upload?offset={off}", payload[off : off + CHUNK],
                            "application/octet-stream")
        commit = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest(), "num_tokens": 100 + self.i,
                  "metrics": {"train_loss": 1.0}}
        await self.call("commit", "POST", f"/v1/rounds/{rid}/commit", json.dumps(commit).encode())
        self.lat["device"].append(time.perf_counter() - t0)


async def _guarded(errors: list[str], i: int, work: Any) -> None:
    try:
        await work
    except Exception as e:  # counted, reported
        errors.append(f"device {i}: {e}")


async def _poll(d: Device, until: float, served: list[float], tasks: list[bool]) -> None:
    """Check in every POLL_S seconds from a random offset until `until` (perf_counter)."""
    t = time.perf_counter() + random.Random(d.i).uniform(0, POLL_S)
    while t < until:
        await asyncio.sleep(max(0.0, t - time.perf_counter()))
        tasks.append(await d.checkin() is not None)
        served.append(time.perf_counter())
        t += POLL_S


async def load(spec: dict[str, Any]) -> dict[str, Any]:
    """One phase, as the load client runs it; returns the raw latencies (seconds) and counts."""
    ctx = ssl.create_default_context(cafile=spec["cafile"])
    ids, tokens = spec["devices"], spec["tokens"]
    lat: dict[str, list[float]] = {k: [] for k in ("register", "checkin", "chunk", "commit", "device")}
    errors: list[str] = []
    out: dict[str, Any] = {"lat": lat, "errors": errors}
    devices = [Device(i, Connection("127.0.0.1", spec["port"], ctx), lat) for i in ids]
    try:
        if spec["phase"] in ("round", "restart"):
            payloads = _payloads(8)

            async def flow(k: int, d: Device) -> None:
                await d.register(tokens[k])
                await d.train_and_upload(payloads[k % len(payloads)])

            t0 = time.perf_counter()
            await asyncio.gather(*(_guarded(errors, d.i, flow(k, d)) for k, d in enumerate(devices)))
            out["wall_s"] = time.perf_counter() - t0
        else:  # checkin: register up front, then the poll and the burst
            t0 = time.perf_counter()
            await asyncio.gather(*(_guarded(errors, d.i, d.register(tokens[k])) for k, d in enumerate(devices)))
            out["register_wall_s"] = time.perf_counter() - t0
            served: list[float] = []
            tasks: list[bool] = []
            start = time.perf_counter()
            await asyncio.gather(*(_guarded(errors, d.i, _poll(d, start + CHECKIN_S, served, tasks)) for d in devices))
            out["poll"] = {"lat": lat.pop("checkin"), "served_s": [t - start for t in served], "tasks": sum(tasks)}
            lat["checkin"] = []
            t0 = time.perf_counter()
            await asyncio.gather(*(_guarded(errors, d.i, d.checkin()) for d in devices))
            out["burst"] = {"lat": lat.pop("checkin"), "wall_s": time.perf_counter() - t0}
    finally:
        for d in devices:
            d.conn.close()
    return out


def _load(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one phase in a load-client process of its own (the spec goes in on stdin, JSON out)."""
    p = subprocess.run([sys.executable, __file__, "--load"], input=json.dumps(spec), capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"load client failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- figures ------------------------------------------------------------------------------------------
def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def _ms(xs: list[float], q: float) -> float:
    return round(1e3 * _pct(xs, q), 1)


def _payloads(k: int) -> list[bytes]:
    import torch

    from pocketfed import codec
    from pocketfed.config import Codec

    g = torch.Generator().manual_seed(1)
    return [codec.encode({"layer.lora_A.weight": 1e-3 * torch.randn(SHAPE, generator=g)}, Codec.float32) for _ in range(k)]


def _query(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db / "state.sqlite", timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def _wait_closed(db: Path, round_id: int, timeout: float = 120.0) -> dict[str, Any]:
    """The round's metrics once it is closed (the commit may finish after the last device's request)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        rows = _query(db, "SELECT status, metrics FROM rounds WHERE round_id = ?", (round_id,))
        if rows and rows[0][0] != "open":
            return json.loads(rows[0][1] or "{}")
        time.sleep(0.05)
    raise RuntimeError(f"round {round_id} did not close")


def _tokens(db: Path, n: int) -> list[str]:
    from pocketfed.server.coordinator import enroll
    from pocketfed.server.store import Store

    store = Store(db)  # as an operator would (`pocketfed enroll`), beside the running coordinator
    try:
        return enroll(store, n)
    finally:
        store.close()


def _first_error(errors: list[str]) -> str:
    return f"; first error: {errors[0]}" if errors else ""


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
        base = {"port": port, "cafile": str(certs / "ca.pem")}
        server = _start(db, port, certs)
        try:
            _wait_ready(url, ctx, db)
            # ---- round: 200 devices, one round -------------------------------------------------------
            ids = list(range(DEVICES))
            res = _load({**base, "phase": "round", "devices": ids, "tokens": _tokens(db, len(ids))})
            lat, errors, wall = res["lat"], res["errors"], res["wall_s"]
            metrics = _wait_closed(db, 1)
            mb = DEVICES * SHAPE[0] * SHAPE[1] * 4 / 1e6
            rows.append({
                "name": f"coordinator: {DEVICES} concurrent devices, 2 MiB update each (HTTPS, loopback)",
                "devices": DEVICES, "errors": len(errors),
                "device_p50_s": round(_pct(lat["device"], 0.5), 3), "device_p99_s": round(_pct(lat["device"], 0.99), 3),
                **{f"{k}_p50_ms": _ms(lat[k], 0.5) for k in ("checkin", "chunk", "commit")},
                **{f"{k}_p99_ms": _ms(lat[k], 0.99) for k in ("checkin", "chunk", "commit")},
                "wall_s": round(wall, 2), "devices_per_s": round(DEVICES / wall, 1), "upload_MB_per_s": round(mb / wall, 1),
                "round_commit_s": round(metrics.get("commit_seconds", float("nan")), 2),
                "notes": "load client in its own process, same cores; commit = aggregation of 200 updates" + _first_error(errors),
            })
            # ---- checkin: 1,000 registered devices polling, then all at once --------------------------
            ids = list(range(DEVICES, DEVICES + CHECKIN_DEVICES))
            res = _load({**base, "phase": "checkin", "devices": ids, "tokens": _tokens(db, len(ids))})
            poll, burst, errors = res["poll"], res["burst"], res["errors"]
            # the rate served once every device is polling (past the first POLL_S of ramp-up)
            steady = [t for t in poll["served_s"] if POLL_S <= t < CHECKIN_S]
            rows.append({
                "name": f"coordinator: {CHECKIN_DEVICES} devices polling every {POLL_S:g} s for {CHECKIN_S:g} s (HTTPS, loopback)",
                "devices": CHECKIN_DEVICES, "errors": len(errors),
                "checkin_p50_ms": _ms(poll["lat"], 0.5), "checkin_p99_ms": _ms(poll["lat"], 0.99),
                "checkins": len(poll["lat"]), "tasks": poll["tasks"],
                "checkins_per_s": round(len(steady) / (CHECKIN_S - POLL_S), 1),
                "offered_per_s": round(CHECKIN_DEVICES / POLL_S, 1),
                "register_per_s": round(CHECKIN_DEVICES / res["register_wall_s"], 1),
                "notes": (f"{poll['tasks']} of {len(poll['lat'])} check-ins got a task (a task is the heavier answer): the "
                          f"open round was drawn at q = 1 from the {DEVICES} devices registered then, and devices that register "
                          f"during a round are drawn at its q; registration up front") + _first_error(errors),
            })
            rows.append({
                "name": f"coordinator: {CHECKIN_DEVICES} devices checking in at once (HTTPS, loopback)",
                "devices": CHECKIN_DEVICES, "errors": len(errors),
                "checkin_p50_ms": _ms(burst["lat"], 0.5), "checkin_p99_ms": _ms(burst["lat"], 0.99),
                "checkins_per_s": round(len(burst["lat"]) / burst["wall_s"], 1),
                "notes": "throughput ceiling: every request queued at once, so latency is mostly queueing",
            })
            # ---- restart: SIGKILL mid-round, restart, resume ------------------------------------------
            open_round = _query(db, "SELECT round_id FROM rounds WHERE status = 'open'")[0][0]
            names = [r[0] for r in _query(db, "SELECT device_id FROM assignments WHERE round_id = ? ORDER BY device_id",
                                          (open_round,))][:RESTART_DEVICES]
            # registered already: the register call is idempotent for the same name and key
            res = _load({**base, "phase": "restart", "devices": [int(n[1:]) for n in names], "tokens": [""] * len(names)})
            errors2 = res["errors"]
            before = _query(db, "SELECT round_id, device_id, blob_sha FROM updates ORDER BY 1, 2")
            server.send_signal(signal.SIGKILL)
            server.wait()
            server = _start(db, port, certs)
            ready = _wait_ready(url, ctx, db)
            after = _query(db, "SELECT round_id, device_id, blob_sha FROM updates ORDER BY 1, 2")
            resumed = _query(db, "SELECT round_id FROM rounds WHERE status = 'open'")
            versions = _query(db, "SELECT COUNT(*) FROM versions")[0][0]
            rows.append({
                "name": f"coordinator restart after SIGKILL mid-round ({RESTART_DEVICES} updates in)",
                "restart_to_serving_s": round(ready, 2), "errors": len(errors2),
                "updates_kept": f"{len(after)}/{len(before)}", "versions": versions,
                "resumed_round_open": [r[0] for r in resumed] == [open_round],
                "notes": "restart = new process: Python + torch import, SQLite open, state check, TLS listen"
                         + ("" if after == before else "; UPDATES DIFFER") + _first_error(errors2),
            })
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGKILL)
                server.wait()
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif sys.argv[1:] == ["--load"]:
        print(json.dumps(asyncio.run(load(json.load(sys.stdin)))))
    else:
        for row in run():
            print(json.dumps(row))
