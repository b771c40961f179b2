"""`pocketfed device --profile watch|phone` on SmolLM2-135M: each takes part in a real HTTPS round
against `pocketfed server` and its whole process's peak RSS (VmHWM) stays within the profile's
budget (watch 512 MB, phone 1,536 MB).

One coordinator (TLS, enrollment tokens), two training rounds of goal 1 (overselect 2: with both
devices registered the sample rate is 1); the watch device trains round 0, then the phone device
round 1, one at a time so each process's peak is its own. Each
device reports its VmHWM when it stops (`finished: ... peak_rss_mb=`); the test also reads it from
/proc/<pid>/status while the device runs. Waits are progress-based: a process that is alive and
still writing its log (or growing) is waited for; one that stalls for STALL_S fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.test_http_rounds import db_rows, free_port

pytestmark = pytest.mark.integration

STALL_S = 300.0  # no progress for this long = stuck (CI's 2 cores may be busy with other tests)
CONFIG = {
    "model": {"name": "smollm2-135m"},
    "data": {"seq_len": 64, "min_train_tokens": 32, "test_fraction": 0.2},
    "train": {"steps": 2, "batch_size": 2, "lr": 1e-3},
    "sim": {"rounds": 2, "seed": 0},
    "deploy": {"goal": 1, "overselect": 2.0, "quorum": 1, "deadline_s": 600.0, "retry_s": 0.5},
}
BUDGET = {"watch": 512.0, "phone": 1536.0}
TEXT = ("My watch keeps a list of the walks I take along the river in the morning, and my phone keeps "
        "the notes I write after them: where the herons stood, how cold the water looked, who said hello.")


def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def wait_progress(what: str, done, alive, progress, stall_s: float = STALL_S) -> None:
    """Poll until done(); fail if alive() turns false first, or if progress() stops changing for stall_s."""
    last, since = progress(), time.monotonic()
    while not done():
        if not alive():
            raise AssertionError(f"{what}: the process exited first")
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall_s:
            raise AssertionError(f"{what}: no progress for {stall_s:.0f} s")
        time.sleep(0.1)


def test_watch_and_phone_devices_train_within_their_budgets(tmp_path):
    from pocketfed.model.zoo import resolve
    from pocketfed.server.http.certs import make_dev_certs

    resolve("smollm2-135m")  # the model cache exists before the server and devices want it
    make_dev_certs(tmp_path / "certs")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    for name in BUDGET:
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "notes.txt").write_text("\n\n".join(f"{TEXT} ({name}, day {i})" for i in range(6)))
    db, port, logs = tmp_path / "state", free_port(), tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    py = [sys.executable, "-m", "pocketfed"]

    def start(name: str, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(py + args, cwd=tmp_path, env=env, stdout=open(logs / f"{name}.log", "a"),
                                stderr=subprocess.STDOUT)

    def log(name: str) -> str:
        return (logs / f"{name}.log").read_text()

    t0 = time.monotonic()
    server = start("server", ["server", "--db", str(db), "--port", str(port), "--tls", "certs", "--config", "cfg.yaml"])
    device = None
    try:
        # no round opens before a quorum of devices is registered: wait for the server's state (version 0)
        wait_progress("the server's state", alive=lambda: server.poll() is None,
                      done=lambda: (db / "state.sqlite").exists() and bool(db_rows(db, "SELECT 1 FROM versions")),
                      progress=lambda: (log("server"), vm_hwm_mb(server.pid)))
        enrolled = subprocess.run(py + ["enroll", "--db", str(db), "--count", "2"], cwd=tmp_path, env=env,
                                  capture_output=True, text=True)
        assert enrolled.returncode == 0, enrolled.stderr
        tokens = enrolled.stdout.split()
        measured = {}
        for i, (name, budget) in enumerate(BUDGET.items()):
            device = start(name, ["device", "--no-on-device-model", "--server", f"https://127.0.0.1:{port}", "--ca", "certs/ca.pem",
                                  "--data", f"data/{name}", "--home", f"homes/{name}", "--threads", "1",
                                  "--max-rounds", "1", "--profile", name, "--enroll-token", tokens[i]])
            pid, seen = device.pid, [0.0]

            def watch_memory(pid=pid, seen=seen) -> tuple:
                seen[0] = max(seen[0], vm_hwm_mb(pid) or 0.0)
                return seen[0], log(name)

            wait_progress(f"the {name} device", done=lambda: device.poll() is not None, alive=lambda: True,
                          progress=watch_memory)
            out = log(name)
            assert device.returncode == 0, out[-3000:]
            plan = dict(re.findall(r"(\w+)=([^,\n]+)", re.search(r"^plan: (.*)$", out, re.M).group(1)))
            assert plan["backend"] == "lean" and plan["profile"] == name, out
            assert re.search(rf"^uploaded: round={i}, bytes=\d+", out, re.M), out
            peak = float(re.search(r"^finished: sent=1, peak_rss_mb=([\d.]+)", out, re.M).group(1))
            assert seen[0] <= peak + 1.0  # what /proc showed from outside is within what the device reported
            measured[name] = (peak, plan)
            assert peak <= budget, (name, peak, plan)
        assert measured["watch"][1]["precision"] == "int8" and measured["phone"][1]["precision"] == "fp32", measured
        wait_progress("both rounds committed", alive=lambda: server.poll() is None,
                      done=lambda: len(db_rows(db, "SELECT idx FROM rounds WHERE status = 'committed'")) == 2,
                      progress=lambda: log("server"))
        print({k: v[0] for k, v in measured.items()}, f"{time.monotonic() - t0:.0f} s")
    finally:
        for p in (server, device):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
