"""Run one local training round under a plan, on a real (non-simulated) device, and measure it.

    plan -> load the frozen base in the plan's precision -> attach LoRA (PEFT) at the plan's rank
         -> train with micro-batches and gradient accumulation (checkpointing if planned)
         -> measured peak memory, tokens/s, estimated energy

Peak memory is the process's peak RSS (VmHWM) minus the runtime floor
(the RSS once the interpreter, torch, transformers and PEFT are imported, before any weight):
the working set that the profile's budget and the planner's prediction are about. Both numbers
are reported. Run one round per process for a clean figure:

    python -m pocketfed.device.fit --model smollm2-135m --profile watch --tokens ids.pt
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pocketfed.config import LoraConfig, TrainConfig
from pocketfed.data.federated import to_blocks
from pocketfed.device import energy
from pocketfed.device.lowmem import Precision, load_frozen
from pocketfed.device.planner import ModelShape, Plan, make_plan, predict_mb
from pocketfed.device.profiles import DeviceProfile, get_profile
from pocketfed.device.trainer import batches, lm_loss
from pocketfed.memory import peak_rss_mb
from pocketfed.model import lora as lora_mod


def rss_mb() -> float:
    """The current resident set, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / (1 << 20)


def plain_plan(shape: ModelShape, profile: str, lora: LoraConfig, train: TrainConfig, seq_len: int) -> Plan:
    """Plain fp32 LoRA at the configured rank, whole batch at once, no checkpointing (the reference)."""
    mem = predict_mb(shape, Precision.fp32, lora.rank, lora.target_modules, train.batch_size, seq_len, False)
    return Plan(profile, Precision.fp32, lora.rank, tuple(lora.target_modules), train.batch_size, 1, seq_len,
                False, mem, float("inf"))


def run_round(folder: Path, plan: Plan, token_ids: list[int], train: TrainConfig, seed: int, steps: int,
              pad_id: int, alpha: float, profile: DeviceProfile | None = None) -> dict[str, Any]:
    """One round of `steps` optimizer steps under `plan`; measured and estimated figures."""
    floor = rss_mb()
    t0 = time.perf_counter()
    model = load_frozen(folder, plan.precision)
    shape = ModelShape.from_config(model.config)
    if plan.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = lora_mod.attach(model, LoraConfig(rank=plan.rank, alpha=alpha, target_modules=list(plan.target_modules)), seed)
    load_seconds = time.perf_counter() - t0
    data = to_blocks(token_ids, plan.seq_len, pad_id)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    tokens, positions, loss_sum = 0, 0, 0.0
    peft_model.train()
    t1 = time.perf_counter()
    for idx in batches(len(data), plan.batch_size, steps, gen):
        for micro in idx.split(plan.micro_batch):  # [micro_batch] row indices
            ids, mask = data.input_ids[micro], data.mask[micro]
            loss = lm_loss(peft_model, ids, mask) / plan.grad_accum
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
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    from pocketfed.errors import UserError
    from transformers import AutoConfig
    from pocketfed.model.zoo import resolve

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        folder, _ = resolve(args.model)
        config = AutoConfig.from_pretrained(folder)
        shape = ModelShape.from_config(config)
        lora = LoraConfig(rank=args.rank)
        train = TrainConfig(steps=args.steps, batch_size=args.batch_size)
        profile = get_profile(args.profile, args.profiles_file)
        plan = (plain_plan(shape, "plain", lora, train, args.seq_len) if args.plain
                else make_plan(shape, profile, lora, train, args.seq_len, args.model))
    except UserError as e:
        print(json.dumps({"error": str(e)}))
        return 2
    ids = torch.load(args.tokens).tolist()
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or 0)
    result = run_round(folder, plan, ids, train, seed=0, steps=args.steps, pad_id=int(pad),
                       alpha=2.0 * args.rank, profile=profile)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
