"""Peak memory and speed of one local training round of SmolLM2-135M under each device profile.

Each case runs in its own process (`python -m pocketfed.device.fit`), so the peak is that round's
own: `ru_maxrss` of the child. Reported per case:
    working_set_mb   peak RSS minus the RSS once Python, torch, transformers and PEFT are imported
                     (what the profile's budget and the planner's prediction are about)
    peak_rss_mb      the child's whole peak RSS, runtime included (~390 MB of it is the runtime)
    predicted_mb     the planner's prediction of the working set
    tokens_per_s     training tokens per second on this machine (shared CPU: noisy)
Cases: plain fp32 LoRA (rank 8, batch 4 x 128 tokens, no plan: the reference), then the plans
for `car`, `phone`, `watch` and the example `glasses` profile (configs/profiles/example.yaml,
300 MB, which needs the int8 base). The tokens are a Shakespeare role's own text.

Run alone: `.venv/bin/python bench/bench_budget.py`; `run()` returns the rows for bench/run.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 1  # one optimizer step of batch 4: a round's memory peak is reached in its first step
CASES: list[tuple[str, list[str]]] = [
    ("plain fp32 LoRA", ["--plain"]),
    ("phone", ["--profile", "phone"]),
    ("watch", ["--profile", "watch"]),
    ("glasses (example.yaml)", ["--profile", "glasses", "--profiles-file", str(ROOT / "configs/profiles/example.yaml")]),
]


def _tokens(path: Path) -> int:
    from transformers import AutoTokenizer

    from pocketfed.data import shakespeare
    from pocketfed.model.zoo import tokenizer_dir

    roles = shakespeare.load_roles()
    text = "\n".join(max(roles.values(), key=lambda p: sum(map(len, p))))
    ids = AutoTokenizer.from_pretrained(tokenizer_dir())(text, add_special_tokens=False)["input_ids"][:8192]
    torch.save(torch.tensor(ids, dtype=torch.int64), path)
    return len(ids)


def _case(name: str, flags: list[str], tokens: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-W", "ignore", "-m", "pocketfed.device.fit", "--model", "smollm2-135m",
           "--tokens", str(tokens), "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "128", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode not in (0, 2) or not lines:
        raise RuntimeError(f"{name}: {out.stderr[-2000:]}")
    r = json.loads(lines[-1])
    if "error" in r:
        return {"case": name, "refused": r["error"]}
    p = r["plan"]
    return {
        "case": name,
        "precision": p["precision"], "rank": p["rank"], "micro_batch_x_accum": f"{p['micro_batch']}x{p['grad_accum']}",
        "seq_len": p["seq_len"], "checkpointing": p["checkpointing"],
        "budget_mb": p["budget_mb"] if p["budget_mb"] != float("inf") else None,
        "predicted_mb": r["predicted_mb"], "working_set_mb": r["working_set_mb"],
        "runtime_floor_mb": r["runtime_floor_mb"], "peak_rss_mb": r["peak_rss_mb"],
        "within_budget": (r["working_set_mb"] <= p["budget_mb"]) if p["budget_mb"] != float("inf") else None,
        "tokens_per_s": r["tokens_per_s"], "load_s": r["load_seconds"],
        "energy_j_per_step": round(r["energy"]["joules"] / STEPS, 2) if "--plain" not in flags else None,
    }


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "ids.pt"
        _tokens(tokens)
        return [_case(name, flags, tokens) for name, flags in CASES]


if __name__ == "__main__":
    for row in run():
        print(json.dumps(row))
