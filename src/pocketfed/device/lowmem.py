"""Load a frozen base in reduced precision without ever holding the float32 model.

The cached weights are float32 safetensors (~540 MB for SmolLM2-135M). `load_frozen` builds the
model on the meta device, then reads each tensor from the file with plain reads (no mmap: mapped
file pages would count in the process's RSS) in chunks of at most `CHUNK_BYTES`, converting each
chunk into its destination:
    fp32   float32 weights (as they are)
    bf16   bfloat16 weights                                   (2 bytes / weight)
    int8   the decoder's linear layers as int8 with one float32 scale per output row,
           W[o, :] ~= scale[o] * Q[o, :],  scale[o] = max_i |W[o, i]| / 127,  Q = round(W / scale);
           dequantized on the fly in forward *and* backward (nothing dequantized is kept for
           backward); embeddings, the LM head and norms in bfloat16   (~1 byte / weight)
So the peak while loading is the destination model plus one chunk. `fill` does this for any model
built on the meta device whose parameter names are the file's (the lean model of
`pocketfed.device.leanmodel`, which the device trains with); `load_frozen` builds a transformers
model that way (the reference path; transformers is imported only there).

Storage is not compute. The lean device model computes in float32 whatever the weights are stored
in: `_FrozenLinear` rebuilds a bf16 or int8 weight as float32, at most SLICE_ROWS output rows at a
time, in forward and again in backward. Why: a CPU without AVX512-BF16 or AMX has no fast bfloat16
matrix product; torch's fallback for the backward's grad @ W (no transpose) ran ~50x slower than
float32 on AVX2 kernels (61 ms vs 1.1 ms for [128, 1536] @ [1536, 576]; torch 2.13,
ATEN_CPU_CAPABILITY=avx2 with oneDNN off, as on an AVX2-only CPU), which made the int8 watch plan
4 tokens/s against the fp32 phone plan's 108 (issue 17). float32 GEMM has a fast path on every CPU
torch supports. The transformers model of `load_frozen` keeps computing in its storage dtype.
"""

from __future__ import annotations

import contextvars
import ctypes
import enum
import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CHUNK_BYTES = 1 << 20
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
INT8_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    int8 = "int8"

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype of the weights that are not int8 (all of them under bf16; embeddings, head, norms under int8)."""
        return torch.float32 if self is Precision.fp32 else torch.bfloat16


SLICE_ROWS = 4096  # output rows rebuilt at once: 4096 x 576 float32 = 9 MB for SmolLM2's head (49,152 rows)


def _weight(stored: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The stored weight rows [n, in] as `dtype`: scale[:, None] * Q for int8, a cast otherwise."""
    if scale is None:
        return stored.to(dtype)
    # cast, then scale in place: torch.mul(int8, float) promotes element by element, ~15x slower (measured)
    return stored.to(dtype).mul_(scale.to(dtype)[:, None])


# Set while a checkpointed block runs again for its backward (leanmodel.checkpoint): its rebuilt
# weights are then kept for that backward, which follows at once, instead of rebuilt a third time.
KEEP_REBUILT: contextvars.ContextVar[bool] = contextvars.ContextVar("keep_rebuilt", default=False)


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b, W = scale[:, None] * Q (int8) or the stored weight (scale None), in x's dtype.
    W is rebuilt SLICE_ROWS output rows at a time in forward and again in backward, never saved:
        y[..., s] = x W[s]^T        dL/dx = sum_s dL/dy[..., s] W[s]
    except under KEEP_REBUILT (a checkpoint's recompute), where a W of one slice is saved as rebuilt:
    one decoder layer's linears in float32 (14 MB for SmolLM2) live from its recompute to its backward."""

    @staticmethod
    def forward(ctx, x, stored, scale, bias):  # type: ignore[override]
        rows = stored.shape[0]
        if KEEP_REBUILT.get() and rows <= SLICE_ROWS and (scale is not None or stored.dtype != x.dtype):
            w = _weight(stored, scale, x.dtype)
            ctx.save_for_backward(w, scale)  # as many tensors, in the same order, as the first pass saved
            y = F.linear(x, w)
        else:
            ctx.save_for_backward(stored, scale)
            ys = [F.linear(x, _weight(stored[r : r + SLICE_ROWS], None if scale is None else scale[r : r + SLICE_ROWS], x.dtype))
                  for r in range(0, rows, SLICE_ROWS)]
            y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)  # [..., out]
        return y if bias is None else y + bias.to(y.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        stored, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if stored.dtype == grad.dtype:  # the weight as computed with: saved rebuilt (a recompute's), or stored so
            return grad @ stored, None, None, None
        gx = None
        for r in range(0, stored.shape[0], SLICE_ROWS):
            w = _weight(stored[r : r + SLICE_ROWS], None if scale is None else scale[r : r + SLICE_ROWS], grad.dtype)
            part = grad[..., r : r + SLICE_ROWS] @ w  # [..., n] @ [n, in] -> [..., in]
            gx = part if gx is None else gx.add_(part)
        return gx, None, None, None


class _HeadLoss(torch.autograd.Function):
    """sum_i CE(h_i W^T, label_i) over the labels != -100, W a frozen head [V, h] (any storage),
    streamed over SLICE_ROWS vocabulary rows: W rebuilt once in forward, once in backward, and one
    matrix product per slice each way (one big product each way, as transformers' loss does, but
    reading W twice instead of twice per chunk of positions). Forward keeps a running log-sum-exp
    per position (m = max so far, s = sum exp(z - m)):
        lse_i = m_i + log s_i,   loss = sum_i (lse_i - z_i[label_i])
    Backward: dL/dh_i = g sum_v (softmax_iv - [v = label_i]) W_v, from the logits kept by forward
    (keep_logits: [V, N] float32, the memory a plain loss holds too) or, under checkpointing,
    recomputed slice by slice (then nothing of size V is kept: h and lse only)."""

    @staticmethod
    def forward(ctx, h, labels, weight, keep_logits):  # type: ignore[override]
        n, vocab = h.shape[0], weight.shape[0]
        m = h.new_full((n,), -math.inf)
        s = h.new_zeros(n)
        target = h.new_zeros(n)
        valid = labels != -100
        rows = torch.arange(n)
        kept = h.new_empty(vocab, n) if keep_logits else None  # [V, N]: each slice's rows contiguous
        for r in range(0, vocab, SLICE_ROWS):
            w = _weight(weight[r : r + SLICE_ROWS], None, h.dtype)
            z = torch.mm(w, h.T, out=kept[r : r + w.shape[0]]) if kept is not None else w @ h.T  # [S, N]
            top = torch.maximum(m, z.max(dim=0).values)
            s = s * torch.exp(m - top) + torch.exp(z - top).sum(dim=0)
            m = top
            inside = valid & (labels >= r) & (labels < r + w.shape[0])
            target[inside] = z[labels[inside] - r, rows[inside]]
        lse = m + torch.log(s)
        ctx.save_for_backward(h, labels, weight, lse, kept)
        return ((lse - target) * valid).sum()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        h, labels, weight, lse, kept = ctx.saved_tensors
        coef = g * (labels != -100).to(h.dtype)  # [N]
        rows = torch.arange(h.shape[0])
        gh = torch.zeros_like(h)
        for r in range(0, weight.shape[0], SLICE_ROWS):
            w = _weight(weight[r : r + SLICE_ROWS], None, h.dtype)
            z = kept[r : r + w.shape[0]] if kept is not None else w @ h.T  # [S, N]
            p = z.sub_(lse).exp_().mul_(coef)  # softmax slice, scaled (in place: the kept logits are used once)
            inside = (labels >= r) & (labels < r + w.shape[0])
            p[labels[inside] - r, rows[inside]] -= coef[inside]
            gh.addmm_(p.T, w)
        return gh, None, None, None


def head_loss(h: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, keep_logits: bool = False) -> torch.Tensor:
    """Summed next-token cross-entropy of h [N, hidden] against a frozen head `weight` [V, hidden]
    stored in any float dtype, label -100 ignored (as F.cross_entropy(..., reduction="sum")); see
    _HeadLoss. Computed in h's dtype. keep_logits: hold the [V, N] logits for backward instead of
    recomputing them (for a loss not under checkpointing)."""
    return _HeadLoss.apply(h, labels, weight, keep_logits)


class Int8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is int8 with per-output-row scales (PEFT wraps it as a Linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device="meta"),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device="meta"))
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenLinear.apply(x, self.weight, self.weight_scale, self.bias)


class CastLinear(nn.Linear):
    """A frozen nn.Linear stored in a narrower float dtype than its input (bf16 weights, float32
    activations): computed in the input's dtype, the weight cast a slice at a time (see _FrozenLinear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:
            return F.linear(x, self.weight, self.bias)
        return _FrozenLinear.apply(x, self.weight, None, self.bias)


def fix_malloc_thresholds() -> None:
    """Make glibc serve every allocation over 128 KB by mmap and give freed memory back at once.
    By default glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after
    which activations and logits come from the heap, whose freed holes stay resident: ~45 MB more
    peak RSS in a watch round of SmolLM2 (measured). Call it once, early, in a training process.
    No-op where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 128 << 10)
    libc.mallopt(m_trim_threshold, 128 << 10)


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header {name: {dtype, shape, data_offsets}} and where the data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_into(f, info: dict, start: int, dest: torch.Tensor, quant_scale: torch.Tensor | None) -> None:
    """Fill `dest` (same shape as the stored tensor) chunk by chunk; int8 `dest` is quantized per row."""
    src_dtype = _ST_DTYPES[info["dtype"]]
    shape = info["shape"]
    rows = shape[0] if shape else 1
    row_elems = max(1, int(torch.tensor(shape[1:]).prod().item()) if len(shape) > 1 else 1)
    itemsize = torch.empty(0, dtype=src_dtype).element_size()
    per_chunk = max(1, CHUNK_BYTES // (row_elems * itemsize))
    f.seek(start + info["data_offsets"][0])
    flat = dest.view(rows, row_elems)
    buf = bytearray(min(rows, per_chunk) * row_elems * itemsize)
    for r0 in range(0, rows, per_chunk):
        n = min(per_chunk, rows - r0)
        view = memoryview(buf)[: n * row_elems * itemsize]
        if f.readinto(view) != len(view):
            raise OSError(f"{f.name}: truncated tensor data")
        chunk = torch.frombuffer(buf, dtype=src_dtype, count=n * row_elems).view(n, row_elems).float()
        if quant_scale is not None:
            scale = chunk.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # [n]
            quant_scale[r0 : r0 + n] = scale
            flat[r0 : r0 + n] = torch.round(chunk / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        else:
            flat[r0 : r0 + n] = chunk.to(dest.dtype)


def quantize_linears(model: nn.Module) -> None:
    """Swap the decoder's frozen linears (INT8_MODULES) for meta Int8Linear shells, before `fill`."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in INT8_MODULES and type(child) is nn.Linear:
                setattr(module, child_name, Int8Linear(child.in_features, child.out_features, child.bias is not None))


def cast_linears(model: nn.Module, names: tuple[str, ...]) -> None:
    """Turn the frozen nn.Linear children called one of `names` into CastLinear (same parameters), before `fill`."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in names and type(child) is nn.Linear:
                cast = CastLinear(child.in_features, child.out_features, child.bias is not None, device="meta")
                setattr(module, child_name, cast)


def fill(model: nn.Module, path: Path, dtype: torch.dtype) -> None:
    """Read every tensor of the safetensors file `path` into `model` (built on meta), chunk by chunk:
    Int8Linear weights are quantized per row, everything else is stored in `dtype`. Frozen."""
    header, start = read_header(path)
    with open(path, "rb") as f:
        for name, info in header.items():
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            shape = tuple(info["shape"])
            if isinstance(owner, Int8Linear) and attr == "weight":
                q = torch.empty(shape, dtype=torch.int8)
                scale = torch.empty(shape[0], dtype=torch.float32)
                _read_into(f, info, start, q, scale)
                owner.weight = nn.Parameter(q, requires_grad=False)
                owner.weight_scale = scale
            else:
                t = torch.empty(shape, dtype=dtype)
                _read_into(f, info, start, t, None)
                setattr(owner, attr, nn.Parameter(t, requires_grad=False))


def load_frozen(folder: Path, precision: Precision) -> PreTrainedModel:
    """The transformers model of `folder` (HF config + model.safetensors) in `precision`, eval mode, frozen."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    dtype = precision.storage_dtype  # transformers computes in it too
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if precision is Precision.int8:
        quantize_linears(model)
    fill(model, folder / "model.safetensors", dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    # Non-persistent buffers (rotary inverse frequencies) were made on meta: rebuild those modules.
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "inv_freq"):
            owner_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner_name) if owner_name else model, attr, type(module)(config=config))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{folder}: tensors missing from model.safetensors: {left[:3]}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
