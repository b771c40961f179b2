"""From a federated run to a personalized on-device model with a privacy lock that checks.

A TLS coordinator and 3 device processes (configs/trial.yaml and its trial-data, on `tiny`, 2
rounds). When training ends each device installs the final release, trains its personal adapter
(kept only if it beats the global model on its own validation split) and builds its int4 runtime
model; then `pocketfed suggest --home H` prints three suggestions and the verified lock line, and
the ledger holds no personal adapter and no text. Waits are on progress, never on the clock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CAP_S, run_cli, sizes, wait_for
from tests.integration.test_http_rounds import db_rows, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(4 * CAP_S)]

ROOT = Path(__file__).resolve().parents[2]
DEVICES = ("ana", "ben", "caro")
ROUNDS = 2


def test_devices_end_with_the_final_release_a_personal_adapter_and_a_verified_int4_model(tmp_path: Path) -> None:
    from pocketfed.egress import ALLOWED_KINDS
    from pocketfed.model.zoo import tiny_dir
    from pocketfed.runtime.home import current_release, personal_record, read_json
    from pocketfed.server.http.certs import make_dev_certs

    tiny_dir()  # the model cache exists before 4 processes want it
    make_dev_certs(tmp_path / "certs")
    cfg = yaml.safe_load((ROOT / "configs" / "trial.yaml").read_text())
    cfg["model"]["name"] = "tiny"
    cfg["sim"]["rounds"] = ROUNDS
    cfg["deploy"].update(retry_s=0.3, deadline_s=120.0)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    db, port, logs = tmp_path / "state", free_port(), tmp_path / "logs"
    logs.mkdir()
    url = f"https://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    py = [sys.executable, "-m", "pocketfed"]
    homes = {d: tmp_path / "homes" / d for d in DEVICES}

    def start(name: str, args: list[str]) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "a")
        return subprocess.Popen(py + args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)

    def progress() -> tuple:
        files = sorted(logs.glob("*.log")) + sorted((tmp_path / "homes").glob("*/ledger.jsonl"))
        return db_rows(db, "SELECT round_id, status FROM rounds"), sizes(files), tuple(
            sorted(str(p) for p in (tmp_path / "homes").glob("*/*")))

    server = start("server", ["server", "--db", str(db), "--port", str(port), "--tls", "certs", "--config", "cfg.yaml"])
    devices: dict[str, subprocess.Popen] = {}
    try:
        wait_for("the server's state", lambda: bool(db_rows(db, "SELECT 1 FROM versions")), progress)
        enrolled = run_cli(py + ["enroll", "--db", str(db), "--count", str(len(DEVICES))], cwd=tmp_path, env=env)
        assert enrolled.returncode == 0, enrolled.stderr
        tokens = enrolled.stdout.split()
        for d, token in zip(DEVICES, tokens):
            devices[d] = start(d, ["device", "--server", url, "--ca", "certs/ca.pem", "--data",
                                   str(ROOT / "configs" / "trial-data" / d), "--home", str(homes[d]), "--threads", "1",
                                   "--enroll-token", token])
        wait_for("the devices to finish", lambda: all(p.poll() is not None for p in devices.values()), progress)
        for d, p in devices.items():
            assert p.returncode == 0, (logs / f"{d}.log").read_text()[-3000:]
        # `release pull` with the device's credentials, from the server the home joined (device.json)
        pulled = run_cli(py + ["release", "pull", "--home", str(homes["ana"]), "--no-build"], cwd=tmp_path, env=env)
        assert pulled.returncode == 0 and f"release {ROUNDS} was already installed" in pulled.stdout, pulled.stderr
    finally:
        for p in [server, *devices.values()]:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()

    final = max(v for (v,) in db_rows(db, "SELECT version FROM versions"))
    assert final == ROUNDS
    for d, home in homes.items():
        log = (logs / f"{d}.log").read_text()
        assert current_release(home) == str(final), log[-3000:]  # the final release, installed
        personal = personal_record(home)
        assert personal is not None and personal["release"] == final and personal["gain"] > 0, log[-3000:]
        record = read_json(home / "model" / "pocketfed.json")
        assert record is not None and record["format"] == "onnx-int4" and record["release"] == final
        assert record["personal"]["sha256"] == personal["sha256"]  # the model holds the personal adapter

        out = run_cli(py + ["suggest", "--home", str(home), "But soft, what light through yonder "],
                      cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr
        words, lock = out.stdout.strip().splitlines()[-2:]
        assert len(words.split("  |  ")) == 3, out.stdout
        assert lock.startswith("privacy lock: made on this device; sent so far: "), lock
        assert f"{ROUNDS} model updates" in lock or "model update" in lock
        assert lock.endswith("no text"), lock  # trial.yaml has no DP: no epsilon to show

        entries = [json.loads(x) for x in (home / "ledger.jsonl").read_text().splitlines()]
        sent = [e for e in entries if e["kind"] != "refusal"]
        assert {e["kind"] for e in sent} <= set(ALLOWED_KINDS)  # no personal adapter, no text kind
        assert not any("personal" in json.dumps(e) for e in entries)
        for e in sent:
            if e["kind"] == "metrics":
                assert all(isinstance(v, float) for v in e["metrics"].values())
