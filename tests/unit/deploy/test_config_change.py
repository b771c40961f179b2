"""A coordinator restarted with a changed config: safe keys apply, fixed ones refuse with the key,
the stored and the new value; the state folder is never replaced."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest

from pocketfed.config import load_config, to_dict
from pocketfed.errors import UserError
from pocketfed.server import config_change
from pocketfed.server import coordinator as co
from tests.unit.deploy.http_fixtures import init_params

BASE = {"sim": {"rounds": 3, "seed": 0}, "deploy": {"goal": 2, "quorum": 1, "deadline_s": 60.0}}
DP = {"privacy": {"dp": "central", "noise_multiplier": 1.0, "clip_norm": 1.0}}


def start(folder: Path, *overrides: dict) -> co.Coordinator:
    tree: dict = json.loads(json.dumps(BASE))
    for o in overrides:
        for section, values in o.items():
            tree.setdefault(section, {}).update(values)
    return co.open_coordinator(folder, load_config(None, tree), "synthetic", init_params)


def stored_config(folder: Path) -> dict:
    db = sqlite3.connect(folder / "state.sqlite")
    try:
        return json.loads(db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0])
    finally:
        db.close()


def test_safe_keys_change_on_restart_and_are_logged(tmp_path, caplog):
    start(tmp_path).store.close()
    with caplog.at_level(logging.WARNING, logger="pocketfed.server"):
        c = start(tmp_path, {"deploy": {"goal": 3, "quorum": 2, "deadline_s": 120.0},
                             "data": {"min_train_tokens": 64}, "train": {"lr": 0.01}})
    assert (c.cfg.deploy.goal, c.cfg.deploy.quorum, c.cfg.data.min_train_tokens) == (3, 2, 64)
    assert c.store.latest_version().version == 0  # the same state, not a new one
    c.store.close()
    assert "deploy.goal 2 -> 3" in caplog.text and "data.min_train_tokens 512 -> 64" in caplog.text
    assert stored_config(tmp_path)["deploy"]["goal"] == 3  # the next restart compares with the config in force
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pocketfed.server"):
        start(tmp_path, {"deploy": {"goal": 3, "quorum": 2, "deadline_s": 120.0}, "data": {"min_train_tokens": 64},
                         "train": {"lr": 0.01}}).store.close()
    assert "config changed" not in caplog.text


@pytest.mark.parametrize("override, key, old, new", [
    ({"lora": {"rank": 4}}, "lora.rank", 8, 4),
    ({"lora": {"target_modules": ["q_proj"]}}, "lora.target_modules", ["q_proj", "v_proj"], ["q_proj"]),
    ({"server": {"strategy": "fedadam"}}, "server.strategy", "fedavg", "fedadam"),
    ({"privacy": {"clip_norm": 2.0}}, "privacy.clip_norm", 1.0, 2.0),
    ({"model": {"name": "smollm2-135m"}}, "model.name", "tiny", "smollm2-135m"),
])
def test_fixed_keys_refuse_naming_the_key_and_both_values(tmp_path, override, key, old, new):
    first = {"model": {"name": "tiny"}} if key == "model.name" else {}
    start(tmp_path, first).store.close()
    before = stored_config(tmp_path)
    with pytest.raises(UserError) as e:
        start(tmp_path, override)
    assert f"{key} cannot change" in str(e.value)
    assert f"{key}={old!r}" in str(e.value) and f"{key}={new!r}" in str(e.value)
    assert "another --db folder" in str(e.value)
    assert stored_config(tmp_path) == before


def test_under_dp_the_accountants_inputs_are_fixed_too(tmp_path):
    start(tmp_path, DP).store.close()
    with pytest.raises(UserError, match=r"sim.rounds cannot change.*sim.rounds=3.*sim.rounds=5.*privacy accountant"):
        start(tmp_path, DP, {"sim": {"rounds": 5}})
    start(tmp_path, DP, {"deploy": {"goal": 3}, "privacy": {"codec": "float16"}}).store.close()  # safe under DP too


def test_without_dp_more_rounds_may_be_added(tmp_path):
    start(tmp_path).store.close()
    c = start(tmp_path, {"sim": {"rounds": 5}})
    assert c.cfg.sim.rounds == 5
    c.store.close()


def test_changes_and_rules_by_hand():
    a = {"deploy": {"goal": 8, "quorum": 4}, "privacy": {"dp": "none", "codec": "float32"}, "sim": {"rounds": 3}}
    b = {"deploy": {"goal": 3, "quorum": 4}, "privacy": {"dp": "none", "codec": "int8"}, "sim": {"rounds": 9}}
    assert config_change.changes(a, b) == [("deploy.goal", 8, 3), ("privacy.codec", "float32", "int8"), ("sim.rounds", 3, 9)]
    assert config_change.check_restart(a, b, Path("s")) == config_change.changes(a, b)  # all safe without DP
    a_dp = {**a, "privacy": {"dp": "central", "codec": "float32"}}
    b_dp = {**b, "privacy": {"dp": "central", "codec": "int8"}}
    with pytest.raises(UserError, match="sim.rounds"):
        config_change.check_restart(a_dp, b_dp, Path("s"))
    assert [k for k in ("privacy.delta", "privacy.codec", "deploy.goal", "lora.dropout", "lora.alpha")
            if config_change.is_fixed(k, dp=False)] == ["privacy.delta", "lora.alpha"]
    assert to_dict(load_config(None, {}))["deploy"]["goal"] == 8  # the defaults these rules were read against
