"""Idle connections against `pocketfed server` (issue 16, audit finding 2): what 40 clients that
announce a 4 MiB upload, send all of it but its last byte, and then sit idle make the coordinator
hold, and whether it ever lets them go.

    stranger    the 40 sign with a key no device registered (anyone can do this)
    registered  the 40 use a registered device's public key (public: it is in every request it
                sends) with a signature over other bytes

For each: the coordinator's RSS (VmRSS, /proc) before, 3 s after the 40 bodies were sent, and how
many of the 40 connections it still holds WAIT_S seconds later. The coordinator is the real command
(`pocketfed server --model tiny`, loopback, plain HTTP) with the deploy defaults.

    .venv/bin/python bench/bench_connections.py                 # this tree
    PYTHONPATH=/tmp/old/src .venv/bin/python bench/bench_connections.py   # another tree (e.g. `git archive`)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONNECTIONS = 40
BODY = 4 * 2**20  # the upload route's cap (wire.CHUNK_MAX_BYTES)
WAIT_S = 40.0  # longer than deploy.read_timeout_s (15) and keep_alive_s (5) together


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(db: Path, port: int) -> subprocess.Popen:
    code = "import sys; from pocketfed.cli import main; sys.argv[0] = 'pocketfed'; main()"
    p = subprocess.Popen([sys.executable, "-c", code, "server", "--db", str(db), "--port", str(port), "--model", "tiny",
                          "--set", "deploy.open_registration=true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p
        except OSError:
            time.sleep(0.2)
    p.kill()
    raise RuntimeError("the coordinator did not start")


def closed(s: socket.socket) -> bool:
    try:
        while True:
            if not s.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def scenario(port: int, pid: int, key_hex: str) -> dict[str, float]:
    head = (f"PUT /v1/rounds/1/upload?offset=0 HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/octet-stream\r\n"
            f"content-length: {BODY}\r\nx-pf-key: {key_hex}\r\nx-pf-timestamp: {time.time():.3f}\r\n"
            f"x-pf-nonce: {os.urandom(16).hex()}\r\nx-pf-signature: {'ab' * 64}\r\n\r\n").encode()
    body = b"x" * (BODY - 1)
    before = rss_mb(pid)
    socks = []
    for _ in range(CONNECTIONS):
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(30)
        try:
            s.sendall(head + body)
        except OSError:  # refused from its headers and closed mid-send
            pass
        socks.append(s)
    time.sleep(3.0)
    held = rss_mb(pid)
    for s in socks:
        s.setblocking(False)
    t0 = time.time()
    while time.time() - t0 < WAIT_S and not all(closed(s) for s in socks):
        time.sleep(0.5)
    open_after = sum(not closed(s) for s in socks)
    out = {"rss_before_mb": round(before, 1), "rss_held_mb": round(held, 1), "rss_growth_mb": round(held - before, 1),
           "all_closed_after_s": round(time.time() - t0 + 3.0, 1) if not open_after else None,
           f"open_after_{WAIT_S:.0f}s": open_after, "rss_end_mb": round(rss_mb(pid), 1)}
    for s in socks:
        s.close()
    return out


def measure() -> dict[str, object]:
    """Both scenarios against this tree's coordinator: {"code": its folder, "stranger": ..., "registered": ...}."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    import pocketfed
    from pocketfed.device.http_client import DeviceClient, connect

    results: dict[str, object] = {"code": str(Path(pocketfed.__file__).parent)}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        p = start(Path(tmp) / "state", port)
        try:
            key = Ed25519PrivateKey.generate()
            DeviceClient(connect(f"http://127.0.0.1:{port}", None), key).register("bench-device")
            stranger = Ed25519PrivateKey.generate()
            for name, k in (("stranger", stranger), ("registered", key)):
                from pocketfed.protocol.auth import public_hex

                results[name] = scenario(port, p.pid, public_hex(k))
        finally:
            p.terminate()
            p.wait(timeout=30)
    return results


def run() -> list[dict[str, object]]:
    """Rows for bench/run.py: one per scenario, this tree."""
    results = measure()
    return [{"clients sign with": {"stranger": "an unregistered key", "registered": "a registered key, forged signature"}[name],
             "connections": CONNECTIONS, **results[name]}  # type: ignore[dict-item]
            for name in ("stranger", "registered")]


def main() -> None:
    print(json.dumps(measure(), indent=1))


if __name__ == "__main__":
    main()
