"""The console's views: stage timings and round accounting (hand-checked), simulation run folders."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from pocketfed.console import views


def _round(opened=100.0, closed=None, metrics=None):
    return SimpleNamespace(opened_at=opened, closed_at=closed, metrics=metrics)


def test_stages_of_a_plain_round():
    # opened 100, first task 102.5, last update 110, closed 111, commit took 0.25 s
    act = {"first_assigned": 102.5, "last_update": 110.0}
    got = views._stages(_round(closed=111.0, metrics={"commit_seconds": 0.25}), act, {}, now=500.0)
    assert got == [["draw to first task", 2.5], ["training and uploads", 7.5], ["wait for goal or deadline", 1.0],
                   ["commit (aggregate, apply, write)", 0.25]]
    # still open, no upload yet: only the stage that has both ends
    assert views._stages(_round(), {"first_assigned": 101.0}, {}, now=130.0) == [["draw to first task", 1.0]]


def test_stages_of_a_secure_aggregation_round():
    marks = {"open": 100.0, "advertise": 100.0, "share": 104.0, "masked": 105.5, "consistency": 112.0, "unmask": 113.0}
    got = views._stages(_round(closed=116.0), {}, marks, now=999.0)
    assert got == [["advertise", 4.0], ["share", 1.5], ["masked", 6.5], ["consistency", 1.0], ["unmask", 3.0]]
    # the running stage counts up to now
    assert views._stages(_round(), {}, {"advertise": 100.0, "share": 103.0}, now=110.0) == [["advertise", 3.0], ["share", 7.0]]


def test_run_view_reads_a_simulation_run(tmp_path):
    run = tmp_path / "fedavg"
    run.mkdir()
    rows = [{"round": 0, "devices": ["a", "b", "c"], "tokens": 90, "train_loss": 4.0, "bytes_up_per_device": 1000,
             "heldout": {"perplexity": 54.59815003314423, "top3": 0.25}, "privacy": {"epsilon_recipients": 1.5}},
            {"round": 1, "devices": ["a", "b"], "tokens": 60, "train_loss": 3.5, "bytes_up_per_device": 1000}]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n{\"round\": 2, \"devi")  # a line being written
    (run / "config.yaml").write_text("server: {strategy: fedavg}\nprivacy: {dp: central, noise_multiplier: 1.1}\n")
    (tmp_path / "empty").mkdir()
    assert views.run_folders(tmp_path) == [run] and views.run_folders(run) == [run]
    v = views.run_view(run)
    assert [r["round"] for r in v["rows"]] == [0, 1]  # the half-written last line is left for the next poll
    assert [r["bytes_up"] for r in v["rows"]] == [3000, 2000]  # per device x devices
    assert v["rows"][0]["heldout_loss"] == pytest.approx(4.0)  # log(e^4)
    assert v["rows"][0]["epsilon_recipients"] == 1.5 and v["rows"][1]["epsilon_recipients"] is None
    assert v["settings"]["dp"] == "central" and v["settings"]["noise_multiplier"] == 1.1 and v["summary"] is None
    assert views.runs(tmp_path)["stamp"] == "fedavg=2"
