"""The device app (`pocketfed app`) on SmolLM2-135M onnx-int4: suggestion latency over HTTP and the
app's whole-process peak memory, against the issue's goals (p95 < 50 ms; peak RSS within the phone
profile's 1,536 MB).

    run(run_dir=None) -> list[dict]      (python bench/bench_app.py [RUN_DIR] prints the rows)

A device home is made as a device leaves it (a release signed with a fresh key and installed, the
runtime model built by the device's own builder `pocketfed.device.ondevice.convert` in its own
process, a ledger); its release adapter is RUN_DIR's, else runs/demo's when it holds a trained
adapter, else a rank-8 q,v adapter with small random B (said in the rows). No personal adapter: it
is merged into the weights before quantizing, so it changes neither speed nor memory. Then
`pocketfed app --home H` runs in its own process, with the threads and spinning it chooses, and a
client asks `/api/suggest` as the page does: `words` after each word of runtime.bench.TYPED_TEXT
(the page asks when typing pauses), `keystrokes` after every character of it (the worst case: no
pause at all; partial words are completed). Latency is the client's (HTTP on 127.0.0.1 included),
after one warm-up request; peak RSS is the app process's VmHWM after all requests. The peer, in
its own process with the same threads and spinning: `runtime.suggest` called directly on the same
texts (`direct_p95_ms`). App and peer take turns in blocks (all texts of a kind to one, then to the
other, REPEATS times; figures are the medians of the blocks' percentiles), so a loaded machine slows
both alike, yet neither runs beside the other: a device runs one model, and two spinning thread pools
on 2 cores slow each other (asking each text of both in turn put both p95s near 50 ms against 28 ms
alone); `app_vs_direct_p95` is what the app adds (HTTP, the thread pool, the app).
`cpu_p95_ms` / `direct_cpu_p95_ms`: CPU time (all threads) of the suggestion itself, in the app and
in the peer; a loaded machine inflates wall time, much less CPU time, so on a shared box this is
the better guide to the idle figure (with one thread, idle wall time is about the CPU time).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

DEMO_RUN = "runs/demo"
PHONE_MB = 1536  # pocketfed.device.profiles: the phone's memory budget
REPEATS = 3  # blocks of every text, for the app and for the peer each


def _release_from_run(home: Path, run: Path) -> None:
    """Sign and install `run`'s adapter as release 1 of `home`, as a device installs one."""
    import yaml
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from pocketfed import signing
    from pocketfed.runtime import home as device_home

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    data = (run / "adapter" / "adapter_model.safetensors").read_bytes()  # PEFT's names: what a release holds
    key = Ed25519PrivateKey.generate()
    now = time.time()
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    privacy = summary.get("privacy") or {}
    m = signing.Manifest(version=1, parent_version=0, sha256=signing.sha256_hex(data), round=1, strategy="fedavg",
                         base_model=cfg["model"]["name"], issued_at=now, expires_at=now + 86400,
                         epsilon=privacy.get("epsilon"), delta=privacy.get("delta") if privacy.get("epsilon") else None)
    home.mkdir(parents=True)
    (home / device_home.RELEASE_PIN).write_text(signing.public_hex(key) + "\n")
    task = {"model": cfg["model"]["name"], "lora": cfg["lora"]}
    device_home.install_release(home, m.to_json(), signing.sign(key, m), data, task)


def _ledger(home: Path) -> None:
    """A short ledger, written by the device's ledger: a registration and one round's metrics."""
    from pocketfed.device import ledger
    from pocketfed.protocol import wire

    reg = wire.RegisterRequest(name="bench-device", public_key="ab" * 32, enrollment_token=None)
    ledger.check_and_record(home, "https://coordinator:8443", ledger.REGISTRATION, reg.model_dump(), {})
    ledger.check_and_record(home, "https://coordinator:8443", ledger.METRICS, {"num_tokens": 512, "loss": 3.1}, {})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vm_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def prefixes() -> dict[str, list[str]]:
    """What the page asks for: after each word (typing pauses), and after every keystroke."""
    from pocketfed.runtime.bench import TYPED_TEXT

    words = TYPED_TEXT.split()
    return {"words": [" ".join(words[:i]) + " " for i in range(1, len(words) + 1)],
            "keystrokes": [TYPED_TEXT[:i] for i in range(1, len(TYPED_TEXT) + 1)]}


def serve_direct(model_dir: Path, threads: int, spin: bool) -> None:
    """The peer's child process: `runtime.suggest` called in-process (no HTTP, no app) on each text
    read from stdin (a JSON string per line), answering its time in ms per line."""
    from pocketfed.runtime.model import load
    from pocketfed.runtime.suggest import suggest

    model = load(model_dir, threads, spin)
    suggest(model, "Hello ")  # warm-up, as the app's first request
    print("ready", flush=True)
    for line in sys.stdin:
        t0, cpu = time.perf_counter(), time.process_time()
        suggest(model, json.loads(line))
        print(json.dumps([(time.perf_counter() - t0) * 1000, (time.process_time() - cpu) * 1000]), flush=True)


def _wait_ready(proc: subprocess.Popen, client: Any, log: Any) -> dict[str, Any]:
    import httpx

    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"pocketfed app exited: {log.read()[-2000:]}")
        try:
            return dict(client.get("/api/lock").json())
        except httpx.HTTPError:
            time.sleep(0.2)


def measure_app(home: Path, threads: int, spin: bool) -> list[dict[str, Any]]:
    """Start `pocketfed app --home home` and the peer, time their suggestions request by request in
    turn (the machine's load moves both alike), read the app's peak RSS (module docstring)."""
    import httpx

    port = _free_port()
    log = tempfile.TemporaryFile("w+")
    settings = ["--threads", str(threads), "--spin" if spin else "--no-spin"]
    app = subprocess.Popen([sys.executable, "-m", "pocketfed", "app", "--home", str(home), "--port", str(port), *settings],
                           stdout=log, stderr=subprocess.STDOUT)
    peer = subprocess.Popen([sys.executable, __file__, "--direct", str(home / "model"), str(threads), str(int(spin))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        start = time.monotonic()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            lock = _wait_ready(app, client, log)
            ready_s = time.monotonic() - start
            client.get("/api/suggest", params={"text": "Hello "})  # warm-up: the vocabulary tables
            assert peer.stdout.readline().strip() == "ready"

            def app_ms(text: str) -> tuple[float, float]:
                t0 = time.perf_counter()
                body = client.get("/api/suggest", params={"text": text}).json()
                return (time.perf_counter() - t0) * 1000, float(body["cpu_ms"])

            def peer_ms(text: str) -> tuple[float, float]:
                peer.stdin.write(json.dumps(text) + "\n")
                peer.stdin.flush()
                wall, cpu = json.loads(peer.stdout.readline())
                return wall, cpu

            rows = []
            for name, texts in prefixes().items():
                blocks: dict[str, list[list[tuple[float, float]]]] = {"app": [], "peer": []}
                for rep in range(REPEATS):
                    for who in (("app", "peer") if rep % 2 == 0 else ("peer", "app")):  # alternate who goes first
                        ask = app_ms if who == "app" else peer_ms
                        blocks[who].append([ask(text) for text in texts])

                def med(who: str, q: float, i: int) -> float:  # the median over blocks of a percentile
                    return statistics.median(_percentile([t[i] for t in block], q) for block in blocks[who])

                p95, direct_p95 = med("app", 95, 0), med("peer", 95, 0)
                rows.append({"requests": name, "n": len(texts), "repeats": REPEATS,
                             "p50_ms": round(med("app", 50, 0), 1), "p95_ms": round(p95, 1),
                             "direct_p95_ms": round(direct_p95, 1), "app_vs_direct_p95": round(p95 / direct_p95, 2),
                             "cpu_p95_ms": round(med("app", 95, 1), 1),
                             "direct_cpu_p95_ms": round(med("peer", 95, 1), 1)})
        peak = _vm_kb(app.pid, "VmHWM") / 1024
        for row in rows:
            row |= {"app_peak_rss_mb": round(peak, 1), "phone_mb": PHONE_MB, "lock_ok": lock["ok"],
                    "start_to_ready_s": round(ready_s, 1)}
        return rows
    finally:
        for proc in (app, peer):
            proc.terminate()
            proc.wait(timeout=30)
        log.close()


def run(run_dir: str | None = None) -> list[dict]:
    from pocketfed.device.ondevice import convert
    from pocketfed.runtime.model import choose_settings

    work = Path(tempfile.mkdtemp(prefix="bench-app-"))
    if run_dir is None and (Path(DEMO_RUN) / "adapter" / "adapter_model.safetensors").is_file():
        run_dir = DEMO_RUN
    if run_dir is None:
        from bench_runtime import _random_adapter_run

        run, adapter = _random_adapter_run(work / "run"), "random rank-8 q,v adapter"
    else:
        run, adapter = Path(run_dir), f"{run_dir}'s adapter"
    home = work / "home"
    _release_from_run(home, run)
    built = convert(home)  # the device's conversion, in its own process
    _ledger(home)
    load_1m = os.getloadavg()[0]  # the machine's load as measuring starts: figures are comparable only within a run
    threads, spin = choose_settings()  # as `pocketfed app` would choose now; the peer gets the same
    rows = measure_app(home, threads, spin)
    for row in rows:
        row["conversion_peak_rss_mb"] = built["peak_rss_mb"]
        row["load_1m"] = round(load_1m, 1)
        row["model"] = f"{built['format']}, {adapter}; {threads} threads, {'spinning' if spin else 'sleeping'}"
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--direct"]:  # the peer's child process
        serve_direct(Path(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4])))
    else:
        for r in run(sys.argv[1] if len(sys.argv) > 1 else None):
            print(r)
