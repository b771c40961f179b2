"""Issue 2 figures on SmolLM2-135M: device training throughput against a bare PyTorch+PEFT loop,
the share of a round spent outside local training, peak memory of a simulated round with 8
devices (one base model, not eight), and bytes uploaded per device per round.

Run alone: `.venv/bin/python bench/bench_sim.py`; `run()` returns rows for bench/run.py.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MODEL = "smollm2-135m"
BATCH, SEQ, STEPS, REPS = 8, 128, 3, 3


def _bare_loop(model, data_ids: torch.Tensor, steps: int, lr: float) -> float:
    """The reference: the plainest PyTorch + PEFT loop on the same batches. -> seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    start = time.perf_counter()
    for s in range(steps):
        ids = data_ids[s * BATCH : (s + 1) * BATCH]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def throughput() -> list[dict[str, Any]]:
    from pocketfed.config import LoraConfig, TrainConfig
    from pocketfed.data.federated import Blocks
    from pocketfed.device.task import wrap_peft
    from pocketfed.device.trainer import train_steps
    from pocketfed.model import lora
    from pocketfed.model.zoo import load_base

    base = load_base(MODEL)
    model = lora.attach(base.model, LoraConfig(), seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (BATCH * STEPS, SEQ), generator=g)
    blocks = Blocks(ids, torch.ones_like(ids, dtype=torch.bool))
    init = lora.get_state(model)
    cfg = TrainConfig(steps=STEPS, batch_size=BATCH, lr=1e-3, micro_tokens=0)  # whole batches, as the bare loop runs them
    ours, bare = [], []
    _bare_loop(model, ids, 1, 1e-3)  # warm-up
    for _ in range(REPS):  # interleaved, so machine noise hits both alike
        lora.set_state(model, init)
        t = time.perf_counter()
        tokens, _ = train_steps(wrap_peft(model), init, blocks, cfg, seed=0)
        ours.append(tokens / (time.perf_counter() - t))
        lora.set_state(model, init)
        bare.append(BATCH * SEQ * STEPS / _bare_loop(model, ids, STEPS, 1e-3))
    best_ours, best_bare = max(ours), max(bare)
    return [
        {"figure": "device training throughput (pocketfed trainer)", "value": f"{best_ours:.0f} tokens/s",
         "notes": f"batch {BATCH}x{SEQ}, LoRA r=8 q,v; best of {REPS}"},
        {"figure": "bare PyTorch+PEFT loop, same batches", "value": f"{best_bare:.0f} tokens/s", "notes": ""},
        {"figure": "ratio pocketfed / bare", "value": f"{best_ours / best_bare:.2f}x", "notes": "goal >= 0.9x"},
    ]


ROUND_SCRIPT = r"""
import json, sys, time
from pathlib import Path
from pocketfed.memory import peak_rss_mb
from pocketfed.config import load_config
from pocketfed.simulate import simulate
cfg = load_config(None, {"model": {"name": sys.argv[1]}, "data": {"seq_len": 64, "min_train_tokens": 2000},
                         "train": {"steps": 2, "batch_size": 4}, "sim": {"devices": int(sys.argv[2]), "rounds": 1, "heldout": 1},
                         "eval": {"every_round": False, "variants": []}})
res = simulate(cfg, Path(sys.argv[3]))
row = res.history[0]
print(json.dumps({"peak_rss_mb": peak_rss_mb(),
                  "round_seconds": row["seconds"], "train_seconds": res.summary["train_seconds"],
                  "bytes_up": res.summary["bytes_up_per_device_round"], "model_bytes": res.summary["model_bytes"]}))
"""


def simulated_round(devices: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", ROUND_SCRIPT, MODEL, str(devices), str(Path(tmp) / "run")],
                             capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def rounds() -> list[dict[str, Any]]:
    one, eight = simulated_round(1), simulated_round(8)
    outside = eight["round_seconds"] - eight["train_seconds"]
    model_mb = eight["model_bytes"] / 1e6
    return [
        {"figure": "round time, 8 devices (eval off)", "value": f"{eight['round_seconds']:.1f} s",
         "notes": f"local training {eight['train_seconds']:.1f} s"},
        {"figure": "share of the round outside local training", "value": f"{100 * outside / eight['round_seconds']:.2f} %",
         "notes": "sampling, task set-up, update extraction, encode/decode, aggregation, checkpoint; goal < 5%"},
        {"figure": "peak RSS, simulated round with 1 device", "value": f"{one['peak_rss_mb']:.0f} MB", "notes": ""},
        {"figure": "peak RSS, simulated round with 8 devices", "value": f"{eight['peak_rss_mb']:.0f} MB",
         "notes": f"+{eight['peak_rss_mb'] - one['peak_rss_mb']:.0f} MB for 7 more devices; fp32 base model is {model_mb:.0f} MB: one copy"},
        {"figure": "bytes uploaded per device per round", "value": f"{eight['bytes_up'] / 1e6:.2f} MB",
         "notes": f"full model {model_mb:.0f} MB: {model_mb * 1e6 / eight['bytes_up']:.0f}x smaller (float32 LoRA r=8 q,v)"},
    ]


def run() -> list[dict[str, Any]]:
    return throughput() + rounds()


if __name__ == "__main__":
    for r in run():
        print(r)
    print("self peak RSS MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
