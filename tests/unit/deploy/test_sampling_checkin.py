"""Deployment check-in under Poisson sampling: who gets a task, small and empty cohorts, the
participation cap, the q each round is accounted at, and state folders from before sampling."""

from __future__ import annotations

import re
import sqlite3

import pytest

from pocketfed.config import load_config
from pocketfed.privacy import accountant
from pocketfed.server import coordinator as co
from pocketfed.server import sampling
from pocketfed.server.store import Store, sha256_hex
from tests.unit.deploy.http_fixtures import OK as WIRE_OK
from tests.unit.deploy.http_fixtures import app_for, device, init_params, make_coordinator, update

OK = co.Eligibility(charging=True, idle=True, unmetered=True, free_memory_mb=4096)
NOT_CHARGING = co.Eligibility(charging=False, idle=True, unmetered=True, free_memory_mb=4096)
NOW = 1000.0


def coordinator(tmp_path, devices: int, privacy: dict | None = None, **deploy) -> co.Coordinator:
    cfg = load_config(None, {"sim": {"rounds": 3, "seed": 0}, "privacy": privacy or {},
                             "deploy": {"goal": 2, "quorum": 1, "overselect": 1.0, "deadline_s": 60.0, "retry_s": 1.0,
                                        "open_registration": True, **deploy}})
    c = co.open_coordinator(tmp_path, cfg, "synthetic", init_params)
    for i in range(devices):
        co.register(c, f"dev{i}", f"key{i}", NOW)
    return c


def key_drawing(names: list[str], q: float, size: int) -> bytes:
    """A sampling key whose draw at rate q from `names` has `size` devices (found by trying keys)."""
    return next(k for i in range(10_000) if len(sampling.poisson_sample(names, q, k := sampling.simulation_key(99, i))) == size)


def upload(c: co.Coordinator, round_id: int, name: str, now: float) -> bool:
    data = update()
    co.receive_chunk(c, round_id, name, 0, data, now)
    return co.commit_upload(c, round_id, name, len(data), sha256_hex(data), 10, {"train_loss": 1.0}, now)


def test_only_the_sampled_cohort_gets_tasks(tmp_path):
    c = coordinator(tmp_path, 8)  # expected cohort 2 of 8: q = 1/4
    co.tick(c, NOW)
    r = c.store.open_round()
    assert r is not None and r.sample_rate == 0.25
    cohort = c.store.cohort(r.round_id)
    assert r.target == len(cohort) >= 1 and r.goal == 2 and r.sample_key is not None and len(r.sample_key) == 64
    for i in range(8):
        out = co.checkin(c, f"dev{i}", OK, NOW)
        if f"dev{i}" in cohort:
            assert isinstance(out, co.Assignment) and out.round_id == r.round_id
        else:
            assert isinstance(out, co.Wait) and f"not selected for round {r.round_id}" in out.reason
            assert "probability 0.25" in out.reason
    assert c.store.assigned(r.round_id) == cohort


def test_a_device_registered_during_the_round_is_drawn_by_the_same_rule(tmp_path, monkeypatch):
    names = [f"dev{i}" for i in range(4)]
    key = key_drawing(names, 0.5, 2)
    monkeypatch.setattr(sampling, "fresh_key", lambda: key)
    c = coordinator(tmp_path, 4)  # expected 2 of 4: q = 1/2
    co.tick(c, NOW)
    r = c.store.open_round()
    assert r is not None and r.sample_rate == 0.5 and r.target == 2
    late = [f"late{i}" for i in range(12)]
    for name in late:
        co.register(c, name, f"key-{name}", NOW + 1)
    drawn = sampling.poisson_sample(late, 0.5, key)  # U(key, name) < 1/2
    assert 0 < len(drawn) < len(late)
    for name in late:
        assert isinstance(co.checkin(c, name, OK, NOW + 2), co.Assignment) == (name in drawn)
    assert c.store.cohort(r.round_id) == sorted(sampling.poisson_sample(names, 0.5, key) + drawn)
    assert c.store.round(r.round_id).target == 2  # type: ignore[union-attr]  # what was drawn at the opening


def test_a_sampled_device_that_is_not_eligible_sits_out_until_it_is(tmp_path):
    c = coordinator(tmp_path, 3)  # expected 2 of 3
    co.tick(c, NOW)
    r = c.store.open_round()
    assert r is not None and r.sample_rate == pytest.approx(2 / 3)
    name = c.store.cohort(r.round_id)[0]
    out = co.checkin(c, name, NOT_CHARGING, NOW)
    assert isinstance(out, co.Wait) and "charging" in out.reason and not c.store.is_assigned(r.round_id, name)
    assert isinstance(co.checkin(c, name, OK, NOW + 1), co.Assignment)  # eligible now, same round


def test_no_round_opens_until_a_round_could_commit(tmp_path):
    c = coordinator(tmp_path, 1, quorum=2)
    out = co.checkin(c, "dev0", OK, NOW)
    assert isinstance(out, co.Wait) and not out.done and c.store.open_round() is None
    assert "1 devices are registered and a round needs at least 2" in out.reason
    co.register(c, "dev1", "key1", NOW)
    assert isinstance(co.checkin(c, "dev0", OK, NOW), co.Assignment)  # 2 of 2: q = 1
    r = c.store.open_round()
    assert r is not None and r.sample_rate == 1.0 and c.store.cohort(r.round_id) == ["dev0", "dev1"]


def test_a_cohort_below_the_quorum_closes_empty_and_counts_for_the_accountant(tmp_path, monkeypatch):
    names = [f"dev{i}" for i in range(8)]
    monkeypatch.setattr(sampling, "fresh_key", lambda: key_drawing(names, 0.25, 1))  # every draw: 1 device
    z, delta = 1.0, 1e-5
    c = coordinator(tmp_path, 8, {"dp": "central", "noise_multiplier": z, "delta": delta}, quorum=2, population=8)
    out = co.checkin(c, "dev0", OK, NOW)
    assert isinstance(out, co.Wait) and out.done  # 3 rounds, each with a cohort of 1 < quorum 2: all empty
    rounds = c.store.rounds()
    assert [(r.status, r.target, r.sample_rate, r.participants) for r in rounds] == [("empty", 1, 0.25, [])] * 3
    assert "below the 2 a round needs" in (rounds[0].reason or "")
    versions = [c.store.version(v) for v in range(4)]
    assert [v.rounds_applied for v in versions if v] == [0, 1, 2, 3]
    assert len({v.adapter_sha for v in versions if v}) == 1  # the adapter stays
    assert c.privacy is not None and c.privacy.ledger.rounds_done == 3
    assert c.privacy.ledger.epsilon_spent == pytest.approx(accountant.epsilon(z, 0.25, 3, delta))


def test_a_commit_is_accounted_at_the_q_its_cohort_was_drawn_at(tmp_path, monkeypatch):
    """Planned for 8 devices (z calibrated at q = 2/8), but 4 registered: the round's q is 2/4."""
    monkeypatch.setattr(sampling, "fresh_key", lambda: key_drawing([f"dev{i}" for i in range(4)], 0.5, 2))
    z, delta = 1.0, 1e-5
    c = coordinator(tmp_path, 4, {"dp": "central", "noise_multiplier": z, "delta": delta}, population=8)
    assert c.privacy is not None and c.privacy.ledger.sample_rate == 0.25  # the planned rate
    co.tick(c, NOW)
    r = c.store.open_round()
    assert r is not None and r.sample_rate == 0.5 and r.goal == 2
    cohort = c.store.cohort(r.round_id)
    for name in cohort:
        assert isinstance(co.checkin(c, name, OK, NOW), co.Assignment)
    assert [upload(c, r.round_id, name, NOW) for name in cohort] == [False, True]  # the goal: committed
    assert c.store.round(r.round_id).status == "committed"  # type: ignore[union-attr]
    assert c.privacy.ledger.epsilon_spent == pytest.approx(accountant.epsilon(z, 0.5, 1, delta))


def test_the_participation_cap_leaves_devices_out_of_the_frame(tmp_path):
    """2 devices, q = 1, at most 1 participation per 2 rounds: round 0 takes both; round 1's frame
    is empty (an empty round, free of privacy cost); round 2 takes both again."""
    c = coordinator(tmp_path, 2, max_participations=1, participation_window=2)
    co.tick(c, NOW)
    r0 = c.store.open_round()
    assert r0 is not None and c.store.cohort(r0.round_id) == ["dev0", "dev1"]
    for name in ("dev0", "dev1"):
        assert isinstance(co.checkin(c, name, OK, NOW), co.Assignment)
    assert not upload(c, r0.round_id, "dev0", NOW) and upload(c, r0.round_id, "dev1", NOW)  # goal 2: committed
    rounds = c.store.rounds()
    assert [(r.idx, r.status, r.sample_rate, r.target) for r in rounds] == [
        (0, "committed", 1.0, 2), (1, "empty", 0.0, 0), (2, "open", 1.0, 2)]
    assert isinstance(co.checkin(c, "dev0", OK, NOW), co.Assignment)


def test_checkin_over_http_tells_an_unsampled_device_to_wait(tmp_path, monkeypatch):
    c = make_coordinator(tmp_path, goal=1, overselect=1.0)  # expected 1 of 3: q = 1/3
    app = app_for(c)
    clients = {name: device(app, name) for name in ("a", "b", "c")}
    monkeypatch.setattr(sampling, "fresh_key", lambda: key_drawing(["a", "b", "c"], 1 / 3, 1))
    chosen = sampling.poisson_sample(["a", "b", "c"], 1 / 3, sampling.fresh_key())
    outs = {name: client.checkin(WIRE_OK) for name, client in clients.items()}
    for name, out in outs.items():
        if name in chosen:
            assert out.task is not None
        else:
            assert out.task is None and "not selected for round" in out.reason and not out.done


def test_a_state_folder_from_before_sampling_gets_the_sample_rate_column(tmp_path):
    db = sqlite3.connect(tmp_path / "state.sqlite")
    db.execute("CREATE TABLE rounds (round_id INTEGER PRIMARY KEY, idx INTEGER NOT NULL, base_version INTEGER NOT NULL, "
               "status TEXT NOT NULL, opened_at REAL NOT NULL, deadline REAL NOT NULL, goal INTEGER NOT NULL, "
               "target INTEGER NOT NULL, quorum INTEGER NOT NULL, closed_at REAL, reason TEXT, participants TEXT, "
               "metrics TEXT, new_version INTEGER)")
    db.execute("INSERT INTO rounds (idx, base_version, status, opened_at, deadline, goal, target, quorum) "
               "VALUES (0, 0, 'open', 1.0, 2.0, 8, 11, 4)")
    db.commit()
    db.close()
    store = Store(tmp_path)
    r = store.open_round()
    assert r is not None and r.target == 11 and r.sample_rate is None and store.cohort(r.round_id) == []
    rid = store.add_round(1, 0, 3.0, 4.0, 2, 1, 0.5, "ab" * 32, ["x", "y"])
    assert store.round(rid).sample_rate == 0.5 and store.in_cohort(rid, "x") and not store.in_cohort(rid, "z")
    store.close()


@pytest.mark.parametrize("deploy, says", [
    ({"goal": 4, "quorum": 2, "population": 3}, "deploy.population must be 0 (unknown) or at least deploy.goal (4), got 3"),
    ({"max_participations": -1}, "deploy.max_participations must be 0 (no cap) or positive, got -1"),
    ({"max_participations": 1, "participation_window": -2}, "deploy.participation_window must be 0 (the whole run)"),
    ({"participation_window": 5}, "deploy.participation_window needs deploy.max_participations above 0"),
])
def test_sampling_settings_are_checked(deploy, says):
    from pocketfed.errors import UserError

    with pytest.raises(UserError, match=re.escape(says)):
        load_config(None, {"deploy": deploy})
