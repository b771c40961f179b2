"""Malicious devices in a simulation on `tiny` (`attack.*`), and the round engine's defenses at work."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pocketfed.simulate import simulate
from tests.conftest import tiny_config

pytestmark = pytest.mark.integration
SMALL = {"eval": {"variants": ["federated"]}, "train": {"steps": 1, "batch_size": 4, "lr": 5e-3}}


def run(tmp_path, name, attack, server=None, rounds=2):
    out = tmp_path / name
    cfg = tiny_config(**SMALL, sim={"devices": 4, "heldout": 1, "rounds": rounds}, attack=attack, server=server or {})
    return out, simulate(cfg, out)


def test_attack_nonfinite_updates_are_bounded_or_refused_and_training_goes_on(tmp_path):
    out, result = run(tmp_path, "nonfinite", {"kind": "nonfinite", "fraction": 0.25}, rounds=2)
    evil = result.summary["attack"]["devices"]
    assert len(evil) == 1 and result.summary["attack"]["kind"] == "nonfinite"
    first, second = result.history
    # round 0: all 3e38 (finite): clipped to 3 x the median norm; round 1: NaN / Inf: refused with the reason
    assert first["defense"]["clipped"] == 1 and first["defense"]["refused"] == [] and not first.get("skipped")
    assert second["defense"]["refused"] == [{"device": evil[0], "reason": second["defense"]["refused"][0]["reason"]}]
    assert "NaN or Inf" in second["defense"]["refused"][0]["reason"] and not second.get("skipped")
    assert all(r["update_norm"] <= r["defense"]["norm_bound"] + 1e-6 for r in result.history if r["defense"]["norm_bound"])
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert all(r["heldout"]["perplexity"] < 1e6 for r in result.history)  # tiny's base is ~5e4
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["attack"]["backdoor_success"]) == 2 and (out / "report.png").stat().st_size > 10_000


def test_attack_boosted_replacement_is_bounded_by_the_median_norm(tmp_path):
    attack = {"kind": "model_replacement", "fraction": 0.25, "boost": 50.0}
    _, off = run(tmp_path, "off", attack, {"median_norm_bound": 0.0}, rounds=1)
    _, on = run(tmp_path, "on", attack, rounds=1)
    assert "defense" not in off.history[0]  # nothing bounded the boosted update
    assert on.history[0]["defense"]["clipped"] == 1
    # the boosted update (x50) dominates the undefended mean; bounded, it weighs at most 3 honest ones
    assert on.history[0]["update_norm"] <= on.history[0]["defense"]["norm_bound"] < off.history[0]["update_norm"] / 3
