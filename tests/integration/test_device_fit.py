"""Simulations with device budgets on `tiny`: mixed profiles (heterogeneous ranks, a time cap)
that converge, and a diurnal availability pattern with 10 % dropout that reports participation."""

import json

import pytest

from pocketfed.simulate import simulate
from tests.conftest import tiny_config

pytestmark = pytest.mark.integration


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_mixed_profiles_converge_with_heterogeneous_ranks(tmp_path):
    # a watch step of `tiny` costs ~0.8 estimated device seconds: the 1 s cap stops watches after 1 of 2 steps
    cfg = tiny_config(device={"profiles": ["watch", "phone", "car"], "max_round_seconds": 1.0},
                      sim={"devices": 6, "rounds": 3}, eval={"variants": ["base", "federated"]})
    result = simulate(cfg, tmp_path / "mixed")
    history = rows(tmp_path / "mixed")
    ranks = {int(k) for row in history for k in row["ranks"]}
    assert len(ranks) >= 2 and ranks <= {2, 4, 8}
    assert all(row["energy"]["joules_total"] > 0 and row["energy"]["battery_pct_max"] > 0 for row in history)
    if 2 in ranks:
        assert any(row["energy"]["stopped_early"] > 0 for row in history)
    held = [row["heldout"]["perplexity"] for row in history]
    assert held[-1] < held[0] < result.summary["base"]["heldout"]["perplexity"]


def test_diurnal_availability_and_dropout_report_participation(tmp_path):
    cfg = tiny_config(device={"availability": "diurnal", "start_hour": 2.0, "hours_per_round": 6.0, "dropout": 0.1},
                      sim={"devices": 8, "rounds": 4}, eval={"variants": ["federated"]})
    simulate(cfg, tmp_path / "day")
    history = rows(tmp_path / "day")
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    for r in history:
        p = r["participation"]
        assert p["sampled"] == 8 and p["eligible"] + sum(p["ineligible"].values()) == 8
        assert p["trained"] + p["dropouts"] == p["eligible"] and len(r["devices"]) == p["trained"]
        assert (r["train_loss"] is None) == (p["trained"] == 0)
    eligible = [r["participation"]["eligible"] for r in history]  # 02:00, 08:00, 14:00, 20:00
    assert eligible[0] > eligible[2]
    assert json.loads((tmp_path / "day" / "summary.json").read_text())["federated"]["perplexity"] > 0
