"""Personalization on a device: early stopping on a local validation split, kept only when it wins."""

from __future__ import annotations

import math

import pytest
import torch

from pocketfed.config import LoraConfig, TrainConfig
from pocketfed.data.federated import Blocks, to_blocks
from pocketfed.device import ledger, personal
from pocketfed.device.planner import Backend
from pocketfed.device.task import DeviceModel, wrap_peft
from pocketfed.model import lora
from pocketfed.runtime import home as device_home


def tokens(n: int) -> Blocks:
    return to_blocks(list(range(3, 3 + n)), 8, 0)


@pytest.mark.parametrize("n, fit, val", [(4, 2, 2), (5, 3, 2), (16, 12, 4), (40, 32, 8)])
def test_split_rows_keeps_the_last_fifth_of_the_tokens_for_validation(n: int, fit: int, val: int) -> None:
    a, b = personal.split_rows(tokens(n))  # ceil(n * 0.2) tokens validate, at least 2 each side
    assert (a.num_tokens, b.num_tokens) == (fit, val)
    assert int(b.input_ids[0, 0]) == 3 + fit and b.input_ids.shape[1] == 8  # the last tokens, in rows of 8


def test_split_rows_needs_four_tokens() -> None:
    with pytest.raises(ValueError, match="at least 4 tokens"):
        personal.split_rows(tokens(3))


def test_gain_is_the_relative_drop_of_validation_perplexity() -> None:
    p = personal.Personalized(None, val_loss_global=2.0, val_loss_personal=1.9, steps=4)
    # perplexities e^2.0 = 7.389 and e^1.9 = 6.686: 1 - 6.686 / 7.389 = 0.0952
    assert p.gain == pytest.approx(1 - math.exp(1.9) / math.exp(2.0)) and p.gain == pytest.approx(0.09516, abs=1e-5)
    assert not p.kept


def test_eval_loss_weights_rows_by_their_target_tokens() -> None:
    # row 0: 4 tokens (3 targets), per-row loss 1.0; row 1: 2 tokens (1 target), per-row loss 4.0
    ids = torch.tensor([[1, 5, 5, 5], [4, 5, 0, 0]])
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    model = DeviceModel(torch.nn.Identity(), Backend.peft, {}, lambda i, m: torch.tensor(float(i[0, 0])))
    assert personal.eval_loss(model, Blocks(ids, mask)) == pytest.approx((1.0 * 3 + 4.0 * 1) / 4)  # 1.75, not 2.5


def _tiny(tiny_base) -> tuple[DeviceModel, dict, LoraConfig]:
    cfg = LoraConfig(rank=2, alpha=4.0, target_modules=["q_proj", "v_proj"])
    peft_model = lora.attach(tiny_base.model, cfg, seed=0)
    return wrap_peft(peft_model), lora.get_state(peft_model), cfg


def test_the_personal_adapter_is_kept_when_it_beats_the_global_one(tiny_base) -> None:
    model, global_state, _ = _tiny(tiny_base)
    data = to_blocks([5, 6, 7, 8] * 40, 16, 0)  # a pattern the validation rows share
    out = personal.personalize(model, global_state, data, TrainConfig(batch_size=4, lr=5e-2), seed=0,
                               max_steps=8, eval_every=4)
    assert out.kept and out.val_loss_personal < out.val_loss_global and out.gain > 0 and out.steps in (4, 8)
    assert any(not torch.equal(out.state[k], global_state[k]) for k in global_state)
    assert all(torch.equal(model.params[k], global_state[k]) for k in global_state)  # the model is left global


def test_the_personal_adapter_is_dropped_when_it_does_not_win(tiny_base) -> None:
    model, global_state, _ = _tiny(tiny_base)
    data = to_blocks([5, 6, 7, 8] * 40, 16, 0)
    # lr 0: the adapter never moves, its validation loss never drops below the global one's
    out = personal.personalize(model, global_state, data, TrainConfig(batch_size=4, lr=0.0), seed=0,
                               max_steps=16, eval_every=4, patience=2)
    assert not out.kept and out.gain == 0.0 and out.steps == 0


def test_attack_the_stored_personal_adapter_is_refused_by_the_ledger(tiny_base, tmp_path) -> None:
    model, global_state, cfg = _tiny(tiny_base)
    home = tmp_path / "home"
    folder = personal.write_personal(home, global_state, cfg, {"date": "2026-11-28T10:00:00Z", "gain": 0.1, "release": 3})
    record = device_home.personal_record(home)
    assert record is not None and record["gain"] == 0.1 and record["sha256"] == device_home.sha256_file(
        folder / "adapter_model.safetensors")
    stored = personal.load_personal(home)
    assert stored is not None and set(stored) == set(global_state)
    for kind in ("personal_adapter", "update"):  # whatever kind it is sent as, the door refuses it
        schema = {} if kind == "personal_adapter" else {"other.lora_A.weight": ((2, 64), "float32")}
        with pytest.raises(ledger.EgressRefused):
            ledger.check_and_record(home, "https://server", kind, stored, schema)
    s = ledger.summarize(home)
    assert s.messages == 0 and s.refusals == 2


def test_a_device_training_at_a_lower_rank_personalizes_the_release_first_slots(tiny_base, tmp_path) -> None:
    """HetLoRA: a plan at rank 1 under a rank-2 release. The kept adapter, zero-padded to rank 2 at
    the release's alpha, is the very model the device validated at rank 1 (alpha_r / r = alpha / R)."""
    from tests.unit.runtime.device_home import TASK, adapter_state, signed_release

    from pocketfed.device import ondevice
    from pocketfed.model import rank

    home = tmp_path / "home"
    home.mkdir()
    release = adapter_state(1)  # rank 2, alpha 4 (the device_home's TASK)
    device_home.install_release(home, *signed_release(1, release), TASK)
    low = LoraConfig(rank=1, alpha=rank.alpha_for_rank(4.0, 1, 2), target_modules=["q_proj", "v_proj"])
    peft_model = lora.attach(tiny_base.model, low, seed=0)
    model = wrap_peft(peft_model)
    data = to_blocks([5, 6, 7, 8] * 40, 16, 0)
    out = ondevice.personalize_home(home, model, data)
    assert out["personalized"] and out["rank"] == 1 and out["gain"] > 0, out
    stored = personal.load_personal(home)
    assert stored is not None and rank.rank_of(stored) == 2
    for k, v in stored.items():  # the second slot is zero: nothing of the release's tail is claimed
        assert not v[1:, :].any() if "lora_A" in k else not v[:, 1:].any()
    # each module's weight change, B A alpha / r: the padded rank-2 adapter at alpha 4 changes the
    # model exactly as the rank-1 one did at alpha 2
    for a_key in (k for k in stored if "lora_A" in k):
        b_key = a_key.replace("lora_A", "lora_B")
        padded = stored[b_key] @ stored[a_key] * (4.0 / 2)
        trained = stored[b_key][:, :1] @ stored[a_key][:1, :] * (low.alpha / 1)
        assert torch.allclose(padded, trained, atol=0, rtol=1e-6)
