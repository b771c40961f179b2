"""Sparse back-propagation (`lora.layers`, pocketfed.model.depth) and the float32 compute of the
lean model's low-precision bases (pocketfed.device.lowmem), on `tiny` and on hand-sized shapes.

- the frozen layers below the lowest adapted one keep no graph: no saved tensor is packed while
  they run, their outputs have no grad_fn (lean and transformers + PEFT, with and without checkpointing);
- the adapted layers' gradients equal full-depth training's exactly (sparse back-propagation changes
  no maths), and the lean and PEFT backends give the same keys, init and gradients;
- planner and energy figures hand-checked;
- bf16 / int8 bases train without a single bfloat16 matrix product (the AVX2 slow path).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pocketfed.config import LoraConfig
from pocketfed.device import leanmodel, lowmem
from pocketfed.device.lowmem import Precision
from pocketfed.device.planner import Backend, predict_mb
from pocketfed.device.shape import ModelShape
from pocketfed.device.task import peft_loss
from pocketfed.errors import UserError
from pocketfed.model import depth, lora
from pocketfed.model.zoo import load_base, resolve

TARGETS = ["q_proj", "v_proj", "down_proj"]


def batch():
    ids = torch.randint(3, 40000, (2, 16), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids, dtype=torch.bool)


def lean_model(layers: int, precision: Precision = Precision.fp32, checkpointing: bool = False):
    m = leanmodel.load(resolve("tiny")[0], precision)
    m.checkpointing = checkpointing
    leanmodel.attach_lora(m, 4, 8.0, TARGETS, seed=0, layers=layers)
    return m.train()


def with_b(state: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """The state with every B made non-zero (at init B = 0 and A gets no gradient)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 0.05 if ".lora_B." in k else v) for k, v in state.items()}


def grads(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in params.items()}


def lean_params(m) -> dict[str, torch.nn.Parameter]:
    return {leanmodel.PEFT_PREFIX + n: p for n, p in m.named_parameters() if p.requires_grad}


def test_adapted_layers_and_names():
    assert depth.adapted_layers(0, 30) == list(range(30))
    assert depth.adapted_layers(3, 30) == [27, 28, 29]
    assert depth.adapted_layers(30, 30) == list(range(30))
    for bad in (-1, 31):
        with pytest.raises(UserError, match="lora.layers"):
            depth.adapted_layers(bad, 30)
    names = ["base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight",
             "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight",
             "base_model.model.model.layers.12.self_attn.v_proj.lora_A.weight"]
    assert depth.layers_of(names) == [3, 12]


def test_lean_and_peft_adapt_the_same_top_layers_with_the_same_init():
    peft_model = lora.attach(load_base("tiny").model, LoraConfig(rank=4, alpha=8.0, target_modules=TARGETS, layers=1), 0)
    state = lora.get_state(peft_model)
    assert depth.layers_of(state) == [1] and len(state) == 2 * len(TARGETS)
    lean = lean_params(lean_model(layers=1))
    assert set(lean) == set(state)
    for k, v in state.items():  # same draws in the same module order
        assert torch.equal(lean[k].detach(), v), k
    assert peft_model.peft_config["default"].layers_to_transform == [1]


class SavedInLayer:
    """Counts the tensors autograd saves for backward while each decoder layer runs forward."""

    def __init__(self, layers):
        self.current, self.saved = None, {i: 0 for i in range(len(layers))}
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda _m, _a, i=i: setattr(self, "current", i))
            layer.register_forward_hook(lambda _m, _a, _o: setattr(self, "current", None))

    def pack(self, t):
        if self.current is not None:
            self.saved[self.current] += 1
        return t


@pytest.mark.parametrize("checkpointing", [False, True])
def test_frozen_layers_below_keep_no_graph_lean(checkpointing):
    ids, mask = batch()
    counts = {}
    for layers in (0, 1):
        m = lean_model(layers, checkpointing=checkpointing)
        outputs = {}
        for i, layer in enumerate(m.model.layers):
            layer.register_forward_hook(lambda _m, _a, out, i=i: outputs.setdefault(i, out))
        spy = SavedInLayer(m.model.layers)
        with torch.autograd.graph.saved_tensors_hooks(spy.pack, lambda t: t):
            loss = m.loss(ids, mask)
        counts[layers] = spy.saved
        if layers == 1:
            assert outputs[0].grad_fn is None and not outputs[0].requires_grad  # layer 0 ran without a graph
            assert outputs[1].grad_fn is not None
        loss.backward()  # and backward still reaches the adapted layer
        assert all(p.grad is not None for p in lean_params(m).values())
    assert counts[1][0] == 0  # top-1: layer 0 kept nothing
    if not checkpointing:  # (checkpointed layers pack into their own hooks, unseen here)
        assert counts[0][0] > 0  # full depth keeps layer 0's activations
        # the adapted layer keeps what its LoRA needs; less than at full depth (its input needs no gradient)
        assert 0 < counts[1][1] < counts[0][1]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_frozen_layers_below_keep_no_graph_peft(checkpointing):
    base = load_base("tiny").model
    if checkpointing:  # as task.load_model does, before PEFT (which makes the embeddings require grad)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m = lora.attach(base, LoraConfig(rank=4, alpha=8.0, target_modules=TARGETS, layers=1), 0).train()
    layers = m.base_model.model.model.layers
    spy = SavedInLayer(layers)
    outputs = {}
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda _m, _a, out, i=i: outputs.setdefault(i, out[0] if isinstance(out, tuple) else out))
    ids, mask = batch()
    with torch.autograd.graph.saved_tensors_hooks(spy.pack, lambda t: t):
        loss = peft_loss(m, ids, mask)
    assert outputs[0].grad_fn is None and not outputs[0].requires_grad  # nothing of layer 0 in the loss's graph
    if not checkpointing:  # (torch's checkpoint packs a reference to its input, freed with the graph-less output)
        assert spy.saved[0] == 0
    assert outputs[1].requires_grad
    loss.backward()


@pytest.mark.parametrize("precision,checkpointing", [(Precision.fp32, False), (Precision.int8, True)])
def test_adapted_layers_get_exactly_the_full_depth_gradients(precision, checkpointing):
    """Full depth with the lower layers' B = 0 (as at init) computes the same function as top-1;
    the top layer's LoRA gradients must be bit-for-bit those of sparse back-propagation."""
    ids, mask = batch()
    top = lean_model(1, precision, checkpointing)
    full = lean_model(0, precision, checkpointing)
    full_state = {k: v.detach().clone() for k, v in lean_params(full).items()}
    top_state = with_b({k: v.detach().clone() for k, v in lean_params(top).items()})
    full_state.update(top_state)  # layer 1 as in `top`; layer 0 keeps B = 0
    leanmodel.set_adapter_state(top, top_state)
    leanmodel.set_adapter_state(full, full_state)
    top.loss(ids, mask).backward()
    full.loss(ids, mask).backward()
    g_top, g_full = grads(lean_params(top)), grads(lean_params(full))
    assert set(g_top) < set(g_full)
    for k, g in g_top.items():
        assert torch.equal(g, g_full[k]), k
        assert g.abs().sum() > 0


def test_peft_and_lean_top_layer_gradients_agree():
    ids, mask = batch()
    cfg = LoraConfig(rank=4, alpha=8.0, target_modules=TARGETS, layers=1)
    peft_model = lora.attach(load_base("tiny").model, cfg, 0).train()
    lean = lean_model(1)
    state = with_b(lora.get_state(peft_model))
    lora.set_state(peft_model, state)
    leanmodel.set_adapter_state(lean, state)
    peft_loss(peft_model, ids, mask).backward()
    lean.loss(ids, mask).backward()
    peft_grads = {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for k, g in grads(lean_params(lean)).items():
        assert torch.allclose(g, peft_grads[k], atol=1e-6, rtol=1e-4), k


# A hand-sized shape: h 8, i 16, 4 layers, 2 heads of 4 (q 8), 1 kv head (kv 4), vocab 32, untied.
SHAPE = ModelShape(vocab=32, hidden=8, intermediate=16, layers=4, heads=2, kv_heads=1, head_dim=4, tied=False)


def test_flops_per_token_hand_checked():
    # per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 + gate 8x16 + up 8x16 + down 16x8 = 64+32+32+64+384 = 576
    # head 32 x 8 = 256.  N = 4 x 576 + 256 = 2560;  top-1: N_a = 576 + 256 = 832
    assert SHAPE.linear_params == 2304
    assert SHAPE.flops_per_token(False) == 4 * 2560  # 2N + 2N
    assert SHAPE.flops_per_token(True) == 6 * 2560  # + 2N recomputed
    assert SHAPE.flops_per_token(False, layers=1) == 2 * 2560 + 2 * 832  # 6784
    assert SHAPE.flops_per_token(True, layers=1) == 2 * 2560 + 4 * 832  # 8448
    assert SHAPE.flops_per_token(True, layers=4) == SHAPE.flops_per_token(True)
    # LoRA rank 2 on q, v: 2 x (8 + 8) + 2 x (8 + 4) = 56 per layer
    assert SHAPE.lora_params(2, ["q_proj", "v_proj"]) == 224
    assert SHAPE.lora_params(2, ["q_proj", "v_proj"], layers=1) == 56


def test_planner_activations_follow_the_adapted_layers_hand_checked():
    mb = 1 << 20
    # fp32 (e = 4), b = 2, T = 10, targets q, v (n_t = 2, no copies in fp32):
    # one layer keeps b T e (3h + 2q + 2kv + 3i) = 20 x 4 x (24 + 16 + 8 + 48) = 7680 bytes
    full = predict_mb(SHAPE, Precision.fp32, 2, ["q_proj", "v_proj"], 2, 10, False, runtime_mb=0, layers=0)
    top1 = predict_mb(SHAPE, Precision.fp32, 2, ["q_proj", "v_proj"], 2, 10, False, runtime_mb=0, layers=1)
    assert full["activations"] == round(4 * 7680 / mb, 1) and top1["activations"] == round(7680 / mb, 1)
    # checkpointing: each adapted layer keeps its input (b T h e = 640 bytes), plus one live layer
    ck_full = predict_mb(SHAPE, Precision.fp32, 2, ["q_proj", "v_proj"], 2, 10, True, runtime_mb=0, layers=0)
    ck_top1 = predict_mb(SHAPE, Precision.fp32, 2, ["q_proj", "v_proj"], 2, 10, True, runtime_mb=0, layers=1)
    assert ck_full["activations"] == round((4 * 640 + 7680) / mb, 1)
    assert ck_top1["activations"] == round((640 + 7680) / mb, 1)
    assert top1["adapter"] == round(16 * 56 / mb, 1) and full["adapter"] == round(16 * 224 / mb, 1)


def test_planner_activations_at_smollm2_scale_hand_checked():
    """SmolLM2-135M's shape: the figures in MB are big enough to see each term."""
    s = ModelShape(vocab=49152, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64, tied=True)
    # b T = 4 x 128 = 512 positions; per layer 512 x 4 x (3x576 + 2x576 + 2x192 + 2x1536) = 512 x 4 x 6336
    # (the lean MLP keeps gate and up; transformers' also silu(gate): 3x1536, 512 x 4 x 7872)
    layer = 512 * 4 * 6336  # 12,976,128 bytes
    full = predict_mb(s, Precision.fp32, 8, ["q_proj", "v_proj"], 4, 128, False, layers=0)
    top = predict_mb(s, Precision.fp32, 8, ["q_proj", "v_proj"], 4, 128, False, layers=6)
    assert layer * 30 == 389_283_840 and full["activations"] == pytest.approx(371.25, abs=0.051)  # / 2^20
    assert layer * 6 == 77_856_768 and top["activations"] == pytest.approx(74.25, abs=0.051)
    peft = predict_mb(s, Precision.fp32, 8, ["q_proj", "v_proj"], 4, 128, False, layers=0, backend=Backend.peft)
    assert 512 * 4 * 7872 * 30 == 483_655_680 and peft["activations"] == pytest.approx(461.25, abs=0.051)
    # lean int8 computes in float32 (e = 4) and holds one rebuilt slice: 4096 rows x 576 x 4 bytes = 9 MB
    int8 = predict_mb(s, Precision.int8, 2, ["q_proj", "v_proj"], 1, 128, True)
    int8_peft = predict_mb(s, Precision.int8, 2, ["q_proj", "v_proj"], 1, 128, True, backend=Backend.peft)
    assert round(int8["weights"] - int8_peft["weights"], 1) == 9.0


def test_energy_of_a_round_falls_with_the_adapted_layers():
    from pocketfed.device.energy import round_cost
    from pocketfed.device.profiles import BUILTIN

    watch = BUILTIN["watch"]
    full = round_cost(watch, SHAPE.flops_per_token(True) * 1000, 0.0)
    top1 = round_cost(watch, SHAPE.flops_per_token(True, layers=1) * 1000, 0.0)
    # 15,360 vs 8,448 FLOPs a token: x 1000 tokens x 2.5e-10 J = 3.84e-3 vs 2.112e-3 J; 2e9 FLOP/s
    assert full.joules == pytest.approx(3.84e-3) and top1.joules == pytest.approx(2.112e-3)
    assert top1.device_seconds == pytest.approx(8.448e6 / 2e9)


class MatmulDtypes(TorchDispatchMode):
    MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.MATMULS:
            self.dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("precision", [Precision.bf16, Precision.int8])
def test_low_precision_bases_train_in_float32_matmuls(precision):
    """No bfloat16 matrix product in forward, recompute or backward: CPUs without AVX512-BF16 have no
    fast path for them (the watch plan's 4 tokens/s). Loss and gradients stay close to fp32's."""
    ids, mask = batch()
    ref = lean_model(1, Precision.fp32)
    m = lean_model(1, precision, checkpointing=True)
    state = with_b({k: v.detach().clone() for k, v in lean_params(ref).items()})
    leanmodel.set_adapter_state(ref, state)
    leanmodel.set_adapter_state(m, state)
    with MatmulDtypes() as seen:
        loss = m.loss(ids, mask)
        loss.backward()
    assert seen.dtypes == {torch.float32}
    ref_loss = ref.loss(ids, mask)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 0.02
    for k, g in grads(lean_params(ref)).items():
        got = lean_params(m)[k].grad
        assert (got - g).norm() <= 0.1 * g.norm(), k


def test_sliced_rebuild_equals_one_piece(monkeypatch):
    """The head rebuilt SLICE_ROWS rows at a time gives the one-piece product and input gradient."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(10, 6, generator=g)).to(torch.bfloat16)
    q = torch.randint(-127, 128, (10, 6), generator=g, dtype=torch.int8)
    scale = torch.rand(10, generator=g) * 0.01
    x = torch.randn(3, 6, generator=g, requires_grad=True)
    for stored, s, dense in ((w, None, w.float()), (q, scale, q.float() * scale[:, None])):
        y_ref = x @ dense.T
        (gx_ref,) = torch.autograd.grad(y_ref.sum() * 1.0 + (y_ref ** 2).sum(), x)
        for rows in (4, 4096):  # three slices (4 + 4 + 2 rows), then one
            monkeypatch.setattr(lowmem, "SLICE_ROWS", rows)
            y = lowmem._FrozenLinear.apply(x, stored, s, None)
            (gx,) = torch.autograd.grad(y.sum() * 1.0 + (y ** 2).sum(), x)
            assert torch.allclose(y, y_ref, atol=1e-6) and torch.allclose(gx, gx_ref, atol=1e-5)


def test_a_depth_the_model_lacks_is_refused_by_name():
    from pocketfed.config import TrainConfig, load_config
    from pocketfed.device.planner import make_plan
    from pocketfed.device.profiles import BUILTIN

    with pytest.raises(UserError, match="lora.layers = 5 exceeds the model's 4 layers"):
        make_plan(SHAPE, BUILTIN["phone"], LoraConfig(layers=5), TrainConfig(), 32)
    plan = make_plan(SHAPE, BUILTIN["phone"], LoraConfig(layers=1), TrainConfig(), 32)
    assert plan.layers == 1 and plan.memory_mb["adapter"] == round(16 * SHAPE.lora_params(4, ["q_proj", "v_proj"], 1) / 2**20, 1)
    with pytest.raises(UserError, match="lora.layers"):
        load_config(None, {"lora": {"layers": -1}})
