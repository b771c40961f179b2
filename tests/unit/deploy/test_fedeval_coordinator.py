"""Federated evaluation in the coordinator, on a synthetic adapter (no model): who is drawn, who
gets an evaluation task, what a report may be, the totals the store keeps, and the ledger's kind."""

from __future__ import annotations

import json

import pytest

from pocketfed.config import load_config
from pocketfed.device import ledger
from pocketfed.protocol.fedeval import Sums
from pocketfed.server import coordinator as co
from pocketfed.server import evaluations, sampling
from pocketfed.server.store import sha256_hex
from tests.unit.deploy.http_fixtures import init_params, update

OK = co.Eligibility(charging=True, idle=True, unmetered=True, free_memory_mb=4096)
NOW = 1000.0
NAMES = ["dev0", "dev1", "dev2"]


def key_drawing(q: float, size: int) -> bytes:
    return next(k for i in range(10_000) if len(sampling.poisson_sample(NAMES, q, k := sampling.simulation_key(7, i))) == size)


def coordinator(tmp_path, monkeypatch, drawn: int, **deploy) -> tuple[co.Coordinator, list[str]]:
    """3 devices; training rounds take all 3 (q = 1); evaluations draw `drawn` of them at q = 2/3."""
    key = key_drawing(2 / 3, drawn)
    monkeypatch.setattr(sampling, "fresh_key", lambda: key)
    cfg = load_config(None, {"sim": {"rounds": 2, "seed": 0}, "deploy": {
        "goal": 3, "quorum": 1, "overselect": 1.0, "deadline_s": 60.0, "retry_s": 1.0, "open_registration": True,
        "eval_every": 1, "eval_devices": 2, "eval_max_tokens": 100, "eval_deadline_s": 30.0, **deploy}})
    c = co.open_coordinator(tmp_path, cfg, "synthetic", init_params)
    for name in NAMES:
        co.register(c, name, f"key-{name}", NOW)
    return c, sampling.poisson_sample(NAMES, 2 / 3, key)


def train_round(c: co.Coordinator, now: float) -> None:
    for name in NAMES:
        out = co.checkin(c, name, OK, now)
        assert isinstance(out, co.Assignment) and not out.evaluate
        data = update()
        co.receive_chunk(c, out.round_id, name, 0, data, now)
        co.commit_upload(c, out.round_id, name, len(data), sha256_hex(data), 10, {"train_loss": 1.0}, now)


def test_sampled_devices_evaluate_the_new_version_and_the_store_keeps_the_totals(tmp_path, monkeypatch):
    c, drawn = coordinator(tmp_path, monkeypatch, drawn=2)
    co.tick(c, NOW)
    train_round(c, NOW)
    e = c.store.open_evaluation()
    assert e is not None and e.version == 1 and e.rounds_applied == 1 and e.target == 2 and not e.secure
    assert e.sample_rate == pytest.approx(2 / 3) and c.store.eval_cohort(e.eval_id) == drawn
    rid = evaluations.secagg_id(e.eval_id)
    left_out = next(n for n in NAMES if n not in drawn)
    # the device the draw left out gets the next training round's task, never the evaluation
    out = co.checkin(c, left_out, OK, NOW + 1)
    assert isinstance(out, co.Assignment) and not out.evaluate and out.round_id < evaluations.EVAL_ID_BASE
    with pytest.raises(co.Refused) as refused:
        co.eval_report(c, rid, left_out, Sums(1.0, 1, 0, 1), NOW + 1)
    assert refused.value.code == co.NOT_ASSIGNED
    # the sampled ones get the evaluation first, of version 1
    tasks = {n: co.checkin(c, n, OK, NOW + 1) for n in drawn}
    assert all(isinstance(t, co.Assignment) and t.evaluate and t.round_id == rid and t.version.version == 1
               for t in tasks.values())
    with pytest.raises(co.Refused) as refused:  # more hits than tokens: no honest device sends it
        co.eval_report(c, rid, drawn[0], Sums(3.0, 2, 3, 3), NOW + 2)
    assert refused.value.code == co.INVALID_UPDATE and "top3_hits (3) <= tokens (2)" in refused.value.message
    co.eval_report(c, rid, drawn[0], Sums(6.0, 3, 1, 2), NOW + 2)  # loss 2.0 over 3 tokens
    with pytest.raises(co.Refused) as refused:
        co.eval_report(c, rid, drawn[0], Sums(6.0, 3, 1, 2), NOW + 2)
    assert refused.value.code == co.DUPLICATE
    assert c.store.open_evaluation() is not None  # one of two reported: still open
    again = co.checkin(c, drawn[0], OK, NOW + 2)  # reported: no second evaluation task
    assert not (isinstance(again, co.Assignment) and again.evaluate)
    co.eval_report(c, rid, drawn[1], Sums(0.4, 2, 2, 2), NOW + 3)  # loss 0.2 over 2 tokens: closes it
    rows = c.store.evaluations()
    assert len(rows) == 1
    row = rows[0]
    assert (row["status"], row["version"], row["rounds_applied"], row["devices"], row["sampled"]) == ("done", 1, 1, 2, 2)
    assert row["loss"] == pytest.approx((3 * 2.0 + 2 * 0.2) / 5) and (row["top1"], row["top3"], row["tokens"]) == (0.6, 0.8, 5)
    assert row["closed_at"] == NOW + 3 and row["secure"] is False
    status = co.status(c, NOW + 3)
    assert status["evaluations"] == rows


def test_an_evaluation_closes_at_its_deadline_with_what_came_and_fails_without_reports(tmp_path, monkeypatch):
    c, drawn = coordinator(tmp_path, monkeypatch, drawn=2)
    co.tick(c, NOW)
    train_round(c, NOW)
    e = c.store.open_evaluation()
    assert e is not None
    rid = evaluations.secagg_id(e.eval_id)
    for n in drawn:
        co.checkin(c, n, OK, NOW + 1)
    co.eval_report(c, rid, drawn[0], Sums(5.0, 4, 1, 3), NOW + 2)
    co.tick(c, NOW + 31)  # the deadline: one report is enough in the clear
    row = c.store.evaluations()[-1]
    assert (row["status"], row["devices"], row["loss"], row["reason"]) == ("done", 1, 1.25, "deadline")
    # the next version's evaluation: nobody reports -> failed, nothing released
    train_round(c, NOW + 40)
    co.tick(c, NOW + 40 + 31)
    row = c.store.evaluations()[-1]
    assert row["version"] == 2 and row["status"] == "failed" and row["loss"] is None and "0 reports" in row["reason"]


def test_a_draw_below_the_minimum_closes_at_once(tmp_path, monkeypatch):
    c, drawn = coordinator(tmp_path, monkeypatch, drawn=0)
    co.tick(c, NOW)
    train_round(c, NOW)
    assert c.store.open_evaluation() is None
    row = c.store.evaluations()[-1]
    assert row["status"] == "empty" and row["sampled"] == 0 and "below the 1 an evaluation needs" in row["reason"]


def test_no_evaluation_when_off(tmp_path, monkeypatch):
    c, _ = coordinator(tmp_path, monkeypatch, drawn=2, eval_every=0)
    co.tick(c, NOW)
    train_round(c, NOW)
    assert c.store.evaluations() == [] and c.store.open_evaluation() is None


def test_the_ledger_records_an_eval_report_with_its_schema_and_refuses_anything_else(tmp_path):
    body = ledger.check_and_record(tmp_path, "https://s", ledger.EVAL_REPORT,
                                   {"loss_sum": 6.0, "tokens": 3, "top1_hits": 1, "top3_hits": 2}, {})
    assert json.loads(body) == {"loss_sum": 6.0, "tokens": 3, "top1_hits": 1, "top3_hits": 2, "wire_version": 1}
    line = json.loads((tmp_path / ledger.LEDGER_FILE).read_text().splitlines()[-1])
    assert line["kind"] == "eval_report" and line["eval_report"]["tokens"] == 3 and line["bytes"] == len(body)
    for bad, says in (({"loss_sum": 6.0, "tokens": 3, "top1_hits": 1, "top3_hits": 2, "text": "hi"}, "text"),
                      ({"loss_sum": 6.0, "tokens": 3, "top1_hits": 1, "top3_hits": 4}, "top3_hits (4) <= tokens (3)")):
        with pytest.raises(ledger.EgressRefused, match=r".*" + says.replace("(", r"\(").replace(")", r"\)")):
            ledger.check_and_record(tmp_path, "https://s", ledger.EVAL_REPORT, bad, {})
    assert json.loads((tmp_path / ledger.LEDGER_FILE).read_text().splitlines()[-1])["kind"] == "refusal"
    summary = ledger.summarize(tmp_path)
    assert summary.by_kind["eval_report"] == (1, len(body)) and "evaluation reports" in summary.sentence


def test_a_coordinator_killed_before_opening_the_evaluation_opens_it_on_the_next_tick(tmp_path, monkeypatch):
    import sqlite3

    c, drawn = coordinator(tmp_path, monkeypatch, drawn=2)
    co.tick(c, NOW)
    train_round(c, NOW)
    db = sqlite3.connect(tmp_path / "state.sqlite")  # as if the process died between the commit and the opening
    db.execute("DELETE FROM evaluations")
    db.execute("DELETE FROM eval_cohorts")
    db.commit()
    db.close()
    assert c.store.open_evaluation() is None
    co.tick(c, NOW + 1)
    e = c.store.open_evaluation()
    assert e is not None and e.version == 1 and c.store.eval_cohort(e.eval_id) == drawn
    co.tick(c, NOW + 2)
    assert len(c.store.evaluations()) == 1  # opened once per version


def test_a_device_that_requires_dp_refuses_evaluation_tasks():
    from pocketfed.device import evaluate
    from pocketfed.device.floors import PrivacyFloors

    assert "requires DP" in evaluate.refusal(PrivacyFloors(require_dp=True))  # type: ignore[operator]
    assert evaluate.refusal(PrivacyFloors()) is None


def test_evaluation_tasks_and_reports_over_http(tmp_path):
    from tests.unit.deploy.http_fixtures import OK as WIRE_OK
    from tests.unit.deploy.http_fixtures import app_for, device, make_coordinator
    from pocketfed.device.http_client import ServerRefused

    c = make_coordinator(tmp_path, goal=3, overselect=1.0, eval_every=1, eval_devices=3, eval_max_tokens=64)
    app = app_for(c)
    clients = [device(app, f"dev{i}") for i in range(3)]
    for client in clients:  # round 0: everyone trains
        task = client.checkin(WIRE_OK).task
        assert task is not None and task.evaluate is None
        data = update()
        client.upload(task.round_id, data, task.chunk_bytes)
        client.commit(task.round_id, data, 10, {"train_loss": 1.0})
    replies = [client.checkin(WIRE_OK) for client in clients]
    tasks = [r.task for r in replies]
    assert all(t is not None and t.evaluate is not None and t.round_id >= evaluations.EVAL_ID_BASE for t in tasks)
    assert tasks[0].evaluate.max_tokens == 64 and replies[0].reason == "evaluate"  # type: ignore[union-attr]
    assert tasks[0].release.manifest["version"] == 1  # type: ignore[union-attr]
    rid = tasks[0].round_id  # type: ignore[union-attr]

    def send(client, report: dict, round_id: int = rid) -> None:
        client.eval_report(round_id, json.dumps({**report, "wire_version": 1}).encode())

    good = {"loss_sum": 12.0, "tokens": 6, "top1_hits": 2, "top3_hits": 3}
    for bad, says in (({**good, "tokens": 65}, "at most 64 (deploy.eval_max_tokens)"),
                      ({**good, "top3_hits": 7}, "top3_hits (7) <= tokens (6)")):
        with pytest.raises(ServerRefused) as refused:
            send(clients[0], bad)
        assert (refused.value.status, refused.value.code) == (422, "invalid_update") and says in refused.value.detail
    with pytest.raises(ServerRefused) as refused:  # the wire refuses a field no report has
        send(clients[0], {**good, "text": 1})
    assert (refused.value.status, refused.value.code) == (422, "invalid_request")
    with pytest.raises(ServerRefused) as refused:
        send(clients[0], good, rid + 1)
    assert (refused.value.status, refused.value.code) == (404, "unknown_round")
    send(clients[0], good)
    with pytest.raises(ServerRefused) as refused:
        send(clients[0], good)
    assert (refused.value.status, refused.value.code) == (409, "duplicate_upload")
    send(clients[1], {"loss_sum": 3.0, "tokens": 2, "top1_hits": 1, "top3_hits": 2})
    send(clients[2], {"loss_sum": 0.0, "tokens": 0, "top1_hits": 0, "top3_hits": 0})  # an empty test split
    row = c.store.evaluations()[-1]
    assert row["status"] == "done" and row["devices"] == 3 and row["loss"] == 15.0 / 8 and row["top3"] == 5 / 8
