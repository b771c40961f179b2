"""Real rounds on loopback: one coordinator and 8 device processes over TLS, on the `tiny` model.

Two devices are SIGKILLed mid-round (and later rejoin), the coordinator is SIGKILLed mid-round
and restarted on the same state, and training still finishes. The final global adapter equals a
simulation that replays the recorded participants of each round (same seeds, same code path).

Nothing here waits on the clock: each wait fails only when the flow stops moving (no new round,
update row, ledger line or log byte for `STALL_S`), so a CI box under heavy load makes the test
slower, not red. A round that misses its deadline commits with its quorum or aborts and reopens at
the same index; the checks below hold either way (each index committed once, participants replayed).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import CAP_S, run_cli, sizes, wait_for

# pytest's --timeout is a last resort far above any healthy run; the waits below fail on a stall first.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(4 * CAP_S)]

DEVICES = 8
ROUNDS = 4
WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars shine on quiet hills "
         "and rivers run to the sea under old bridges where children sing of summer rain").split()
CONFIG = {
    "model": {"name": "tiny"},
    "data": {"seq_len": 32, "min_train_tokens": 32, "test_fraction": 0.2},
    "train": {"steps": 2, "batch_size": 4, "lr": 5e-3},
    "sim": {"rounds": ROUNDS, "seed": 0},
    "deploy": {"goal": 6, "overselect": 1.3, "quorum": 4, "deadline_s": 120.0, "retry_s": 0.3},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_data(root: Path) -> None:
    """A few hundred tokens of text per device, each its own."""
    for i in range(DEVICES):
        rng = random.Random(i)
        d = root / f"dev{i}"
        d.mkdir(parents=True)
        paras = [" ".join(rng.choice(WORDS) for _ in range(30)) + "." for _ in range(8)]
        (d / "notes.txt").write_text("\n\n".join(paras))


def db_rows(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """The rows, read-only; [] while the server has not made its state yet (or is busy writing)."""
    try:
        con = sqlite3.connect(f"file:{db / 'state.sqlite'}?mode=ro", uri=True, timeout=5)
    except sqlite3.OperationalError:
        return []
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def test_rounds_over_tls_survive_kills(tmp_path):
    from pocketfed.model.zoo import tiny_dir
    from pocketfed.server.http.certs import make_dev_certs

    tiny_dir()  # the model cache exists before 9 processes want it
    write_data(tmp_path / "data")
    make_dev_certs(tmp_path / "certs")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    db, port, logs = tmp_path / "state", free_port(), tmp_path / "logs"
    logs.mkdir()
    url = f"https://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    py = [sys.executable, "-m", "pocketfed"]

    def start(name: str, args: list[str]) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "a")
        return subprocess.Popen(py + args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)

    server_args = ["server", "--db", str(db), "--port", str(port), "--tls", "certs", "--config", "cfg.yaml"]

    tokens: list[str] = []  # `pocketfed enroll`, once the server's state exists

    def device_args(i: int) -> list[str]:
        return ["device", "--no-on-device-model", "--server", url, "--ca", "certs/ca.pem", "--data", f"data/dev{i}", "--name", f"dev{i}",
                "--home", f"homes/dev{i}", "--threads", "1", "--patience", "900", "--enroll-token", tokens[i]]

    def open_round() -> tuple[int, int, int] | None:
        rows = db_rows(db, "SELECT round_id, idx FROM rounds WHERE status = 'open'")
        if not rows:
            return None
        n = db_rows(db, "SELECT COUNT(*) FROM updates WHERE round_id = ?", (rows[0][0],))
        return (rows[0][0], rows[0][1], n[0][0]) if n else None

    def committed() -> int:
        rows = db_rows(db, "SELECT COUNT(*) FROM rounds WHERE status = 'committed'")
        return rows[0][0] if rows else 0

    def progress() -> tuple:
        """How far the flow has got: rounds and their states, update rows, what the logs and ledgers hold."""
        files = sorted(logs.glob("*.log")) + sorted((tmp_path / "homes").glob("dev*/ledger.jsonl"))
        return (db_rows(db, "SELECT round_id, status FROM rounds"), db_rows(db, "SELECT COUNT(*) FROM updates"),
                tuple(map(str, files)), sizes(files))

    server = start("server", server_args)
    devices: dict[int, subprocess.Popen] = {}
    try:
        # no round opens before a quorum of devices is registered: wait for the server's state (version 0)
        wait_for("the server's state", lambda: (db / "state.sqlite").exists() and bool(db_rows(db, "SELECT 1 FROM versions")),
                 progress)
        enrolled = run_cli(py + ["enroll", "--db", str(db), "--count", str(DEVICES)], cwd=tmp_path, env=env)
        assert enrolled.returncode == 0, enrolled.stderr
        tokens += enrolled.stdout.split()
        devices = {i: start(f"dev{i}", device_args(i)) for i in range(DEVICES)}

        # Round 1 (training round index 1): kill two devices that have not uploaded yet.
        wait_for("round index 1", lambda: (r := open_round()) is not None and r[1] == 1, progress)
        rid = open_round()[0]  # type: ignore[index]
        uploaded = {d for (d,) in db_rows(db, "SELECT device_id FROM updates WHERE round_id = ?", (rid,))}
        killed = [i for i in range(DEVICES) if f"dev{i}" not in uploaded][-2:]
        for i in killed:
            devices[i].send_signal(signal.SIGKILL)
            devices[i].wait()

        # A later round: SIGKILL the coordinator once an update is in but the round is not committed.
        goal = CONFIG["deploy"]["goal"]
        wait_for("a later round with some updates in",
                 lambda: (r := open_round()) is not None and r[1] >= 2 and 1 <= r[2] < goal, progress)
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert 2 <= committed() < ROUNDS
        server = start("server", server_args)
        for i in killed:  # the killed devices rejoin with their homes
            devices[i] = start(f"dev{i}", device_args(i))

        wait_for("the devices to finish", lambda: all(p.poll() is not None for p in devices.values()), progress)
        for i, p in devices.items():
            assert p.returncode == 0, (logs / f"dev{i}.log").read_text()[-2000:]
    finally:
        for p in [server, *devices.values()]:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()

    # ---- the state: every round committed once, each update applied once -------------------------
    rounds = db_rows(db, "SELECT idx, participants, new_version FROM rounds WHERE status = 'committed' ORDER BY idx")
    assert [r[0] for r in rounds] == list(range(ROUNDS))
    participants = [json.loads(r[1]) for r in rounds]
    for (idx, _, _), parts in zip(rounds, participants):
        assert len(parts) >= CONFIG["deploy"]["quorum"] and parts == sorted(set(parts))
    versions = db_rows(db, "SELECT version, parent, rounds_applied, adapter_sha FROM versions ORDER BY version")
    assert [(v, p, n) for v, p, n, _ in versions] == [(k, k - 1, k) for k in range(ROUNDS + 1)]
    for i in killed:  # the killed devices came back with their identity and finished
        log = (logs / f"dev{i}.log").read_text()
        assert log.count("registered: device_id=") == 2 and "done: " in log
    uploaded = {d for parts in participants for d in parts}
    ledgers = sorted((tmp_path / "homes").glob("dev*/ledger.jsonl"))  # every device registered and checked in
    assert len(ledgers) >= len(uploaded) >= CONFIG["deploy"]["quorum"]
    senders = set()
    for ledger in ledgers:  # only registrations, check-ins, updates and metrics left, each written down first
        kinds = [json.loads(x)["kind"] for x in ledger.read_text().splitlines()]
        assert set(kinds) <= {"registration", "checkin", "update", "metrics"}
        assert kinds[0] == "registration" and "checkin" in kinds
        if "update" in kinds:
            senders.add(ledger.parent.name)
    # a Poisson cohort may never draw some device: it sent no update. Every device in a committed
    # round's participants wrote its update down before sending it (a killed one may have sent to a
    # round that then went on without it).
    assert uploaded <= senders, (uploaded, senders)

    # ---- the same rounds, replayed through the simulator -------------------------------------------
    from safetensors.torch import load as st_load

    from pocketfed.config import load_config
    from pocketfed.server import checkpoint
    from pocketfed.simulate import simulate

    final = st_load((db / "blobs" / versions[-1][3][:2] / versions[-1][3]).read_bytes())
    cfg = load_config(None, {**CONFIG, "data": {**CONFIG["data"], "dataset": "textdir", "path": str(tmp_path / "data")},
                             "sim": {**CONFIG["sim"], "devices": 0, "heldout": 0, "threads": 1},
                             "eval": {"every_round": False, "variants": ["federated"]}})
    threads = torch.get_num_threads()
    try:
        simulate(cfg, tmp_path / "sim", participants=participants)
    finally:
        torch.set_num_threads(threads)
    state, _ = checkpoint.load(tmp_path / "sim" / "checkpoint.safetensors")
    assert set(state.params) == set(final)
    worst = max(float((state.params[k] - final[k]).abs().max()) for k in final)
    assert worst <= 1e-6, worst
    assert any(float(v.abs().sum()) > 0 for k, v in final.items() if "lora_B" in k)
