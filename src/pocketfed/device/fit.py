"""Run one local training round under a plan, on a real (non-simulated) device, and measure it.

    plan -> load the frozen base in the plan's precision -> attach LoRA at the plan's rank
         -> train with micro-batches and gradient accumulation (checkpointing if planned)
         -> measured peak memory, tokens/s, estimated energy

The round runs on the lean path (`pocketfed.device.leanmodel`: torch only, no transformers, no PEFT;
the same maths and the same adapter keys as the simulator's model). `--path peft` runs it on
transformers + PEFT instead, as the simulator does: the reference that `bench/bench_budget.py`
compares against. Peak memory is the whole process's peak RSS (VmHWM), interpreter and torch
included: what the profile's budget and the planner's prediction are about. The runtime floor
(RSS once everything is imported, before any weight) is reported beside it. Run one round per
process for a clean figure:

    python -m pocketfed.device.fit --model smollm2-135m --profile watch --tokens ids.pt
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pocketfed.memory import drop_cached_library_pages, peak_rss_mb, rss_mb

drop_cached_library_pages("torch")  # before torch is imported (see its docstring)
import torch  # noqa: E402

from pocketfed.config import LoraConfig, TrainConfig
from pocketfed.data.federated import to_blocks
from pocketfed.device import energy, leanmodel
from pocketfed.device.lowmem import Precision
from pocketfed.device.planner import ModelShape, Plan, make_plan, predict_mb
from pocketfed.device.profiles import DeviceProfile, get_profile

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) [B, T] -> mean loss


def fix_malloc_thresholds() -> None:
    """Make glibc serve every allocation over 128 KB by mmap and give freed memory back at once.
    By default glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after
    which activations and logits come from the heap, whose freed holes stay resident: ~45 MB more
    peak RSS in a watch round of SmolLM2 (measured). No-op where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 128 << 10)
    libc.mallopt(m_trim_threshold, 128 << 10)


def batches(n_rows: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices for each step: shuffled epochs, reshuffled when one runs out. The same order as
    `pocketfed.device.trainer.batches` (a test pins it), which this process cannot import: it imports PEFT."""
    order = torch.randperm(n_rows, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n_rows and pos > 0:
            order, pos = torch.randperm(n_rows, generator=generator), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def plain_plan(shape: ModelShape, profile: str, lora: LoraConfig, train: TrainConfig, seq_len: int,
               runtime_mb: float) -> Plan:
    """Plain fp32 LoRA at the configured rank, whole batch at once, no checkpointing (the reference)."""
    mem = predict_mb(shape, Precision.fp32, lora.rank, lora.target_modules, train.batch_size, seq_len, False, runtime_mb)
    return Plan(profile, Precision.fp32, lora.rank, tuple(lora.target_modules), train.batch_size, 1, seq_len,
                False, mem, float("inf"))


def build_lean(folder: Path, plan: Plan, alpha: float, seed: int) -> tuple[torch.nn.Module, LossFn]:
    model = leanmodel.load(folder, plan.precision)
    model.checkpointing = plan.checkpointing
    leanmodel.attach_lora(model, plan.rank, alpha, plan.target_modules, seed)
    return model, model.loss


def build_peft(folder: Path, plan: Plan, alpha: float, seed: int) -> tuple[torch.nn.Module, LossFn]:
    """The simulator's path: a transformers model with PEFT's LoRA (imports both)."""
    from pocketfed.device.lowmem import load_frozen
    from pocketfed.device.trainer import lm_loss
    from pocketfed.model import lora as lora_mod

    model = load_frozen(folder, plan.precision)
    if plan.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = lora_mod.attach(model, LoraConfig(rank=plan.rank, alpha=alpha, target_modules=list(plan.target_modules)), seed)
    return peft_model, lambda ids, mask: lm_loss(peft_model, ids, mask)


def run_round(folder: Path, plan: Plan, token_ids: list[int], train: TrainConfig, seed: int, steps: int,
              pad_id: int, alpha: float, profile: DeviceProfile | None = None, path: str = "lean") -> dict[str, Any]:
    """One round of `steps` optimizer steps under `plan`; measured and estimated figures."""
    fix_malloc_thresholds()
    t0 = time.perf_counter()
    if path == "peft":
        import peft  # noqa: F401  (imported before the floor is read: the floor is the runtime's RSS)
    floor = rss_mb()
    model, loss_fn = (build_peft if path == "peft" else build_lean)(folder, plan, alpha, seed)
    shape = ModelShape.from_folder(folder)
    load_seconds = time.perf_counter() - t0
    data = to_blocks(token_ids, plan.seq_len, pad_id)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW if path == "peft" else leanmodel.AdamW)(params, lr=train.lr, weight_decay=train.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    tokens, positions, loss_sum = 0, 0, 0.0
    model.train()
    t1 = time.perf_counter()
    for idx in batches(len(data), plan.batch_size, steps, gen):
        for micro in idx.split(plan.micro_batch):  # [micro_batch] row indices
            ids, mask = data.input_ids[micro], data.mask[micro]
            loss = loss_fn(ids, mask) / plan.grad_accum
            loss.backward()
            loss_sum += float(loss.detach()) * plan.grad_accum / len(idx.split(plan.micro_batch))
            tokens += int(mask.sum())
            positions += ids.numel()
        torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_seconds = time.perf_counter() - t1
    peak = peak_rss_mb()
    out: dict[str, Any] = {
        "path": path,
        "plan": plan.as_dict(),
        "predicted_mb": plan.predicted_peak_mb,
        "runtime_floor_mb": round(floor, 1),
        "peak_rss_mb": round(peak, 1),
        "working_set_mb": round(peak - floor, 1),
        "tokens": tokens,
        "tokens_per_s": round(tokens / train_seconds, 1),
        "train_seconds": round(train_seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "train_loss": round(loss_sum / max(1, steps), 4),
    }
    if profile is not None:
        update_bytes = 4 * shape.lora_params(plan.rank, list(plan.target_modules))
        cost = energy.round_cost(profile, shape.flops_per_token(plan.checkpointing) * positions, 2 * update_bytes)
        out["energy"] = cost.as_dict()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--profile", default="phone")
    ap.add_argument("--profiles-file", default="")
    ap.add_argument("--tokens", required=True, help="a torch-saved 1-D int64 tensor of token ids")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--plain", action="store_true", help="plain fp32 LoRA, no plan (the reference)")
    ap.add_argument("--path", choices=("lean", "peft"), default="lean", help="lean: torch only; peft: transformers + PEFT")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    from pocketfed.errors import UserError
    from pocketfed.model.zoo import resolve

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        folder, _ = resolve(args.model)
        config = json.loads((folder / "config.json").read_text())
        shape = ModelShape.from_folder(folder)
        lora = LoraConfig(rank=args.rank)
        train = TrainConfig(steps=args.steps, batch_size=args.batch_size)
        profile = get_profile(args.profile, args.profiles_file)
        runtime = rss_mb()  # this process, torch imported, no weight yet: what the plan sits on
        plan = (plain_plan(shape, "plain", lora, train, args.seq_len, runtime) if args.plain
                else make_plan(shape, profile, lora, train, args.seq_len, args.model, runtime))
    except UserError as e:
        print(json.dumps({"error": str(e)}))
        return 2
    ids = torch.load(args.tokens).tolist()
    pad = config.get("pad_token_id")
    pad = pad if pad is not None else (config.get("eos_token_id") or 0)
    result = run_round(folder, plan, ids, train, seed=0, steps=args.steps, pad_id=int(pad),
                       alpha=2.0 * args.rank, profile=profile, path=args.path)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
