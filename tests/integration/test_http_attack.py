"""A boosted model-replacement attacker among real device processes over TLS, on `tiny`: the
coordinator's norm bound (the round engine's `defend`, the simulator's own) holds it.

Three device processes; one of them is malicious: the same `pocketfed device` command run through a
small launcher that swaps the device task for `pocketfed.attack`'s (train on backdoor rows, upload
the update x30; Bagdasaryan et al. 2020). The production device code has no attack switch: the
launcher patches `pocketfed.device.task.run_task` in its own process only. Every committed round
clipped that update (3 x the round's median norm), the mean moved by at most the bound, and every
released adapter is finite."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load as st_load

from tests.conftest import CAP_S, run_cli, sizes, wait_for
from tests.integration.test_http_rounds import db_rows, free_port, write_data

pytestmark = [pytest.mark.integration, pytest.mark.timeout(4 * CAP_S)]

ROUNDS, BOOST = 2, 30.0
CONFIG = {
    "model": {"name": "tiny"},
    "data": {"seq_len": 32, "min_train_tokens": 32, "test_fraction": 0.2},
    "train": {"steps": 2, "batch_size": 4, "lr": 5e-3},
    "sim": {"rounds": ROUNDS, "seed": 0},
    "deploy": {"goal": 3, "overselect": 1.0, "quorum": 3, "deadline_s": 300.0, "retry_s": 0.3},
}
LAUNCHER = f"""
import sys
from transformers import AutoTokenizer
from pocketfed import attack
from pocketfed.config import AttackConfig, AttackKind
from pocketfed.device import task as device_task
from pocketfed.model.zoo import tiny_dir

cfg = AttackConfig(kind=AttackKind.model_replacement, boost={BOOST}, fraction=1.0)
bd = attack.backdoor(cfg, AutoTokenizer.from_pretrained(tiny_dir()))
honest = device_task.run_task

def malicious(model, data, task):
    return attack.rewrite(honest(model, attack.poison(data, bd, cfg.poison_rows, task.round), task), task, cfg, 3)

device_task.run_task = malicious
sys.argv = ["pocketfed"] + sys.argv[1:]
from pocketfed.cli import main
main()
"""


def test_attack_boosted_replacement_over_tls_is_bounded(tmp_path):
    from pocketfed.model.zoo import tiny_dir
    from pocketfed.server.http.certs import make_dev_certs

    tiny_dir()
    write_data(tmp_path / "data")
    make_dev_certs(tmp_path / "certs")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    db, port, logs = tmp_path / "state", free_port(), tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def start(name: str, args: list[str], evil: bool = False) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "a")
        head = [sys.executable, "-c", LAUNCHER] if evil else [sys.executable, "-m", "pocketfed"]
        return subprocess.Popen(head + args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)

    def progress() -> tuple:
        files = sorted(logs.glob("*.log"))
        return db_rows(db, "SELECT round_id, status FROM rounds"), db_rows(db, "SELECT COUNT(*) FROM updates"), sizes(files)

    server = start("server", ["server", "--db", str(db), "--port", str(port), "--tls", "certs", "--config", "cfg.yaml"])
    devices: list[subprocess.Popen] = []
    try:
        wait_for("the server's state", lambda: bool(db_rows(db, "SELECT 1 FROM versions")), progress)
        enrolled = run_cli([sys.executable, "-m", "pocketfed", "enroll", "--db", str(db), "--count", "3"], cwd=tmp_path, env=env)
        assert enrolled.returncode == 0, enrolled.stderr
        tokens = enrolled.stdout.split()
        for i in range(3):
            args = ["device", "--no-on-device-model", "--server", f"https://127.0.0.1:{port}", "--ca", "certs/ca.pem", "--data", f"data/dev{i}",
                    "--name", f"dev{i}", "--home", f"homes/dev{i}", "--threads", "1", "--patience", "900",
                    "--enroll-token", tokens[i]]
            devices.append(start(f"dev{i}", args, evil=i == 2))
        wait_for("the devices to finish", lambda: all(p.poll() is not None for p in devices), progress)
        for i, p in enumerate(devices):
            assert p.returncode == 0, (logs / f"dev{i}.log").read_text()[-2000:]
    finally:
        for p in [server, *devices]:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()

    rounds = db_rows(db, "SELECT idx, participants, metrics FROM rounds WHERE status = 'committed' ORDER BY idx")
    assert [r[0] for r in rounds] == list(range(ROUNDS))
    for _, parts, metrics in rounds:
        m = json.loads(metrics)
        assert "dev2" in json.loads(parts)  # the attacker's update was taken, bounded
        assert m["clipped"] == 1 and m["update_norm"] <= m["norm_bound"] + 1e-6
    adapters = [st_load((db / "blobs" / sha[:2] / sha).read_bytes())
                for (sha,) in db_rows(db, "SELECT adapter_sha FROM versions ORDER BY version")]
    assert len(adapters) == ROUNDS + 1
    for before, after in zip(adapters, adapters[1:]):
        assert all(bool(t.isfinite().all()) for t in after.values())
        step = math.sqrt(sum(float((after[k] - before[k]).norm()) ** 2 for k in after))
        assert step > 0
    evil_ledger = [json.loads(x)["kind"] for x in Path(tmp_path / "homes/dev2/ledger.jsonl").read_text().splitlines()]
    assert evil_ledger.count("update") == ROUNDS
