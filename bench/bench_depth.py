"""Issue 17: sparse back-propagation (`lora.layers`: LoRA on the top L of SmolLM2-135M's 30 layers,
back-propagation stopping below them) against full depth, and the watch plan beside the phone plan.
Device rows: one local round per process (`python -m pocketfed.device.fit`, the lean device path,
a Shakespeare role's text), the cases interleaved and repeated REPS times so machine noise hits
them alike; medians reported, with the energy model's device-seconds and battery share of the round.
Quality rows: held-out perplexity after the demo's 3 rounds (configs/shakespeare-smollm2.yaml, the
same token budget: 8 devices x 4 steps x 4 x 64 tokens a round), full depth vs top-L.

Padding rows: the share of padded positions in training batches. Run alone:
`.venv/bin/python bench/bench_depth.py [device|quality|padding]`; `run()` returns rows for bench/run.py.
BENCH_DEPTH_REPS (default 3) sets the repeats; BENCH_DEPTH_RUNS names a folder whose sub-folders
(QUALITY's names) hold finished runs of that config with QUALITY's overrides, read instead of
simulating again; missing ones are simulated there.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
LAYERS = (10, 5)  # the top-L depths compared with full depth (0)
ALL7 = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # every linear of a decoder layer
# quality cases: (case, folder under BENCH_DEPTH_RUNS, config overrides). The demo's config, then
# the best of a small sweep for each side (2026-11-29, the same config with these overrides): top-L with
# every linear adapted (q,v only: 119.5; all 7: 97.9 at lr 2e-3, 90.1 at 4e-3, 90.0 at 8e-3; q,v at
# 6e-3: 99.5) against full depth at the same doubled learning rate
QUALITY: list[tuple[str, str, list[str]]] = [
    *[(f"L={L or 'all'}", f"demo_L{L}", [f"lora.layers={L}"]) for L in (0, *LAYERS)],
    ("L=all, lr 4e-3", "demo_L0_lr4", ["train.lr=4e-3"]),
    ("L=10, all 7 linears, lr 4e-3", "demo_L10_all7_lr4",
     ["lora.layers=10", f"lora.target_modules=[{ALL7}]", "train.lr=4e-3"]),
    # not the same token budget: half the steps, so half the device-seconds at full depth
    ("L=all, lr 4e-3, 2 steps a round (half the tokens)", "demo_L0_lr4_steps2", ["train.lr=4e-3", "train.steps=2"]),
]
CONFIG = ROOT / "configs/shakespeare-smollm2.yaml"
# (case, fit flags): the demo's device round on the lean path (rank 8, 4 steps of 4 x 64, fp32, no
# plan), then the phone and watch plans (rank 4 / 2, batch 4 x 128, 2 steps as bench_budget runs them)
ROUND = ["--plain", "--steps", "4", "--batch-size", "4", "--seq-len", "64"]
PLANS = ["--steps", "2", "--batch-size", "4", "--seq-len", "128"]
CASES: list[tuple[str, list[str]]] = [
    *[(f"demo round, plain fp32, L={L or 'all'}", [*ROUND, "--layers", str(L)]) for L in (0, *LAYERS)],
    (f"demo round, plain fp32, L={LAYERS[0]}, all 7 linears", [*ROUND, "--layers", str(LAYERS[0]), "--targets", ALL7]),
    ("phone plan, L=all", [*PLANS, "--profile", "phone"]),
    ("watch plan, L=all", [*PLANS, "--profile", "watch"]),
    (f"watch plan, L={LAYERS[0]}", [*PLANS, "--profile", "watch", "--layers", str(LAYERS[0])]),
]


def _fit(flags: list[str], tokens: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-W", "ignore", "-m", "pocketfed.device.fit", "--model", "smollm2-135m",
           "--tokens", str(tokens), *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(flags)}: {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def device_rows(reps: int) -> list[dict[str, Any]]:
    import bench_budget

    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "ids.pt"
        bench_budget._tokens(tokens)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in CASES}
        for _ in range(reps):  # interleaved: each repeat runs every case once
            for name, flags in CASES:
                runs[name].append(_fit(flags, tokens))
    rows = []
    for name, rs in runs.items():
        p = rs[0]["plan"]
        row: dict[str, Any] = {
            "case": name, "precision": p["precision"], "rank": p["rank"],
            "micro_batch_x_accum": f"{p['micro_batch']}x{p['grad_accum']}", "checkpointing": p["checkpointing"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "train_s": statistics.median(r["train_seconds"] for r in rs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
            "predicted_mb": p["memory_mb"].get("predicted_peak"),
        }
        if "energy" in rs[0] and "--plain" not in dict(CASES)[name]:
            row["model_device_s"] = rs[0]["energy"]["device_seconds"]
            row["model_battery_pct"] = rs[0]["energy"]["battery_pct"]
        row["runs"] = len(rs)
        rows.append(row)
    base = {r["case"].split(", L=")[0]: r["train_s"] for r in rows if r["case"].endswith("L=all")}
    for r in rows:  # device-seconds of the same work, relative to full depth in the same run
        r["time_vs_full"] = round(r["train_s"] / base[r["case"].split(", L=")[0]], 3)
    return rows


def _simulate(name: str, sets: list[str], tmp: Path) -> dict[str, Any]:
    reuse = os.environ.get("BENCH_DEPTH_RUNS")
    folder = Path(reuse or tmp) / name
    if not (folder / "summary.json").is_file():
        cmd = [sys.executable, "-W", "ignore", "-m", "pocketfed", "simulate", "--config", str(CONFIG), "--out", str(folder),
               "--set", "eval.variants=[federated]", *(x for kv in sets for x in ("--set", kv))]
        subprocess.run(cmd, check=True, capture_output=True, timeout=7200, cwd=ROOT)
    metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = json.loads((folder / "summary.json").read_text())
    return {"metrics": metrics, "summary": summary}


def quality_rows() -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, name, sets in QUALITY:
            r = _simulate(name, sets, Path(tmp))
            last = [m for m in r["metrics"] if "heldout" in m][-1]
            rows.append({"case": f"demo, 3 rounds, {case}",
                         "heldout_perplexity": round(last["heldout"]["perplexity"], 2),
                         "federated_own_perplexity": round(r["summary"]["federated"]["perplexity"], 2),
                         "tokens_per_round": last.get("tokens"),
                         "bytes_up_per_device_round": r["summary"].get("bytes_up_per_device_round")})
    return rows


def padding_rows() -> list[dict[str, Any]]:
    """The share of padded positions in training rows, per device (each device trains the same number
    of steps on uniformly drawn rows, so a device's share is its batches' share): the demo's
    population and the wider one the default config admits (512 training tokens, 128-token rows).
    Rows are already packed (a device's pieces joined by EOS into one stream, cut into rows): only
    each device's last row is partial."""
    from pocketfed.config import load_config
    from pocketfed.data.federated import load_dataset
    from pocketfed.device.leanmodel import Tokenizer
    from pocketfed.model.zoo import tokenizer_dir

    rows = []
    for name, over in (("demo (min 2,000 tokens, rows of 64)", {}),
                       ("min 512 tokens, rows of 128", {"data": {"min_train_tokens": 512, "seq_len": 128}})):
        cfg = load_config(str(CONFIG), over)
        ds = load_dataset(cfg.data, Tokenizer(tokenizer_dir()))
        shares = [1 - ds.device(d).train.num_tokens / ds.device(d).train.mask.numel() for d in ds.device_ids]
        rows.append({"case": f"padding, {name}", "devices": len(shares),
                     "padded_share_mean": round(statistics.mean(shares), 4), "padded_share_max": round(max(shares), 4)})
    return rows


def run() -> list[dict[str, Any]]:
    return device_rows(int(os.environ.get("BENCH_DEPTH_REPS", "3"))) + quality_rows() + padding_rows()


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    rows = (device_rows(int(os.environ.get("BENCH_DEPTH_REPS", "3"))) if which == "device"
            else quality_rows() if which == "quality" else padding_rows() if which == "padding" else run())
    for row in rows:
        print(json.dumps(row))
