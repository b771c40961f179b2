"""Run one local training round under a plan, on a real (non-simulated) device, and measure it.

    plan -> load the frozen base in the plan's precision, LoRA at the plan's rank (`task.load_model`)
         -> the one training loop (`task.train`: micro-batches, accumulation, checkpointing if planned)
         -> measured peak memory, tokens/s, estimated energy

A measurement wrapper over the device task (`pocketfed.device.task`), which the device process
(`pocketfed device`) runs each round. The round runs on the backend the planner picks (the lean
Llama for Llama models: torch only, no transformers, no PEFT); `--path peft` runs it on
transformers + PEFT instead, as the simulator does: the reference that `bench/bench_budget.py`
compares against. Peak memory is the whole process's peak RSS (VmHWM), interpreter and torch
included: what the profile's budget and the planner's prediction are about. The runtime floor
(RSS once everything is imported, before any weight) is reported beside it. Run one round per
process for a clean figure:

    python -m pocketfed.device.fit --model smollm2-135m --profile watch --tokens ids.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from pocketfed.memory import drop_cached_library_pages, peak_rss_mb, rss_mb

drop_cached_library_pages("torch")  # before torch is imported (see its docstring)
import torch  # noqa: E402

from pocketfed.config import LoraConfig, TrainConfig  # noqa: E402
from pocketfed.data.federated import to_blocks  # noqa: E402
from pocketfed.device import energy, task  # noqa: E402
from pocketfed.device.lowmem import Precision, fix_malloc_thresholds  # noqa: E402
from pocketfed.device.planner import Backend, ModelShape, Plan, make_plan, predict_mb  # noqa: E402
from pocketfed.device.profiles import DeviceProfile, get_profile  # noqa: E402


def plain_plan(shape: ModelShape, lora: LoraConfig, train: TrainConfig, seq_len: int, runtime_mb: float,
               backend: Backend) -> Plan:
    """Plain fp32 LoRA at the configured rank, whole batch at once, no checkpointing (the reference)."""
    mem = predict_mb(shape, Precision.fp32, lora.rank, lora.target_modules, train.batch_size, seq_len, False, runtime_mb,
                     layers=lora.layers, backend=backend)
    return dataclasses.replace(task.reference_plan(lora, train, seq_len, backend), profile="plain", memory_mb=mem)


def run_round(folder: Path, plan: Plan, token_ids: list[int], train: TrainConfig, seed: int, steps: int,
              pad_id: int, alpha: float, profile: DeviceProfile | None = None) -> dict[str, Any]:
    """One round of `steps` optimizer steps under `plan`; measured and estimated figures."""
    fix_malloc_thresholds()
    t0 = time.perf_counter()
    if plan.backend is Backend.peft:
        import peft  # noqa: F401  (imported before the floor is read: the floor is the runtime's RSS)
    floor = rss_mb()
    model = task.load_model(folder, plan, alpha, seed)
    shape = ModelShape.from_folder(folder)
    load_seconds = time.perf_counter() - t0
    data = to_blocks(token_ids, plan.seq_len, pad_id)
    t1 = time.perf_counter()
    tokens, metrics = task.train(model, data, dataclasses.replace(train, batch_size=plan.batch_size), seed, steps)
    train_seconds = time.perf_counter() - t1
    peak = peak_rss_mb()
    out: dict[str, Any] = {
        "path": plan.backend.value,
        "plan": plan.as_dict(),
        "predicted_mb": plan.predicted_peak_mb,
        "runtime_floor_mb": round(floor, 1),
        "peak_rss_mb": round(peak, 1),
        "working_set_mb": round(peak - floor, 1),
        "tokens": tokens,
        "tokens_per_s": round(tokens / train_seconds, 1),
        "train_seconds": round(train_seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "train_loss": round(metrics["train_loss"], 4),
    }
    if profile is not None:
        positions = steps * plan.batch_size * plan.seq_len
        update_bytes = 4 * shape.lora_params(plan.rank, list(plan.target_modules), plan.layers)
        flops = shape.flops_per_token(plan.checkpointing, plan.layers) * positions
        cost = energy.round_cost(profile, flops, 2 * update_bytes)
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
    ap.add_argument("--layers", type=int, default=0, help="LoRA on the top LAYERS decoder layers only (0 = all)")
    ap.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules, comma-separated")
    ap.add_argument("--plain", action="store_true", help="plain fp32 LoRA, no plan (the reference)")
    ap.add_argument("--path", choices=("lean", "peft"), default="",
                    help="the backend (default: the planner's pick): lean: torch only; peft: transformers + PEFT")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    from pocketfed.device.planner import backend_for
    from pocketfed.errors import UserError
    from pocketfed.model.zoo import resolve

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        folder, _ = resolve(args.model)
        config = json.loads((folder / "config.json").read_text())
        shape = ModelShape.from_folder(folder)
        lora = LoraConfig(rank=args.rank, layers=args.layers, target_modules=args.targets.split(","))
        train = TrainConfig(steps=args.steps, batch_size=args.batch_size)
        profile = get_profile(args.profile, args.profiles_file)
        runtime = rss_mb()  # this process, torch imported, no weight yet: what the plan sits on
        backend = Backend(args.path) if args.path else backend_for(folder)
        plan = (plain_plan(shape, lora, train, args.seq_len, runtime, backend) if args.plain
                else make_plan(shape, profile, lora, train, args.seq_len, args.model, runtime, backend))
    except UserError as e:
        print(json.dumps({"error": str(e)}))
        return 2
    ids = torch.load(args.tokens).tolist()
    pad = config.get("pad_token_id")
    pad = pad if pad is not None else (config.get("eos_token_id") or 0)
    result = run_round(folder, plan, ids, train, seed=0, steps=args.steps, pad_id=int(pad),
                       alpha=2.0 * args.rank, profile=profile)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
