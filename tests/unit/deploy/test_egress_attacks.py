"""Attacks on what leaves a device and on what the coordinator shows (issue 13, findings 6 and 7).

- a coordinator sends a task below the device's privacy floors (noise multiplier 0 or below the
  floor, an inflated expected cohort under distributed DP, distributed DP without secure
  aggregation): the real device loop refuses it before training, and nothing is uploaded;
- a status request without the operator token, or with a wrong one: 401 and no data;
- under secure aggregation, the commit the server receives carries 0 tokens and no metrics;
- the device's ledger lists its registration (token hashed) and every check-in, and the privacy
  lock reads such a ledger without a false warning.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from pocketfed.config import load_config
from pocketfed.device import agent
from pocketfed.device import task as device_task
from pocketfed.device.floors import PrivacyFloors
from pocketfed.egress import LEDGER_FILE
from pocketfed.privacy import pipeline
from pocketfed.protocol import wire
from pocketfed.protocol.messages import TrainResult
from pocketfed.server import coordinator as co
from pocketfed.server import operator
from tests.unit.deploy.http_fixtures import SHAPES, app_for, device, init_params, make_coordinator


class Stop(Exception):
    """Ends a device loop from its event hook."""


def coordinator(folder: Path, privacy: dict, **deploy) -> co.Coordinator:
    cfg = load_config(None, {"sim": {"rounds": 1, "seed": 0}, "privacy": {"clip_norm": 0.5, **privacy},
                             "deploy": {"goal": 3, "quorum": 2, "overselect": 1.0, "deadline_s": 60.0, "retry_s": 0.2,
                                        "secagg_stage_s": 30.0, **deploy}})
    return co.open_coordinator(folder, cfg, "synthetic", init_params)


def ledger_lines(home: Path) -> list[dict]:
    return [json.loads(x) for x in (home / LEDGER_FILE).read_text().splitlines()]


def run_until_refused(tmp_path: Path, c: co.Coordinator, monkeypatch, floors: PrivacyFloors = PrivacyFloors()):
    """The real device loop against `c` (in process), stopped at its first refused task. -> (home, token, events)."""
    app = app_for(c)
    device(app, "other")  # with this device, the quorum of 2 that a round needs to open
    monkeypatch.setattr(agent.http, "connect", lambda url, ca: TestClient(app))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("private words that never leave this device\n")
    home, token, events = tmp_path / "home", co.enroll(c.store)[0], []

    def hook(kind, info):
        events.append((kind, info))
        if kind == "task_refused":
            raise Stop(info["reason"])

    with pytest.raises(Stop):  # old code: no refusal; it fetched the adapter and went on to train
        agent.run_device("http://127.0.0.1:1", None, tmp_path / "data", home, threads=0, max_wait_s=0.2,
                         on_event=hook, enrollment_token=token, floors=floors)
    return home, token, events


def assert_nothing_uploaded(c: co.Coordinator, home: Path) -> None:
    rounds = c.store.rounds()
    assert rounds and all(c.store.count_updates(r.round_id) == 0 for r in rounds)
    assert not [p for p in (c.store.folder / "uploads").rglob("*") if p.is_file()]  # not even a partial upload
    assert not (home / "releases").exists()  # refused before the adapter download
    kinds = [e["kind"] for e in ledger_lines(home)]
    assert set(kinds) == {"registration", "checkin", "refusal"}, kinds  # no update, metrics or secagg message
    refusal = [e for e in ledger_lines(home) if e["kind"] == "refusal"]
    assert len(refusal) == 1 and refusal[0]["requested_kind"] == "task"


def test_attack_task_with_noise_below_the_device_floor_is_refused_and_nothing_uploaded(tmp_path, monkeypatch):
    c = coordinator(tmp_path / "state", {"dp": "central", "noise_multiplier": 0.1})
    home, _, events = run_until_refused(tmp_path, c, monkeypatch)
    assert "noise multiplier 0.1 is below this device's floor 0.5" in events[-1][1]["reason"]
    assert_nothing_uploaded(c, home)


def test_attack_task_with_zero_noise_claiming_dp_is_refused(tmp_path, monkeypatch):
    c = coordinator(tmp_path / "state", {"dp": "central", "noise_multiplier": 1.0})
    real = wire.PrivacySpec.from_plan
    monkeypatch.setattr(wire.PrivacySpec, "from_plan",
                        staticmethod(lambda plan: real(plan).model_copy(update={"noise_multiplier": 0.0})))
    home, _, events = run_until_refused(tmp_path, c, monkeypatch)
    assert "noise multiplier 0 is below" in events[-1][1]["reason"]
    assert_nothing_uploaded(c, home)


@pytest.mark.parametrize("change, says", [
    ({"expected_devices": 10**6}, "expected cohort 1000000 is above this device's ceiling 1000"),
    ({"secagg": False}, "distributed DP without secure aggregation"),
], ids=["inflated-cohort", "no-secagg"])
def test_attack_distributed_dp_task_with_too_little_noise_share_is_refused(tmp_path, monkeypatch, change, says):
    """Each device adds N(0, (z C / sqrt(n))^2): a server that claims n = 10^6 for 3 devices leaves
    z sqrt(3 / 10^6) ~ 0.0017 z of noise on the sum; one that drops secure aggregation sees each
    device's update with its share alone."""
    c = coordinator(tmp_path / "state", {"dp": "distributed", "secagg": True, "noise_multiplier": 1.0})
    real = wire.PrivacySpec.from_plan
    monkeypatch.setattr(wire.PrivacySpec, "from_plan", staticmethod(lambda plan: real(plan).model_copy(update=change)))
    home, _, events = run_until_refused(tmp_path, c, monkeypatch)
    assert says in events[-1][1]["reason"]
    assert_nothing_uploaded(c, home)


def test_attack_ledger_lists_registration_and_checkins_and_the_lock_does_not_warn(tmp_path, monkeypatch):
    c = coordinator(tmp_path / "state", {"dp": "central", "noise_multiplier": 0.1})
    home, token, _ = run_until_refused(tmp_path, c, monkeypatch)
    reg, checkin = ledger_lines(home)[:2]
    name = (home / agent.NAME).read_text().strip()
    assert reg["kind"] == "registration" and reg["name"] == name and name.startswith("device-")
    assert c.store.device_by_key(reg["public_key"]) == name  # the name and key the server holds
    assert "data" not in name and "notes" not in name  # the data folder's name never leaves
    assert reg["enrollment_token_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in (home / LEDGER_FILE).read_text()
    assert checkin["kind"] == "checkin" and set(checkin["eligibility"]) == {"charging", "idle", "unmetered",
                                                                            "free_memory_mb", "profile"}
    from pocketfed.runtime.privacy_lock import host_id, privacy_lock

    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_text(json.dumps({"format": "gguf-q4_0", "made_on": host_id()}))
    line = privacy_lock(model, home)
    assert "WARNING" not in line and "only registration and check-ins" in line and "1 refused and kept" in line, line


def test_attack_status_without_or_with_a_wrong_token_is_401_and_shows_nothing(tmp_path, monkeypatch):
    c = make_coordinator(tmp_path)
    client = TestClient(app_for(c))
    token_file = tmp_path / operator.TOKEN_FILE
    token = token_file.read_text().strip()
    assert token_file.stat().st_mode & 0o777 == 0o600 and len(token) == 43  # token_urlsafe(32): 256 bits
    compared = []
    real = operator.hmac.compare_digest
    monkeypatch.setattr(operator.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    wrong = token[:-1] + ("A" if token[-1] != "A" else "B")
    for headers in ({}, {"authorization": f"Bearer {wrong}"}, {"authorization": f"Bearer {token[:20]}"},
                    {"authorization": f"Basic {token}"}, {"authorization": token}, {"authorization": "Bearer "},
                    {"authorization": f"Bearer {token}x"}, {"x-pf-key": "00" * 32}):
        resp = client.get("/v1/status", headers=headers)
        assert resp.status_code == 401, (headers, resp.text)
        body = resp.json()
        assert set(body) == {"error", "detail"} and body["error"] in (operator.MISSING, operator.WRONG)
        assert "Bearer" in body["detail"] or "operator token" in body["detail"]
        assert token not in resp.text and "synthetic" not in resp.text  # no model, no rounds, no devices
    assert compared  # the token is compared in constant time
    ok = client.get("/v1/status", headers={"authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and ok.json()["model"] == "synthetic"
    assert operator.load_or_create(tmp_path) == token  # made once: a restart keeps it


def test_operator_token_file_errors_say_what_to_do(tmp_path):
    from pocketfed.errors import UserError

    with pytest.raises(UserError, match="operator.token"):
        operator.read(tmp_path / "missing")
    (tmp_path / "bad").write_text("short\n")
    with pytest.raises(UserError, match="does not hold an operator token"):
        operator.read(tmp_path / "bad")


def test_attack_secagg_commit_carries_no_metrics_and_zero_tokens(tmp_path, monkeypatch):
    """Three real device loops (training replaced by a fixed update) run a secure-aggregation round
    over HTTP; every commit the server receives says 0 tokens and no metrics (old code: the token
    count, the clip bit, and the train loss beside each masked input)."""
    import uvicorn

    from tests.integration.test_http_rounds import free_port

    c = coordinator(tmp_path / "state", {"secagg": True}, quorum=3)  # the round opens with all three registered
    tokens = co.enroll(c.store, 3)
    received: list[tuple[str, int, dict]] = []
    real_commit = co.commit_upload

    def recording_commit(c_, round_id, device_id, size, sha256, num_tokens, metrics, now):
        received.append((device_id, num_tokens, dict(metrics)))
        return real_commit(c_, round_id, device_id, size, sha256, num_tokens, metrics, now)

    monkeypatch.setattr(co, "commit_upload", recording_commit)
    no_model = SimpleNamespace(backend=SimpleNamespace(value="none (training replaced)"))
    monkeypatch.setattr(agent, "open_session", lambda task, data, device_id, profile: agent.Session(
        no_model, None, None, agent.session_key(task)))  # type: ignore[arg-type]

    def fake_run_task(model, train, task):  # a fixed update through the real privacy pipeline
        update = {k: torch.full(s, 0.01) for k, s in SHAPES.items()}
        return TrainResult(task.round, task.device_id, update, 123, {"train_loss": 2.5, "steps": 2.0},
                           pipeline.device_privatize(update, task.privacy))

    monkeypatch.setattr(device_task, "run_task", fake_run_task)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app_for(c), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    errors: list[BaseException] = []

    def one_device(i: int) -> None:
        (tmp_path / f"data{i}").mkdir()
        (tmp_path / f"data{i}" / "notes.txt").write_text("words\n")
        try:
            agent.run_device(f"http://127.0.0.1:{port}", None, tmp_path / f"data{i}", tmp_path / f"home{i}",
                             threads=0, max_rounds=1, patience_s=30, max_wait_s=0.2, enrollment_token=tokens[i])
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=one_device, args=(i,), daemon=True) for i in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        server.should_exit = True
    assert not errors, errors
    assert c.store.rounds()[0].status == "committed", c.store.rounds()[0]
    assert len(received) == 3 and all(tokens_ == 0 and metrics == {} for _, tokens_, metrics in received), received
    for i in range(3):  # nothing per device left in the clear: no metrics message in any ledger
        kinds = {e["kind"] for e in ledger_lines(tmp_path / f"home{i}")}
        assert "metrics" not in kinds and {"registration", "checkin", "masked_update"} <= kinds, kinds


def test_without_secagg_a_commit_must_still_report_its_tokens(tmp_path):
    """Only secure aggregation drops the token count (the plain mean is weighted by it): 0 tokens
    without it is refused, and the state is unchanged."""
    from tests.unit.deploy.http_fixtures import OK, refused, snapshot, update

    c = make_coordinator(tmp_path)
    a = device(app_for(c), "a")
    task = a.checkin(OK).task
    assert task is not None
    data = update()
    a.upload(task.round_id, data, 4096)
    before = snapshot(tmp_path)
    refused(lambda: a.commit(task.round_id, data, 0, {}), 422, "invalid_update")
    assert snapshot(tmp_path) == before
    assert not a.commit(task.round_id, data, 10, {}).round_closed  # goal 2: one update in
