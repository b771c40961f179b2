"""Crash safety of the coordinator's state: a restart at any point neither loses nor repeats an update."""

from __future__ import annotations

import sqlite3
import time

import pytest
import torch

from pocketfed import codec
from pocketfed.config import load_config
from pocketfed.errors import UserError
from pocketfed.server import coordinator as co
from pocketfed.server.store import Update
from tests.unit.deploy.http_fixtures import SHAPES, init_params, make_coordinator, update

ELIGIBLE = co.Eligibility(True, True, True, 4096)


def _upload(c: co.Coordinator, name: str, scale: float) -> bool:
    co.register(c, name, f"{abs(hash(name)):064x}"[-64:], time.time(), co.enroll(c.store)[0])
    a = co.checkin(c, name, ELIGIBLE, time.time())
    assert isinstance(a, co.Assignment)
    data = update(scale)
    co.receive_chunk(c, a.round_id, name, 0, data, time.time())
    from pocketfed.server.store import sha256_hex

    return co.commit_upload(c, a.round_id, name, len(data), sha256_hex(data), 10, {}, time.time())


def test_restart_between_uploads_and_before_commit(tmp_path):
    c = make_coordinator(tmp_path)
    assert not _upload(c, "a", 0.01)
    c.store.close()
    c = make_coordinator(tmp_path)  # "killed" and restarted
    assert _upload(c, "b", 0.03)  # the goal (2) is reached across the restart
    rounds = c.store.rounds()
    assert rounds[0].status == "committed" and rounds[0].participants == ["a", "b"]
    v1 = c.store.latest_version()
    got = codec.decode(c.store.get_blob(v1.adapter_sha), c.like)
    base = codec.decode(c.store.get_blob(c.store.version(0).adapter_sha), c.like)
    for k in SHAPES:  # FedAvg, equal weights: the mean update, once
        assert torch.allclose(got[k] - base[k], torch.full(SHAPES[k], 0.02), atol=1e-7)


def test_killed_after_the_last_update_row_commits_once_on_restart(tmp_path):
    c = make_coordinator(tmp_path)
    assert not _upload(c, "a", 0.01)
    r = c.store.open_round()
    co.register(c, "b", "b" * 64, time.time(), co.enroll(c.store)[0])
    c.store.assign(r.round_id, "b", time.time())
    blob = c.store.put_blob(update(0.03))
    c.store.add_update(Update(r.round_id, "b", blob, 1, 10, {}, time.time()))  # then SIGKILL before the commit
    c.store.close()
    c = make_coordinator(tmp_path)
    co.tick(c, time.time())
    co.tick(c, time.time())
    c.store.close()
    c = make_coordinator(tmp_path)
    co.tick(c, time.time())
    versions = [c.store.version(v) for v in range(5)]
    assert [v.version for v in versions if v] == [0, 1]
    assert [r.status for r in c.store.rounds()] == ["committed", "open"]


def test_deadline_with_and_without_quorum(tmp_path):
    c = make_coordinator(tmp_path, quorum=1, deadline_s=60.0)
    _upload(c, "a", 0.01)
    co.tick(c, time.time() + 61)  # 1 update >= quorum 1: committed
    assert [r.status for r in c.store.rounds()][:1] == ["committed"]
    co.tick(c, time.time() + 200)  # nobody in the next round: aborted, and a new one opens from version 1
    rounds = c.store.rounds()
    assert [r.status for r in rounds] == ["committed", "aborted", "open"]
    assert rounds[2].base_version == 1 and rounds[2].idx == 1


def test_a_state_from_before_a_new_config_key_still_opens(tmp_path):
    import json

    make_coordinator(tmp_path).store.close()
    db = sqlite3.connect(tmp_path / "state.sqlite")
    stored = json.loads(db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0])
    del stored["deploy"]["open_registration"]  # as a state written before that key existed
    db.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps(stored, sort_keys=True),))
    db.commit()
    db.close()
    make_coordinator(tmp_path).store.close()  # the missing key takes its default: the same run
    make_coordinator(tmp_path, goal=3).store.close()  # a safe key may change (tests/unit/deploy/test_config_change.py)
    cfg = load_config(None, {"sim": {"rounds": 3, "seed": 0}, "lora": {"rank": 4}})
    with pytest.raises(UserError, match="lora.rank cannot change"):
        co.open_coordinator(tmp_path, cfg, "synthetic", init_params)  # a fixed one still refuses
