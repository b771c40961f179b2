"""Issue 7 figures: the simulation at scale, in-process vs Ray, and side by side with Flower.

Workloads (each run in its own process, its whole process tree watched for memory):
- `tiny`, every Shakespeare role a device (data.min_train_tokens=1: 1,319 roles, 10 held out),
  100 devices per round, 5 rounds, 1 local step of 4 x 64 tokens, held-out perplexity every round: in-process, Ray, and Flower's
  simulation engine (bench/flower_app.py, in bench/.flwr-venv) on the same workload.
- `smollm2-135m`, every device of the default filter, 16 per round, 1 round of 1 local step:
  in-process vs Ray, to show one copy of the base model (~540 MB float32) whatever the workers.
  Flower on the same, for its memory.

Memory is the peak over the run of the summed PSS (proportional set size: a page shared by k
processes counts 1/k in each, so shared memory such as Ray's object store counts once) of the
driver and every process under it (Ray's raylet and GCS, its workers). "worker USS" is the largest
private memory of one Ray worker: under pocketfed it excludes the base model (mapped from the
object store), under Flower it includes the worker's own copy.
Per-round wall time is the mean of rounds 2.. (round 1 also pays for Ray workers' start-up).

Run alone: `.venv/bin/python bench/bench_scale.py`; `run()` returns rows for bench/run.py.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FLOWER_PY = ROOT / "bench" / ".flwr-venv" / "bin" / "python"
MB = 1 << 20

TINY = {
    "model": {"name": "tiny"},
    "data": {"seq_len": 64, "min_train_tokens": 1, "max_eval_tokens": 256},
    "train": {"steps": 1, "batch_size": 4, "lr": 5e-3},
    "sim": {"devices": 0, "per_round": 100, "rounds": 5, "heldout": 10, "seed": 0},
    "eval": {"every_round": True, "variants": []},  # held-out perplexity after each round (Flower: the same)
}
SMOLLM2 = {
    "model": {"name": "smollm2-135m"},
    "data": {"seq_len": 64},
    "train": {"steps": 1, "batch_size": 4, "lr": 2e-3},
    "sim": {"devices": 0, "per_round": 16, "rounds": 1, "heldout": 0, "seed": 0},
    "eval": {"every_round": False, "variants": []},
}


# ---- measuring a process tree -----------------------------------------------------------------


def watch(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 480) -> dict[str, Any]:
    """Run `cmd`, sampling the PSS of its process tree; -> rc, wall, peak_pss, peak_worker_uss, stdout."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"pss": 0, "worker_uss": 0, "workers": 0}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            total, workers = 0, 0
            try:
                tree = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            for p in tree:
                try:
                    mem = p.memory_full_info()
                    total += mem.pss
                    if "ray::" in " ".join(p.cmdline()[:1]) and "IDLE" not in p.cmdline()[0]:
                        workers += 1
                        peak["worker_uss"] = max(peak["worker_uss"], mem.uss)
                except psutil.Error:
                    continue
            peak["pss"] = max(peak["pss"], total)
            peak["workers"] = max(peak["workers"], workers)
            done.wait(0.25)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    done.set()
    t.join()
    return {"rc": proc.returncode, "wall": time.perf_counter() - start, "peak_pss": peak["pss"],
            "peak_worker_uss": peak["worker_uss"], "workers": peak["workers"], "stdout": out}


def _result(run: dict[str, Any], tag: str) -> dict[str, Any]:
    for line in run["stdout"].splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1 :])
    raise RuntimeError(f"no {tag} in the output (rc {run['rc']}):\n" + run["stdout"][-3000:])


# ---- one pocketfed run (a child process) --------------------------------------------------------


def child(overrides: dict[str, Any]) -> None:
    from pocketfed.config import load_config
    from pocketfed.simulate import simulate

    cfg = load_config(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        result = simulate(cfg, Path(tmp) / "run")
    s = result.summary
    held = result.history[-1].get("heldout")
    print("POCKETFED_RESULT " + json.dumps({
        "round_seconds": [r["seconds"] for r in result.history],
        "heldout_perplexity": held["perplexity"] if held else None,
        "population": s["devices"]["population"],
        "model_bytes": s["model_bytes"],
        "dropouts": sum(r["dropouts"] for r in result.history),
    }), flush=True)


def pocketfed_run(workload: dict[str, Any], backend: str) -> dict[str, Any]:
    spec = json.loads(json.dumps(workload))
    spec["sim"]["backend"] = backend
    run = watch([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)])
    return {**run, **_result(run, "POCKETFED_RESULT")}


def flower_run(workload: dict[str, Any]) -> dict[str, Any]:
    spec = {"overrides": workload, "cpus": len(os.sched_getaffinity(0)), "device_cpus": 1}
    run = watch([str(FLOWER_PY), str(ROOT / "bench" / "flower_app.py"), json.dumps(spec)])
    return {**run, **_result(run, "FLOWER_RESULT")}


def flower_available() -> str:
    """'' when bench/.flwr-venv holds Flower, else why not (it is set up by bench/setup_flower.sh)."""
    if not FLOWER_PY.exists():
        setup = subprocess.run(["bash", str(ROOT / "bench" / "setup_flower.sh")], capture_output=True, text=True)
        if setup.returncode != 0:
            return "bench/setup_flower.sh failed: " + (setup.stderr.strip().splitlines() or ["?"])[-1]
    ok = subprocess.run([str(FLOWER_PY), "-c", "import flwr.simulation, pocketfed"], capture_output=True, text=True)
    return "" if ok.returncode == 0 else "Flower's venv cannot import flwr.simulation: " + ok.stderr.strip()[-200:]


# ---- the rows -----------------------------------------------------------------------------------


def _per_round(r: dict[str, Any]) -> float:
    s = r["round_seconds"]
    return statistics.mean(s[1:]) if len(s) > 1 else s[0]


def _row(label: str, engine: str, r: dict[str, Any], model_mb: float) -> dict[str, Any]:
    notes = [f"{r['workers']} Ray workers" if r["workers"] else "one process"]
    if r["workers"]:
        notes.append(f"largest worker private memory (USS) {r['peak_worker_uss'] / MB:.0f} MB vs model {model_mb:.0f} MB")
    if r.get("dropouts"):
        notes.append(f"{r['dropouts']} dropouts")
    ppl = r.get("heldout_perplexity")
    return {
        "workload": label,
        "engine": engine,
        "s / round": round(_per_round(r), 2),
        "round 1 s": round(r["round_seconds"][0], 1),
        "total wall s": round(r["wall"], 1),
        "peak memory MB (PSS, tree)": round(r["peak_pss"] / MB),
        "held-out ppl": round(ppl, 2) if ppl is not None and ppl == ppl else "-",
        "notes": "; ".join(notes),
    }


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    tiny_label = "tiny, all 1,319 roles, 100/round x 5 rounds, 1 step"
    smol_label = "SmolLM2-135M, 16/round x 1 round, 1 step"
    why_not = flower_available()

    tiny = {b: pocketfed_run(TINY, b) for b in ("inprocess", "ray")}
    mb = tiny["inprocess"]["model_bytes"] / MB
    rows += [_row(tiny_label, f"pocketfed {b}", r, mb) for b, r in tiny.items()]
    if not why_not:
        fl = flower_run(TINY)
        rows.append(_row(tiny_label, "Flower (flwr[simulation], Ray)", fl, mb))
        for b in ("inprocess", "ray"):
            rows.append({"workload": tiny_label, "engine": f"speed-up of pocketfed {b} over Flower",
                         "s / round": round(_per_round(fl) / _per_round(tiny[b]), 2),
                         "notes": "Flower s/round over pocketfed s/round (goal >= 1.25)"})
    else:
        rows.append({"workload": tiny_label, "engine": "Flower", "notes": f"not run: {why_not}"})

    smol = {b: pocketfed_run(SMOLLM2, b) for b in ("inprocess", "ray")}
    mb = smol["inprocess"]["model_bytes"] / MB
    rows += [_row(smol_label, f"pocketfed {b}", r, mb) for b, r in smol.items()]
    if not why_not:
        rows.append(_row(smol_label, "Flower (flwr[simulation], Ray)", flower_run(SMOLLM2), mb))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
    else:
        for row in run():
            print(row)
