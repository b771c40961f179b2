"""Peak memory and speed of one local training round of SmolLM2-135M under each device profile.

Each case runs in its own process (`python -m pocketfed.device.fit`), so the peak is that round's
own: the child's VmHWM. Reported per case:
    peak_rss_mb      the child's whole-process peak RSS, interpreter and torch included: what the
                     profile's budget and the planner's prediction are about (within_budget uses it)
    predicted_mb     the planner's prediction of that peak (none for the transformers + PEFT reference)
    runtime_floor_mb RSS once everything is imported, before any weight (lean path ~223 MB: torch;
                     transformers + PEFT path ~380 MB)
    tokens_per_s     training tokens per second on this machine (shared CPU: noisy; compare the
                     lean and PEFT plain rows, run back to back)
Cases: plain fp32 LoRA (rank 8, batch 4 x 128 tokens, no plan) on transformers + PEFT as the
simulator runs it (the reference) and on the lean device path (`pocketfed.device.leanmodel`), then
the plans for `phone`, `watch` and the example `glasses` profile (configs/profiles/example.yaml),
all on the lean path. The tokens are a Shakespeare role's own text.

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
STEPS = 2  # two optimizer steps of batch 4: the second step runs with the optimizer state and allocator as they stay
CASES: list[tuple[str, list[str]]] = [
    ("plain fp32 LoRA, transformers + PEFT", ["--plain", "--path", "peft"]),
    ("plain fp32 LoRA, lean", ["--plain"]),
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
    budget = p["budget_mb"] if p["budget_mb"] != float("inf") else None
    return {
        "case": name, "path": r["path"],
        "precision": p["precision"], "rank": p["rank"], "micro_batch_x_accum": f"{p['micro_batch']}x{p['grad_accum']}",
        "seq_len": p["seq_len"], "checkpointing": p["checkpointing"], "budget_mb": budget,
        "peak_rss_mb": r["peak_rss_mb"], "predicted_mb": r["predicted_mb"] if r["path"] == "lean" else None,
        "within_budget": (r["peak_rss_mb"] <= budget) if budget is not None else None,
        "runtime_floor_mb": r["runtime_floor_mb"],
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
