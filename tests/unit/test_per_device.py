"""Per-device personalization in simulation: the real device's rule (keep the personal adapter only
if it beats the global one on a local validation split) and the share of devices made worse."""

from __future__ import annotations

import torch

from pocketfed.config import LoraConfig, TrainConfig
from pocketfed.data.federated import to_blocks
from pocketfed.device.task import wrap_peft
from pocketfed.model import lora
from pocketfed.per_device import personalization_summary, personalize_or_keep


def test_summary_by_hand():
    m = lambda ppl, **kw: {"perplexity": ppl, "top1": 0.0, "top3": 0.0, "tokens": 10, **kw}  # noqa: E731
    per = {
        "a": {"federated": m(10.0), "personalized": m(9.0, kept=True)},  # better
        "b": {"federated": m(10.0), "personalized": m(11.0, kept=True)},  # kept on validation, worse on test
        "c": {"federated": m(12.0), "personalized": m(12.0, kept=False)},  # kept the global model: equal
        "d": {"base": m(20.0)},  # not scored federated: not counted
    }
    assert personalization_summary(per) == {"devices": 3, "kept": 2, "worse": ["b"], "worse_share": 1 / 3}
    assert personalization_summary({"d": {"base": m(20.0)}}) is None


def rows():
    # one 32-token pattern, 8 rows: the validation rows (the last 2) are what the fit rows teach
    return to_blocks(list(range(100, 132)) * 8, 32, 0)


def test_a_personal_adapter_that_learns_is_kept(tiny_base):
    model = wrap_peft(lora.attach(tiny_base.model, LoraConfig(), seed=0))
    global_state = model.get_state()
    state, info = personalize_or_keep(model, global_state, rows(), TrainConfig(lr=5e-3, batch_size=4), seed=0, steps=8)
    assert info["kept"] and info["val_loss_personal"] < info["val_loss_global"]
    assert any(not torch.equal(state[k], global_state[k]) for k in global_state)


def test_a_personal_adapter_that_does_not_beat_the_global_one_is_dropped(tiny_base):
    """lr 0: training cannot move the adapter, so it cannot beat the global one on validation."""
    model = wrap_peft(lora.attach(tiny_base.model, LoraConfig(), seed=0))
    global_state = model.get_state()
    state, info = personalize_or_keep(model, global_state, rows(), TrainConfig(lr=0.0, batch_size=4), seed=0, steps=4)
    assert not info["kept"] and info["val_loss_personal"] == info["val_loss_global"]
    assert state is global_state
    state, info = personalize_or_keep(model, global_state, to_blocks([100, 101, 102], 32, 0), TrainConfig(), seed=0, steps=8)
    assert not info["kept"] and "personalization needs" in info["reason"] and state is global_state  # too little text
