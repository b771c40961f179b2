"""The memory planner: pick a training plan that fits a device profile, or refuse.

A plan fixes the LoRA rank and target modules, the micro-batch and gradient accumulation
(micro_batch * grad_accum = the configured batch), the sequence length, activation checkpointing
and the precision of the frozen base (fp32, bf16, or int8 dequantized on the fly; see
`pocketfed.device.lowmem`). Its predicted peak is the peak RSS of the whole training process as
the device task (`pocketfed.device.task`) runs it; the profile's budget means the same.

Backend: the lean Llama (`pocketfed.device.leanmodel`, torch only) wherever it covers the model's
config (Llama decoders: SmolLM2, `tiny`), on every profile; transformers + PEFT otherwise, with
their imports (PEFT_IMPORTS_MB) added to the runtime. Memory:

    runtime      CPython + torch + pocketfed's device modules, resident before any weight. The
                 training process measures it and plans on top of it (`pocketfed.device.agent`): it
                 depends on the page cache, not only on the code: `import torch` measured 223 MB
                 VmHWM with torch's libraries cold, 278 MB right after install, when the kernel
                 maps in the cached pages around each one touched (libtorch_cpu.so: 50 vs 93 MB).
                 RUNTIME_MB = 225 stands in where nothing is measured (`pocketfed budget plan`).
    weights      fp32: 4 P   bf16: 2 P   int8: 1 byte x decoder linears + 4 bytes x their rows
                 + 2 bytes x (embeddings, head, norms)
                 + under bf16 and int8 on the lean backend, one weight slice rebuilt in float32
                 (max(lowmem.SLICE_ROWS, widest linear) x h x 4)
    adapter      16 bytes x LoRA params (fp32 weight, gradient, AdamW m and v)
    activations  without checkpointing, every adapted layer keeps for backward
                     L_a x b T [e (3 h + 2 q + 2 kv + m i) + 4 h n_t [e = 2]]
                 (SDPA's fused kernel keeps no T x T matrix; m = 2 on the lean backend, whose MLP
                 keeps gate and up, 3 for transformers', which keeps silu(gate) too); with checkpointing, each adapted layer
                 keeps its input and one layer is live at a time:  L_a x b T h e  +  one layer as above.
                 L_a = lora.layers (0: all L): the frozen layers below run without a graph and keep
                 nothing (sparse back-propagation, pocketfed.model.depth)
    logits       on the lean backend the loss streams the head over SLICE_ROWS vocabulary rows
                 (lowmem.head_loss): one slice's logits, exponentials and gradients live, b T S 12
                 (S = min(SLICE_ROWS, V)), plus, without checkpointing, the float32 logits of every
                 position kept for backward: b T V 4 (under checkpointing they are recomputed). With
                 the plan's keep_rebuilt, one layer's linears rebuilt in float32 (4 x its weights)
                 stay from its recompute to its backward (counted in weights). transformers + PEFT:
                 C V (e + 24) with C = LOSS_CHUNK (logits, their float copy, log-softmax, gradients),
                 plus, without checkpointing, b T V 4
    margin       x 1.10 + 32 MB (allocator slack, kernels paged in on first use, data); 8 MB for a
                 process whose runtime was measured after a warm-up step (`task.warm_up`): the
                 kernels are in the runtime already
with P weights, L layers, h hidden, i intermediate, q = H d (query width), kv = H_kv d, V vocab,
b micro-batch, T sequence, e the compute dtype's bytes (4: the lean model computes in float32
whatever its storage; 2 for transformers + PEFT under bf16 or int8), n_t LoRA targets per layer
(their float32 input copies when the base computes in bf16). The coefficients were fitted to
measured runs of SmolLM2-135M and `tiny` (bench/bench_budget.py) so that the prediction stays an
upper bound: measured / predicted was 0.84-0.96 over fp32, bf16 and int8, with and without
checkpointing, micro-batches 1-4, sequences 32-128.

Search (the first plan that fits wins; each move costs a little more time or quality than the
last): halve the micro-batch (more accumulation) down to 1 -> checkpointing on, micro-batch again
from the largest -> bf16 base -> int8 base (each from the largest micro-batch; under bf16 and int8
each micro-batch first with keep_rebuilt, then without) -> halve the sequence down to 32. The rank
is min(lora.rank, profile.max_rank) before any of this. Nothing fits -> UserError naming the
profile, the budget and the smallest plan. Measured on SmolLM2-135M's watch plan (int8 base,
checkpointing, 2 threads, `python -m pocketfed.device.fit`): keep_rebuilt 72 -> 81-86 tokens/s at
micro-batch 1; micro-batch 2 with it, 90 (bench_depth).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketfed.config import LoraConfig, TrainConfig
from pocketfed.device.leanmodel import LeanConfig
from pocketfed.device.lowmem import INT8_MODULES, SLICE_ROWS, Precision
from pocketfed.device.profiles import DeviceProfile
from pocketfed.device.shape import ModelShape
from pocketfed.errors import UserError
from pocketfed.model.depth import adapted_layers

MB = 1 << 20
MIN_SEQ = 32
LOSS_CHUNK = 32  # C of the transformers + PEFT logits term (fitted to bench_budget's runs)
MARGIN, MARGIN_MB, WARM_MARGIN_MB = 1.10, 32.0, 8.0
RUNTIME_MB = 225.0
PEFT_IMPORTS_MB = 155.0  # transformers' Llama modeling + PEFT on top of torch (VmHWM; see leanmodel's docstring)


class Backend(str, enum.Enum):
    """The model a device trains: `lean` (pocketfed.device.leanmodel, torch only) wherever it covers
    the model, else `peft` (transformers + PEFT, the simulator's). Both give PEFT's adapter keys."""

    lean = "lean"
    peft = "peft"


def backend_for(folder: Path) -> Backend:
    """`lean` if the lean Llama supports `folder`'s config.json, else `peft`."""
    try:
        LeanConfig.from_folder(folder)
    except UserError:
        return Backend.peft
    return Backend.lean


@dataclass(frozen=True)
class Plan:
    profile: str
    precision: Precision
    rank: int
    target_modules: tuple[str, ...]
    micro_batch: int
    grad_accum: int
    seq_len: int
    checkpointing: bool
    memory_mb: dict[str, float]  # weights, adapter, activations, logits, runtime, predicted_peak (whole process)
    budget_mb: float
    backend: Backend = Backend.lean
    layers: int = 0  # LoRA on the top `layers` decoder layers (0 = all): lora.layers
    keep_rebuilt: bool = False  # checkpointing, bf16 / int8, lean: a recompute's rebuilt weights kept for its backward

    @property
    def predicted_peak_mb(self) -> float:
        return self.memory_mb["predicted_peak"]

    @property
    def batch_size(self) -> int:
        return self.micro_batch * self.grad_accum

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["precision"] = self.precision.value
        d["backend"] = self.backend.value
        d["target_modules"] = list(self.target_modules)
        return d


def predict_mb(shape: ModelShape, precision: Precision, rank: int, targets: list[str] | tuple[str, ...],
               micro_batch: int, seq_len: int, checkpointing: bool, runtime_mb: float = RUNTIME_MB,
               warmed: bool = False, layers: int = 0,
               backend: Backend = Backend.lean, keep_rebuilt: bool = False) -> dict[str, float]:
    """The predicted peak RSS of the process running one training round, in MB, by part (see the module docstring)."""
    e = 4 if precision is Precision.fp32 or backend is Backend.lean else 2
    if precision is Precision.fp32:
        weights = 4 * shape.params
    elif precision is Precision.bf16:
        weights = 2 * shape.params
    else:
        int8_rows = shape.layers * sum(out for m, (_, out) in shape.module_dims().items() if m in INT8_MODULES)
        weights = shape.linear_params + 4 * int8_rows + 2 * shape.other_params
    if precision is not Precision.fp32 and backend is Backend.lean:
        weights += 4 * shape.hidden * max(SLICE_ROWS, *(out for _, out in shape.module_dims().values()))
        if checkpointing and keep_rebuilt:  # one layer's linears, rebuilt in its recompute, kept for its backward
            weights += 4 * (shape.linear_params // shape.layers)
    adapter = 16 * shape.lora_params(rank, list(targets), layers)
    b, t, h = micro_batch, seq_len, shape.hidden
    q, kv, i = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    n_t = len([x for x in targets if x in shape.module_dims()])
    mlp = 2 if backend is Backend.lean else 3  # the lean MLP keeps gate and up; autograd's also silu(gate)
    layer = b * t * (e * (3 * h + 2 * q + 2 * kv + mlp * i) + (4 * h * n_t if e == 2 else 0))
    kept = shape.adapted(layers)  # layers that keep activations for backward
    activations = (kept * b * t * h * e + layer) if checkpointing else kept * layer
    if backend is Backend.lean:  # lowmem.head_loss: a slice's temporaries, and without checkpointing the kept logits
        logits = b * t * min(SLICE_ROWS, shape.vocab) * 12 + (0 if checkpointing else b * t * shape.vocab * 4)
    else:
        logits = LOSS_CHUNK * shape.vocab * (e + 24) + (0 if checkpointing else b * t * shape.vocab * 4)
    parts = {"weights": weights / MB, "adapter": adapter / MB, "activations": activations / MB, "logits": logits / MB}
    parts["predicted_peak"] = runtime_mb + MARGIN * sum(parts.values()) + (WARM_MARGIN_MB if warmed else MARGIN_MB)
    parts["runtime"] = runtime_mb
    return {k: round(v, 1) for k, v in parts.items()}


def candidates(batch_size: int, seq_len: int) -> list[tuple[int, bool, Precision, int, bool]]:
    """(micro_batch, checkpointing, precision, seq_len, keep_rebuilt) in the order the planner tries them."""
    micro = [batch_size]
    while micro[-1] > 1:
        micro.append(max(1, micro[-1] // 2))
    out = [(m, False, Precision.fp32, seq_len, False) for m in micro]
    for prec in Precision:
        for m in micro:
            out += [(m, True, prec, seq_len, keep) for keep in ((False,) if prec is Precision.fp32 else (True, False))]
    t = seq_len
    while t // 2 >= MIN_SEQ:
        t //= 2
        out.append((1, True, Precision.int8, t, False))
    return out


def make_plan(shape: ModelShape, profile: DeviceProfile, lora: LoraConfig, train: TrainConfig,
              seq_len: int, model_name: str = "the model", runtime_mb: float = RUNTIME_MB,
              backend: Backend = Backend.lean, warmed: bool = False) -> Plan:
    """The first plan of `candidates` whose predicted peak fits `profile.train_memory_mb`, on top of
    `runtime_mb` (the training process's own RSS before any weight, when it can measure it, without
    transformers and PEFT: the `peft` backend adds their PEFT_IMPORTS_MB)."""
    if backend is Backend.peft:
        runtime_mb += PEFT_IMPORTS_MB
    rank = max(1, min(lora.rank, profile.max_rank))
    adapted_layers(lora.layers, shape.layers)  # refuses a depth the model does not have, by name
    targets = tuple(lora.target_modules)
    unknown = [x for x in targets if x not in shape.module_dims()]
    if unknown:
        raise UserError(f"lora.target_modules {unknown} are not linears of {model_name}; "
                        f"valid: {', '.join(shape.module_dims())}")
    last: Plan | None = None
    for micro, ckpt, prec, t, keep in candidates(train.batch_size, seq_len):
        keep = keep and backend is Backend.lean
        mem = predict_mb(shape, prec, rank, targets, micro, t, ckpt, runtime_mb, warmed, lora.layers, backend, keep)
        last = Plan(profile.name, prec, rank, targets, micro, train.batch_size // micro if micro else 1, t, ckpt,
                    mem, profile.train_memory_mb, backend, lora.layers, keep)
        if train.batch_size % micro:  # accumulation must cover the batch exactly
            continue
        if mem["predicted_peak"] <= profile.train_memory_mb:
            return last
    assert last is not None
    raise UserError(
        f"{model_name} does not fit profile {profile.name!r}: its budget is {profile.train_memory_mb:.0f} MB "
        f"for training and the smallest plan (int8 base, micro-batch 1, sequence {last.seq_len}, "
        f"checkpointing, rank {rank}) needs {last.predicted_peak_mb:.0f} MB "
        f"(the runtime {runtime_mb:.0f} MB, weights {last.memory_mb['weights']:.0f} MB; budgets are whole-process RSS); "
        f"choose a larger profile or a smaller model"
    )


def shape_of(model_name: str, cache_dir: str = "") -> tuple[ModelShape, Path]:
    """The shape of a zoo model or folder, from its config.json alone (no weights are loaded)."""
    from pocketfed.model.zoo import resolve

    folder, _ = resolve(model_name, cache_dir)
    return ModelShape.from_folder(folder), folder
