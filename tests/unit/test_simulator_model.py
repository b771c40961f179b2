"""What the in-process backend trains (pocketfed.transport.shared.simulator_model): the lean Llama on
the simulator's own base tensors, no copy, where the lean model supports the base; the simulator's
PEFT model itself otherwise. Either way the same update as the PEFT model, to float32 rounding."""

import json

import pytest
import torch

from pocketfed.config import LoraConfig, TrainConfig
from pocketfed.data.federated import to_blocks
from pocketfed.device.planner import Backend
from pocketfed.device.task import run_task, wrap_peft
from pocketfed.model import lora
from pocketfed.model.zoo import load_base
from pocketfed.protocol.messages import TrainTask
from pocketfed.transport.shared import simulator_model

LORA = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def tiny():
    base = load_base("tiny")
    return base, lora.attach(base.model, LORA, seed=0)


def test_lean_model_trains_on_the_simulators_own_weights(tiny):
    base, peft = tiny
    dm = simulator_model(peft, base.path, LORA, seed=0)
    assert dm.backend is Backend.lean
    assert set(dm.params) == set(lora.get_state(peft))  # keyed as the global adapter
    own = {p.data_ptr() for n, p in peft.named_parameters() if "lora_" not in n}
    frozen = [p for p in dm.module.parameters() if not p.requires_grad]
    assert frozen and all(p.data_ptr() in own for p in frozen)  # views of the simulator's tensors: no copy


def test_lean_update_equals_the_peft_update(tiny):
    base, peft = tiny
    g = torch.Generator().manual_seed(0)
    data = to_blocks(torch.randint(0, base.model.config.vocab_size, (100,), generator=g).tolist(), 16, pad_id=0)
    start = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in lora.get_state(peft).items()}  # B != 0
    task = TrainTask(0, "d0", start, TrainConfig(steps=2, batch_size=4, lr=5e-3), seed=3)
    lean = run_task(simulator_model(peft, base.path, LORA, seed=0), data, task).update
    reference = run_task(wrap_peft(peft), data, task).update
    assert set(lean) == set(reference)
    # float32 rounding of the two losses, magnified by Adam's first steps (see test_task.py)
    assert max(float((lean[k] - reference[k]).abs().max()) for k in lean) <= 1e-5
    assert max(float(v.abs().max()) for v in lean.values()) > 1e-3  # it trained


def test_other_models_train_in_the_simulators_peft_model(tiny, tmp_path):
    base, peft = tiny
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_act": "gelu_new"}))
    dm = simulator_model(peft, tmp_path, LORA, seed=0)  # a folder the lean Llama refuses
    assert dm.backend is Backend.peft and dm.module is peft
