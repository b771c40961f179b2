"""The simulator's model (pocketfed.transport.shared.load_simulator): the lean Llama and the
`tokenizers` library where the lean model supports the base, transformers + PEFT otherwise. Either
way the same adapter, tokens, logits and update as transformers + PEFT, to float32 rounding; on the
lean path `pocketfed simulate` runs its rounds without importing transformers, PEFT or dp-accounting."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from pocketfed.config import LoraConfig, TrainConfig
from pocketfed.data.federated import to_blocks
from pocketfed.device.planner import Backend
from pocketfed.device.task import run_task, wrap_peft
from pocketfed.evaluation import evaluate
from pocketfed.model import lora
from pocketfed.model.zoo import load_base
from pocketfed.protocol.messages import TrainTask
from pocketfed.transport.shared import load_simulator

LORA = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def tiny():
    base = load_base("tiny")
    return base, lora.attach(base.model, LORA, seed=0)


def test_the_lean_simulator_model_is_the_peft_model(tiny):
    base, peft = tiny
    sim = load_simulator("tiny", "", LORA, seed=0)
    assert sim.model.backend is Backend.lean and sim.model_id == base.model_id and sim.path == base.path
    reference = lora.get_state(peft)
    state = sim.model.get_state()
    assert set(state) == set(reference)  # keyed as the global adapter
    assert all(torch.equal(state[k], reference[k]) for k in state)  # the same A draws under the seed
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
    assert sim.tokenizer(text)["input_ids"] == base.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert sim.tokenizer.pad_token_id == base.tokenizer.pad_token_id
    g = torch.Generator().manual_seed(0)
    blocks = [to_blocks(torch.randint(0, base.model.config.vocab_size, (200,), generator=g).tolist(), 16, pad_id=0)]
    ours, theirs = evaluate(sim.model, blocks), evaluate(wrap_peft(peft), blocks)
    assert ours.tokens == theirs.tokens and ours.perplexity == pytest.approx(theirs.perplexity, rel=1e-5)


def test_lean_update_equals_the_peft_update(tiny):
    base, peft = tiny
    g = torch.Generator().manual_seed(0)
    data = to_blocks(torch.randint(0, base.model.config.vocab_size, (100,), generator=g).tolist(), 16, pad_id=0)
    start = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in lora.get_state(peft).items()}  # B != 0
    task = TrainTask(0, "d0", start, TrainConfig(steps=2, batch_size=4, lr=5e-3), seed=3)
    lean = run_task(load_simulator("tiny", "", LORA, seed=0).model, data, task).update
    reference = run_task(wrap_peft(peft), data, task).update
    assert set(lean) == set(reference)
    # float32 rounding of the two losses, magnified by Adam's first steps (see test_task.py)
    assert max(float((lean[k] - reference[k]).abs().max()) for k in lean) <= 1e-5
    assert max(float(v.abs().max()) for v in lean.values()) > 1e-3  # it trained


def test_other_models_load_in_transformers_and_peft(tiny, tmp_path):
    base, _ = tiny
    folder = tmp_path / "gelu-llama"
    shutil.copytree(base.path, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))  # the lean Llama has SiLU only
    sim = load_simulator(str(folder), "", LORA, seed=0)
    assert sim.model.backend is Backend.peft and hasattr(sim.model.module, "peft_config")
    assert sim.model_id.startswith("gelu-llama@")


def test_simulate_runs_its_rounds_without_transformers_peft_or_dp_accounting(tmp_path):
    """In a fresh interpreter (the test runner has them all imported): which of the three heavy
    libraries are loaded when each round ends, and that the adapter folder is PEFT's at the end."""
    load_base("tiny")  # the model's cache exists before the child starts (making it needs transformers)
    script = f"""
import json, sys
from pocketfed.config import load_config
from pocketfed.simulate import simulate
seen = []
cfg = load_config(None, {{"model": {{"name": "tiny"}}, "data": {{"seq_len": 32}},
                          "train": {{"steps": 1, "batch_size": 2}},
                          "sim": {{"rounds": 2, "devices": 4, "per_round": 2, "heldout": 2}},
                          "eval": {{"variants": ["base", "federated"], "every_round": True}}}})
simulate(cfg, __import__("pathlib").Path({str(tmp_path / "run")!r}),
         on_event=lambda kind, info: seen.append(sorted(m for m in ("transformers", "peft", "dp_accounting")
                                                        if m in sys.modules)) if kind == "round_end" else None)
print(json.dumps(seen))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], []]
    from peft import PeftConfig

    adapter = tmp_path / "run" / "adapter"
    assert PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path == "tiny"  # loading it: test_simulate.py
