"""The cost of differential privacy on Shakespeare: the same small SmolLM2-135M run with and
without central DP (clip + calibrated Gaussian noise + RDP accounting), side by side.

Run alone: `.venv/bin/python bench/bench_dp.py`; `run()` returns rows for bench/run.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pocketfed.config import load_config
from pocketfed.simulate import simulate

BASE = {
    "model": {"name": "smollm2-135m"},
    "data": {"seq_len": 64, "min_train_tokens": 2000, "max_eval_tokens": 512},
    "train": {"steps": 2, "batch_size": 4, "lr": 2e-3},
    "sim": {"devices": 8, "rounds": 2, "heldout": 2},
    "eval": {"every_round": False, "variants": ["base", "federated"]},
}
DP = {"dp": "central", "clip_norm": 0.05, "target_epsilon": 50.0, "delta": 1e-5}


def run() -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = simulate(load_config(None, BASE), Path(tmp) / "plain").summary
        private = simulate(load_config(None, {**BASE, "privacy": DP}), Path(tmp) / "dp").summary
    p = private["privacy"]
    for name, s in (("no DP", plain), (f"central DP (z={p['noise_multiplier']:.2f}, C={p['clip_norm']})", private)):
        rows.append({
            "run": name,
            "held-out ppl": f"{s['federated']['heldout']['perplexity']:.2f}",
            "base held-out ppl": f"{s['base']['heldout']['perplexity']:.2f}",
            # against the model's recipients (the coordinator adds the noise under central DP: no bound against it)
            "epsilon": f"{s['privacy']['epsilon_recipients']:.1f} (delta {s['privacy']['delta']:g})" if s.get("privacy") else "-",
        })
    cost = private["federated"]["heldout"]["perplexity"] / plain["federated"]["heldout"]["perplexity"] - 1
    rows.append({"run": "perplexity cost of DP", "held-out ppl": f"{100 * cost:+.1f} %",
                 "base held-out ppl": "", "epsilon": "8 devices/round, 2 rounds: DP needs far larger cohorts"})
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
