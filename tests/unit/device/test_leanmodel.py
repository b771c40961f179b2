"""The lean device model against transformers + PEFT on `tiny`: same logits, same adapter keys and
init, same LoRA forward, same state after one optimizer step; and its process imports neither."""

import json
import subprocess
import sys

import torch

from pocketfed.config import LoraConfig
from pocketfed.device import leanmodel
from pocketfed.device.lowmem import Precision
from pocketfed.device.task import peft_loss
from pocketfed.model import lora
from pocketfed.model.zoo import resolve

TARGETS = ["q_proj", "v_proj", "down_proj"]
CFG = LoraConfig(rank=4, alpha=8.0, target_modules=TARGETS)


def padded_batch():
    """Three rows of 20 tokens; two are right-padded (as data.federated.to_blocks pads)."""
    ids = torch.randint(3, 40000, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 12:] = False
    mask[2, 5:] = False
    return ids.masked_fill(~mask, 2), mask


def both(seed=0):
    """(PEFT model, lean model) of `tiny`, LoRA attached to both under `seed`, B made non-zero alike."""
    from pocketfed.model.zoo import load_base

    peft_model = lora.attach(load_base("tiny").model, CFG, seed)
    lean = leanmodel.load(resolve("tiny")[0], Precision.fp32)
    leanmodel.attach_lora(lean, CFG.rank, CFG.alpha, TARGETS, seed)
    state = lora.get_state(peft_model)
    g = torch.Generator().manual_seed(1)
    state = {k: (torch.randn(v.shape, generator=g) * 0.05 if ".lora_B." in k else v) for k, v in state.items()}
    lora.set_state(peft_model, state)
    leanmodel.set_adapter_state(lean, state)
    return peft_model, lean


def test_logits_equal_transformers_on_a_padded_batch(tiny_base):
    ids, mask = padded_batch()
    lean = leanmodel.load(resolve("tiny")[0], Precision.fp32)
    with torch.no_grad():
        ref = tiny_base.model(input_ids=ids, attention_mask=mask.long()).logits
        got = lean(ids, mask)
        assert (got - ref).abs().max() <= 1e-5
        assert (lean(ids) - tiny_base.model(input_ids=ids).logits).abs().max() <= 1e-5
        ref_loss = tiny_base.model(input_ids=ids, attention_mask=mask.long(), labels=ids.masked_fill(~mask, -100)).loss
        assert abs(lean.loss(ids, mask) - ref_loss) <= 1e-5


def test_bf16_and_int8_bases_compute_what_fp32_does():
    folder = resolve("tiny")[0]
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = leanmodel.load(folder, Precision.fp32)(ids, mask)
        for prec in (Precision.bf16, Precision.int8):
            got = leanmodel.load(folder, prec)(ids, mask).float()
            assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_adapter_keys_and_init_are_pefts(tiny_base):
    peft_model = lora.attach(tiny_base.model, CFG, seed=7)
    lean = leanmodel.load(resolve("tiny")[0], Precision.fp32)
    leanmodel.attach_lora(lean, CFG.rank, CFG.alpha, TARGETS, seed=7)
    ref, got = lora.get_state(peft_model), leanmodel.adapter_state(lean)
    assert list(got) == list(ref)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in got
    assert all(torch.equal(got[k], ref[k]) for k in ref)  # same draws: A kaiming-uniform, B zero
    assert all(not v.any() for k, v in got.items() if ".lora_B." in k)


def test_lora_forward_with_a_nonzero_adapter_equals_pefts():
    peft_model, lean = both()
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = peft_model(input_ids=ids, attention_mask=mask.long()).logits
        got = lean(ids, mask)
        assert (got - ref).abs().max() <= 1e-5
        leanmodel.set_adapter_state(lean, {k: torch.zeros_like(v) for k, v in leanmodel.adapter_state(lean).items()})
        assert (got - lean(ids, mask)).abs().max() > 1e-3  # the adapter does act


def test_one_optimizer_step_gives_pefts_adapter():
    """Same init, same batch, one AdamW step on each path (torch.optim on PEFT's, the lean AdamW on the
    lean one), checkpointing on for the lean model: the states agree within 1e-6 absolute (float32
    sums in another order; measured here: ~1e-8)."""
    peft_model, lean = both()
    ids, mask = padded_batch()
    lean.checkpointing = True
    peft_model.train()
    lean.train()
    for model, loss_fn, opt_cls in ((peft_model, lambda: peft_loss(peft_model, ids, mask), torch.optim.AdamW),
                                    (lean, lambda: lean.loss(ids, mask), leanmodel.AdamW)):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = opt_cls(params, lr=1e-2, weight_decay=0.01)
        loss_fn().backward()
        opt.step()
    ref, got = lora.get_state(peft_model), leanmodel.adapter_state(lean)
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) <= 1e-6
    assert any((got[k] != 0).any() for k in got if ".lora_B." in k)


def test_lean_adamw_is_torchs_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    p1 = torch.randn(5, 7, generator=g).requires_grad_()
    p2 = p1.detach().clone().requires_grad_()
    o1, o2 = torch.optim.AdamW([p1], lr=1e-3, weight_decay=0.01), leanmodel.AdamW([p2], lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        grad = torch.randn(5, 7, generator=g)
        p1.grad, p2.grad = grad.clone(), grad.clone()
        o1.step()
        o2.step()
    assert torch.equal(p1, p2)


def test_checkpointing_changes_no_gradient():
    """fp32: checkpointing switches the loss from chunks of positions to the head streamed over the
    vocabulary (lowmem.head_loss), so float32 rounding may differ; int8: both stream the head, and the
    decoder's rebuilt weights are kept from the recompute for the backward (lowmem.KEEP_REBUILT)
    instead of rebuilt again: the same numbers, so the same gradients bit for bit."""
    ids, mask = padded_batch()
    for precision in (Precision.fp32, Precision.int8):
        grads = []
        for ckpt in (False, True):
            lean = leanmodel.load(resolve("tiny")[0], precision)
            leanmodel.attach_lora(lean, CFG.rank, CFG.alpha, TARGETS, seed=0)
            g = torch.Generator().manual_seed(1)
            for n, p in lean.named_parameters():
                if "lora_B" in n:
                    p.data = torch.randn(p.shape, generator=g) * 0.05
            lean.checkpointing = ckpt
            lean.train()
            lean.loss(ids, mask).backward()
            grads.append({n: p.grad for n, p in lean.named_parameters() if p.requires_grad})
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * len(TARGETS) * 2  # tiny: 2 layers
        if precision is Precision.int8:
            assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
        else:
            assert all(torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-7) for k in grads[0])


def test_a_device_round_imports_neither_transformers_nor_peft(tmp_path):
    """The whole device round (pocketfed.device.fit on `tiny`) in a fresh process, then its sys.modules.
    torch._dynamo is checked too: torch.optim and torch.utils.checkpoint import it (+80 MB RSS)."""
    ids = tmp_path / "ids.pt"
    torch.save(torch.randint(3, 40000, (600,), generator=torch.Generator().manual_seed(0)), ids)
    code = ("import json, sys; from pocketfed.device import fit; "
            f"fit.main(['--model', 'tiny', '--profile', 'watch', '--tokens', {str(ids)!r}, '--seq-len', '32', '--steps', '1']); "
            "print(json.dumps(sorted(m for m in ('transformers', 'peft', 'torch._dynamo') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120, check=True)
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-2])["path"] == "lean"
    assert json.loads(lines[-1]) == []


def test_streamed_head_loss_hand_checked(monkeypatch):
    """h0 = (1, 0) against W = [[1, 0], [0, 1], [1, 1]], label 0: logits (1, 0, 1),
    loss = log(2e + 1) - 1 = 0.861994; dL/dh0 = (softmax - onehot) W = (-0.155362, 0.577676);
    h1's label is -100: no loss, no gradient. Slices of 2 rows: the last holds one."""
    from pocketfed.device import lowmem

    monkeypatch.setattr(lowmem, "SLICE_ROWS", 2)
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).bfloat16()  # stored narrower, computed in float32
    loss = lowmem.head_loss(h, torch.tensor([0, -100]), w)
    loss.backward()
    assert abs(loss.item() - 0.861994) < 1e-5
    assert torch.allclose(h.grad, torch.tensor([[-0.155362, 0.577676], [0.0, 0.0]]), atol=1e-5)


def test_streamed_head_loss_is_cross_entropy(monkeypatch):
    """Against F.cross_entropy(h W^T) in float64, labels in every slice and ignored ones included."""
    from pocketfed.device import lowmem

    monkeypatch.setattr(lowmem, "SLICE_ROWS", 7)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(23, 6, dtype=torch.float64, generator=g)
    labels = torch.tensor([0, 5, 22, -100, 7, 13, 14, 21, -100, 3])
    ref = torch.nn.functional.cross_entropy(h @ w.T, labels, ignore_index=-100, reduction="sum")
    got = lowmem.head_loss(h, labels, w)
    assert torch.allclose(got, ref, rtol=1e-12)
    (want,) = torch.autograd.grad(ref * 1.7, h)
    (have,) = torch.autograd.grad(got * 1.7, h)
    assert torch.allclose(have, want, rtol=1e-10, atol=1e-12)


def test_swiglu_keeps_two_tensors_and_its_gradients_are_silus():
    """_SwiGLU: silu(gate) * up with gate and up kept, sigmoid recomputed in backward.
    Hand-checked, s = sigmoid(1) = 0.7310586: gate 1, up 3, upstream 2 -> out 3 s = 2.1931757,
    d up = 2 s = 1.4621172, d gate = 2 x 3 x s (1 + (1 - s)) = 5.5660231; gate 0, up 2 -> out 0,
    d up 0, d gate = 1 x 2 x 0.5 = 1."""
    gate = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    up = torch.tensor([3.0, 2.0], dtype=torch.float64, requires_grad=True)
    out = leanmodel._SwiGLU.apply(gate, up)
    out.backward(torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert torch.allclose(out, torch.tensor([2.1931757359, 0.0], dtype=torch.float64))
    assert torch.allclose(up.grad, torch.tensor([1.4621171573, 0.0], dtype=torch.float64))
    assert torch.allclose(gate.grad, torch.tensor([5.5660230712, 1.0], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(leanmodel._SwiGLU.apply, (a, b))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        leanmodel._SwiGLU.apply(a, b)
    assert len(saved) == 2  # gate and up; autograd's silu * up keeps silu(gate) too
