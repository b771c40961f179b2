"""Settings only the operator can change are named where they bite: the device's wait says which
key keeps a round from opening; the server logs an aborted round with the keys that decide it."""

from __future__ import annotations

import logging

from pocketfed.config import load_config
from pocketfed.server import coordinator as co
from tests.unit.deploy.http_fixtures import init_params

OK = co.Eligibility(charging=True, idle=True, unmetered=True, free_memory_mb=4096)
NOW = 1000.0


def coordinator(tmp_path, devices: int, **deploy) -> co.Coordinator:
    cfg = load_config(None, {"sim": {"rounds": 3}, "data": {"min_train_tokens": 300},
                             "deploy": {"goal": 2, "quorum": 1, "overselect": 1.0, "deadline_s": 60.0,
                                        "open_registration": True, **deploy}})
    c = co.open_coordinator(tmp_path, cfg, "synthetic", init_params)
    for i in range(devices):
        co.register(c, f"dev{i}", f"key{i}", NOW)
    return c


def test_too_few_devices_names_the_quorum(tmp_path):
    c = coordinator(tmp_path, 1, quorum=2)
    out = co.checkin(c, "dev0", OK, NOW)
    assert isinstance(out, co.Wait) and "deploy.quorum=2; its operator can lower it" in out.reason


def test_an_aborted_round_is_logged_with_the_keys_that_decide_it(tmp_path, caplog):
    c = coordinator(tmp_path, 2, goal=2, quorum=2)
    assert isinstance(co.checkin(c, "dev0", OK, NOW), co.Assignment)  # dev0 takes the task and never uploads
    with caplog.at_level(logging.WARNING, logger="pocketfed.server"):
        co.tick(c, NOW + 61)  # past the deadline with 0 updates, below quorum 2
    assert [r.status for r in c.store.rounds()][:1] == ["aborted"]
    line = next(r.getMessage() for r in caplog.records if "aborted" in r.getMessage())
    assert "below quorum 2" in line and "1 device(s) took the task and sent nothing" in line
    assert "data.min_train_tokens=300" in line and "deploy.quorum=2" in line and "deploy.deadline_s=60" in line
