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

Each cell is one simulation in its own process with one torch thread, two at a time (PARALLEL).
BENCH_ROBUST_RUNS names a folder that keeps the cells' runs (`cell{i}/`) and reuses finished ones.
Run alone: `.venv/bin/python bench/bench_robust.py [--quick]`; `run()` returns rows for bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from pocketfed.config import load_config, to_dict
from pocketfed.simulate import simulate

DEVICES, ROUNDS = 10, 5
BASE: dict[str, Any] = {
    "model": {"name": "smollm2-135m"},
    "data": {"seq_len": 64, "min_train_tokens": 2000, "max_eval_tokens": 512},
    "train": {"steps": 2, "batch_size": 4, "lr": 2e-3},
    "sim": {"devices": DEVICES, "rounds": ROUNDS, "heldout": 2, "seed": 0, "threads": 1},
    "eval": {"every_round": True, "variants": []},  # held-out perplexity and backdoor success per round only
    # the attacker trains on its backdoor rows for longer and faster than its task says (its token
    # claim is bounded by the task's budget all the same); 10 steps already plant the backdoor in
    # every round without a defense (measured: 100% in rounds 1-5, as with 30 steps, in 2/3 the time)
    "attack": {"kind": "none", "boost": float(DEVICES), "steps": 10, "lr": 5e-3},
    "server": {"median_norm_bound": 0.0},
}
REPLACEMENT = {"kind": "model_replacement", "fraction": 0.1}
# z small: the clip does the defending (C: see the DP rows below)
DP = {"dp": "central", "clip_norm": 1.0, "noise_multiplier": 0.02, "delta": 1e-5}
DEFENSES: list[tuple[str, dict[str, Any]]] = [
    ("none", {}),
    ("median norm bound (3x)", {"server": {"median_norm_bound": 3.0}}),
    ("norm bound + central DP, C 1", {"privacy": DP}),
    ("coordinate-wise median", {"server": {"median_norm_bound": 0.0, "aggregator": "median"}}),
    ("multi-Krum (f = 1)", {"server": {"median_norm_bound": 0.0, "aggregator": "multi_krum", "krum_byzantine": 1}}),
    # C = 1 halves an honest update here (their median norm is ~2.3: round 2-5's median norm bound is
    # 6.4-6.8 = 3x it), which slows learning; C nearer their norm keeps more of it
    *[(f"norm bound + central DP, C {c:g}", {"privacy": DP | {"clip_norm": c}}) for c in (2.5, 4.0)],
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


CELLS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [("clean", {}, {}),
                                                          *[(name, REPLACEMENT, d) for name, d in DEFENSES]]
# the cells run as separate processes, PARALLEL at a time with one torch thread each: on 2 cores two
# single-threaded simulations get through more work than one with 2 threads (small matmuls scale
# poorly), and a loaded machine does not make two OpenMP threads spin against each other
PARALLEL = int(os.environ.get("BENCH_ROBUST_PARALLEL", "2"))


def _cell(index: int, folder: Path, quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any], Any]:
    """Cell `index` of CELLS simulated into `folder` in its own process, unless `folder` already holds
    its finished run (BENCH_ROBUST_RUNS keeps them); -> (per-round history, summary, config)."""
    _, attack, defense = CELLS[index]
    cfg = config(attack, defense, quick)
    if (folder / "summary.json").is_file() and yaml.safe_load((folder / "config.yaml").read_text()) != to_dict(cfg):
        raise RuntimeError(f"{folder} holds a run of another configuration than cell {CELLS[index][0]!r}: "
                           "move it away, or point BENCH_ROBUST_RUNS elsewhere")
    if not (folder / "summary.json").is_file():
        cmd = [sys.executable, "-W", "ignore", __file__, "--cell", str(index), str(folder)] + ["--quick"] * quick
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
        if out.returncode != 0:
            raise RuntimeError(f"cell {CELLS[index][0]!r}: {out.stderr.strip()[-2000:]}")
    history = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return history, json.loads((folder / "summary.json").read_text()), cfg


def run(quick: bool = False, only: list[str] | None = None) -> list[dict[str, Any]]:
    keep = os.environ.get("BENCH_ROBUST_RUNS")
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench-robust-"))
    wanted = [i for i, (name, *_) in enumerate(CELLS) if i == 0 or not only or name in only]
    try:
        with ThreadPoolExecutor(PARALLEL) as pool:  # threads only wait on the cells' processes
            runs = dict(zip(wanted, pool.map(lambda i: _cell(i, root / f"cell{i}{'-quick' * quick}", quick), wanted)))
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    clean_ppl = runs[0][0][-1]["heldout"]["perplexity"]
    rows = [{"attack": "none", "defense": "none", "backdoor success": "-",
             "clean held-out ppl": f"{clean_ppl:.2f}", "ppl cost": "-"}]
    for i in wanted[1:]:
        history, summary, cfg = runs[i]
        ppl = history[-1]["heldout"]["perplexity"]
        rows.append({
            "attack": f"model replacement, {len(summary['attack']['devices'])} of {cfg.sim.devices} (x{cfg.attack.boost:g})",
            "defense": CELLS[i][0],
            "backdoor success": f"{100 * history[-1]['attack']['backdoor_success']:.0f} %",
            "backdoor by round": " ".join(f"{100 * r['attack']['backdoor_success']:.0f}" for r in history),
            "clean held-out ppl": f"{ppl:.2f}",
            "ppl cost": f"{100 * (ppl / clean_ppl - 1):+.1f} %",
        })
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 devices, 2 rounds: a smoke run, not the measurement")
    ap.add_argument("--cell", nargs=2, metavar=("INDEX", "OUT"), help=argparse.SUPPRESS)  # one cell's process
    args = ap.parse_args()
    if args.cell:
        _, attack, defense = CELLS[int(args.cell[0])]
        simulate(config(attack, defense, args.quick), Path(args.cell[1]))
    else:
        for r in run(args.quick):
            print(r, flush=True)
