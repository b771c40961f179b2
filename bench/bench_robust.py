"""Attacks x defenses on Shakespeare: SmolLM2-135M, 10 devices of which one (10%) does boosted model
replacement carrying a backdoor (Bagdasaryan et al., AISTATS 2020: trigger " zq7 ", target
" banana", its update x10 = n / eta), 5 rounds, every device in every round. Backdoor success (the
share of held-out trigger prompts whose greedy continuation starts with the target) after the last
round, and the clean held-out perplexity against the same run without an attacker or a defense.

Defenses: none (no norm bound, the token-weighted mean); the default median norm bound (each update
clipped to 3x the round's median norm, `server.median_norm_bound`); norm bounding + central DP
(Sun et al. 2019: the server clips each update to C and adds N(0, (z C)^2)); the coordinate-wise
median (Yin et al., ICML 2018); multi-Krum with f = 1 (Blanchard et al., NeurIPS 2017).
Issue 16's goals: without a defense the backdoor succeeds; with norm bounding + DP, or the median,
backdoor success <= 10% at a clean perplexity cost <= 5%.

Run alone: `.venv/bin/python bench/bench_robust.py [--quick]`; `run()` returns rows for bench/run.py.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from pocketfed.config import load_config
from pocketfed.simulate import simulate

DEVICES, ROUNDS = 10, 5
BASE: dict[str, Any] = {
    "model": {"name": "smollm2-135m"},
    "data": {"seq_len": 64, "min_train_tokens": 2000, "max_eval_tokens": 512},
    "train": {"steps": 2, "batch_size": 4, "lr": 2e-3},
    "sim": {"devices": DEVICES, "rounds": ROUNDS, "heldout": 2, "seed": 0},
    "eval": {"every_round": True, "variants": ["base"]},
    # the attacker trains on its backdoor rows for longer and faster than its task says (its token
    # claim is bounded by the task's budget all the same)
    "attack": {"kind": "none", "boost": float(DEVICES), "steps": 30, "lr": 5e-3},
    "server": {"median_norm_bound": 0.0},
}
REPLACEMENT = {"kind": "model_replacement", "fraction": 0.1}
# C near an honest update's norm here (2 steps at lr 2e-3: about 1), z small: the clip does the defending
DP = {"dp": "central", "clip_norm": 1.0, "noise_multiplier": 0.02, "delta": 1e-5}
DEFENSES: list[tuple[str, dict[str, Any]]] = [
    ("none", {}),
    ("median norm bound (3x)", {"server": {"median_norm_bound": 3.0}}),
    ("norm bound + central DP", {"privacy": DP}),
    ("coordinate-wise median", {"server": {"median_norm_bound": 0.0, "aggregator": "median"}}),
    ("multi-Krum (f = 1)", {"server": {"median_norm_bound": 0.0, "aggregator": "multi_krum", "krum_byzantine": 1}}),
]


def config(attack: dict[str, Any], defense: dict[str, Any], quick: bool) -> Any:
    cfg: dict[str, Any] = {k: dict(v) for k, v in BASE.items()}
    cfg["attack"].update(attack)
    for section, values in defense.items():
        cfg.setdefault(section, {}).update(values)
    if quick:  # a smoke run: fewer devices and rounds (the attacker is still 1 device)
        cfg["sim"].update({"devices": 5, "rounds": 2})
        cfg["attack"]["boost"] = 5.0
        if cfg["attack"].get("fraction"):
            cfg["attack"]["fraction"] = 0.2
    return load_config(None, cfg)


def run(quick: bool = False, only: list[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clean = simulate(config({}, {}, quick), Path(tmp) / "clean")
        clean_ppl = clean.history[-1]["heldout"]["perplexity"]
        rows.append({"attack": "none", "defense": "none", "backdoor success": "-",
                     "clean held-out ppl": f"{clean_ppl:.2f}", "ppl cost": "-"})
        for i, (name, defense) in enumerate(DEFENSES):
            if only and name not in only:
                continue
            cfg = config(REPLACEMENT, defense, quick)
            res = simulate(cfg, Path(tmp) / f"d{i}")
            last = res.history[-1]
            ppl = last["heldout"]["perplexity"]
            rows.append({
                "attack": f"model replacement, {len(res.summary['attack']['devices'])} of {cfg.sim.devices} (x{cfg.attack.boost:g})",
                "defense": name,
                "backdoor success": f"{100 * last['attack']['backdoor_success']:.0f} %",
                "clean held-out ppl": f"{ppl:.2f}",
                "ppl cost": f"{100 * (ppl / clean_ppl - 1):+.1f} %",
            })
            print(rows[-1], flush=True)  # a long run: each row as soon as it is measured
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 devices, 2 rounds: a smoke run, not the measurement")
    args = ap.parse_args()
    for r in run(args.quick):
        print(r, flush=True)
