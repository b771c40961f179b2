"""End-to-end simulation on the `tiny` model: outputs, determinism, resume."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from pocketfed.config import VARIANTS
from pocketfed.server import round as engine
from pocketfed.server import sampling
from pocketfed.simulate import simulate
from tests.conftest import tiny_config

pytestmark = pytest.mark.integration


def adapter_bytes(run):
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    out = tmp_path_factory.mktemp("a")
    result = simulate(tiny_config(sim={"rounds": 3}), out)
    return out, result


def test_outputs(run_a, tiny_base):
    out, result = run_a
    summary = json.loads((out / "summary.json").read_text())
    for v in VARIANTS:
        assert set(summary[v]) >= {"perplexity", "top1", "top3"}
    assert summary["bytes_up_per_device_round"] > 0 and summary["wall_seconds"] > 0
    assert summary["federated"]["heldout"]["perplexity"] > 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0, 1, 2]
    assert (out / "report.png").stat().st_size > 10_000
    assert (out / "config.yaml").is_file()
    # The adapter loads with PEFT on the base model and holds the final global state.
    peft_model = PeftModel.from_pretrained(tiny_base.model, out / "adapter")
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    peft_model.unload()


def test_per_device_results(run_a):
    """summary.json's per_device: base / federated / personalized for every trained device, pooling
    back to the variants' figures; a device that did not keep its personal adapter scores exactly as
    the global model; the share made worse counts what the table shows."""
    import math

    out, _ = run_a
    summary = json.loads((out / "summary.json").read_text())
    trained = {d for line in (out / "metrics.jsonl").read_text().splitlines() for d in json.loads(line)["devices"]}
    per = summary["per_device"]
    assert set(per) == trained and len(trained) == summary["devices"]["trained"]
    for name in ("base", "federated", "personalized"):
        n = sum(r[name]["tokens"] for r in per.values())
        ppl = math.exp(sum(math.log(r[name]["perplexity"]) * r[name]["tokens"] for r in per.values()) / n)
        assert ppl == pytest.approx(summary[name]["perplexity"], rel=1e-9)
    for r in per.values():
        assert r["personalized"]["kept"] == (r["personalized"]["val_loss_personal"] < r["personalized"]["val_loss_global"])
        if not r["personalized"]["kept"]:
            assert r["personalized"]["perplexity"] == r["federated"]["perplexity"]
    worse = sorted(d for d, r in per.items() if r["personalized"]["perplexity"] > r["federated"]["perplexity"])
    p = summary["personalization"]
    assert p["worse"] == worse and p["worse_share"] == len(worse) / len(per)
    assert p["kept"] == sum(r["personalized"]["kept"] for r in per.values())


def test_same_seed_same_bits(run_a, tmp_path):
    out, _ = run_a
    simulate(tiny_config(sim={"rounds": 3}), tmp_path / "b")
    assert adapter_bytes(tmp_path / "b") == adapter_bytes(out)


def test_resume_equals_uninterrupted(run_a, tmp_path):
    out, _ = run_a
    part = tmp_path / "r"
    simulate(tiny_config(sim={"rounds": 1}), part)  # "killed" after round 1...
    cfg = tiny_config(sim={"rounds": 3})
    # ...then resumed with the full plan: the rounds already done are not redone.
    import yaml

    from pocketfed.config import to_dict
    from pocketfed.server import checkpoint

    state, extra = checkpoint.load(part / "checkpoint.safetensors")
    extra["config"] = to_dict(cfg)  # the resumed run continues the same plan to 3 rounds
    checkpoint.save(part / "checkpoint.safetensors", state, extra)
    (part / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    simulate(cfg, part, resume=True)
    assert adapter_bytes(part) == adapter_bytes(out)
    assert [json.loads(x)["round"] for x in (part / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_sampling_is_explicit_and_per_round():
    pool = [f"d{i}" for i in range(20)]
    a = engine.sample_cohort(pool, 5, sampling.simulation_key(3, 4))  # Poisson at q = 5 / 20
    assert a == engine.sample_cohort(pool, 5, sampling.simulation_key(3, 4)) and a.sample_rate == 0.25
    assert a.devices != engine.sample_cohort(pool, 5, sampling.simulation_key(3, 5)).devices


def test_fedadam_run_moves_and_improves(tmp_path):
    cfg = tiny_config(server={"strategy": "fedadam", "lr": 1e-2}, sim={"rounds": 2}, eval={"variants": ["base", "federated"]})
    result = simulate(cfg, tmp_path / "adam")
    s = result.summary
    assert s["federated"]["heldout"]["perplexity"] < s["base"]["heldout"]["perplexity"]
    assert torch.isfinite(torch.tensor(s["federated"]["perplexity"]))


def test_dp_run_reports_epsilon_and_stops_at_budget(tmp_path):
    from pocketfed.privacy import accountant

    # A fixed noise multiplier and a budget that two rounds overspend: the run stops after one.
    eps1 = accountant.epsilon(0.8, 1.0, 1, 1e-5)
    eps2 = accountant.epsilon(0.8, 1.0, 2, 1e-5)
    budget = (eps1 + eps2) / 2
    cfg = tiny_config(privacy={"dp": "central", "noise_multiplier": 0.8, "clip_norm": 0.1, "delta": 1e-5,
                               "target_epsilon": budget}, sim={"rounds": 3}, eval={"variants": ["base", "federated"]})
    result = simulate(cfg, tmp_path / "dp")
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert summary["privacy"]["rounds"] == 1 and summary["privacy"]["epsilon_recipients"] == pytest.approx(eps1)
    assert summary["privacy"]["epsilon_recipients"] <= budget
    assert summary["privacy"]["epsilon_coordinator"] is None  # central DP: the coordinator sees each update
    assert [row["privacy"]["epsilon_recipients"] for row in result.history] == [pytest.approx(eps1)]


def test_secagg_with_distributed_dp_runs(tmp_path):
    cfg = tiny_config(privacy={"dp": "distributed", "secagg": True, "noise_multiplier": 0.5, "clip_norm": 0.1},
                      sim={"rounds": 1}, eval={"variants": ["federated"]})
    s = simulate(cfg, tmp_path / "sa").summary
    assert s["privacy"]["epsilon_recipients"] > 0 and s["bytes_up_per_device_round"] > 0
    assert s["privacy"]["epsilon_coordinator"] >= s["privacy"]["epsilon_recipients"]  # no amplification


def test_attack_distributed_dropouts_are_accounted_in_the_simulator(tmp_path):
    """Devices that drop out take their noise shares with them: the simulator's reported epsilon is
    dp-accounting's for z sqrt(m / n) per round (the old ledger reported the nominal z)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    z, n = 1.0, 4
    cfg = tiny_config(privacy={"dp": "distributed", "secagg": True, "noise_multiplier": z, "clip_norm": 0.1},
                      sim={"rounds": 3, "seed": 2}, device={"dropout": 0.3}, eval={"variants": ["federated"]})
    result = simulate(cfg, tmp_path / "drop")
    survivors = [len(row["devices"]) for row in result.history]
    assert survivors == [4, 2, 3]  # seed 2: 2 then 1 of the 4 drop out (a secure sum needs 2 or more)

    def direct(noise: list[float]) -> float:
        acct = RdpAccountant()
        for row, zr in zip(result.history, noise):
            acct.compose(dp_accounting.PoissonSampledDpEvent(row["sample_rate"], dp_accounting.GaussianDpEvent(zr)))
        return float(acct.get_epsilon(1e-6))

    # a round nobody finished releases nothing and is accounted at the nominal z
    truth = direct([z * (m / n) ** 0.5 if m else z for m in survivors])
    assert result.summary["privacy"]["epsilon_recipients"] == pytest.approx(truth, rel=0.01)
    assert result.summary["privacy"]["epsilon_recipients"] > 1.01 * direct([z] * len(survivors))


def test_a_model_the_lean_llama_refuses_simulates_in_transformers_and_peft(tmp_path, tiny_base):
    """The simulator's fallback (`transport.shared.load_simulator`): a Llama with GELU (the lean Llama has
    SiLU only) runs every variant through transformers + PEFT, and its adapter loads with PEFT."""
    import shutil

    folder = tmp_path / "gelu-llama"
    shutil.copytree(tiny_base.path, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    result = simulate(tiny_config(model={"name": str(folder)}), tmp_path / "run")
    for v in VARIANTS:
        assert result.summary[v]["perplexity"] > 0
    assert result.summary["model"].startswith("gelu-llama@")
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "run" / "adapter")
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    assert peft_model.peft_config["default"].base_model_name_or_path == result.summary["model"]
