"""The simulation at scale, in-process vs Ray, and side by side with Flower on the same workload.

Workloads (each run in its own process, its whole process tree watched for memory):
- The fair side-by-side (issue 17): SmolLM2-135M, the demo's 8 devices x 4 local steps (4 x 64
  tokens) x 3 rounds, no evaluation, on 2 cores, two pairings with equal compute: Flower at 1 actor x
  2 threads against pocketfed's in-process backend (2 torch threads), and Flower at 2 actors x 1
  thread against `--backend ray --set sim.device_cpus=1` (2 Ray workers). Flower runs pocketfed's
  own data, sampling seeds and device task (bench/flower_app.py, in bench/.flwr-venv): the same
  tokens; its ClientApp trains the transformers + PEFT model on whole batches, as Flower's LLM
  examples do, while pocketfed's backends train the lean Llama 128 tokens at a time (its default
  `train.micro_tokens`; the same maths to float32 rounding). pocketfed runs
  under jemalloc, as `pocketfed simulate` re-runs itself (`pocketfed.memory.reexec_under_jemalloc`);
  Flower under glibc's malloc, as it ships. Medians of
  `REPEATS` runs per engine.
- `tiny`, every Shakespeare role a device (data.min_train_tokens=1: 1,319 roles, 10 held out),
  100 devices per round, 5 rounds, 1 local step of 4 x 64 tokens, held-out perplexity every round:
  in-process, Ray (1 CPU a worker), and Flower (2 actors x 1 thread), one run each.

Memory is the peak over the run of the summed PSS (proportional set size: a page shared by k
processes counts 1/k in each, so shared memory such as Ray's object store counts once) of the
driver and every process under it (Ray's raylet, GCS and agents, its workers). "worker USS" is the
largest private memory of one Ray worker: under pocketfed it excludes the base model (mapped from
the object store), under Flower it includes the worker's own copy.
Per-round wall time is the mean of rounds 2.. (round 1 also pays for Ray workers' start-up).

Run alone: `.venv/bin/python bench/bench_scale.py [smollm2|tiny]` (both by default);
`run()` returns rows for bench/run.py.
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

REPEATS = 3  # runs per engine in the side-by-side; medians

TINY = {
    "model": {"name": "tiny"},
    "data": {"seq_len": 64, "min_train_tokens": 1, "max_eval_tokens": 256},
    "train": {"steps": 1, "batch_size": 4, "lr": 5e-3},
    "sim": {"devices": 0, "per_round": 100, "rounds": 5, "heldout": 10, "seed": 0, "device_cpus": 1},
    "eval": {"every_round": True, "variants": []},  # held-out perplexity after each round (Flower: the same)
}
SMOLLM2 = {  # the demo's training (configs/shakespeare-smollm2.yaml) without its evaluations
    "model": {"name": "smollm2-135m"},
    "lora": {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "data": {"seq_len": 64, "min_train_tokens": 2000},
    "train": {"steps": 4, "batch_size": 4, "lr": 2e-3, "max_grad_norm": 1.0},
    "sim": {"devices": 8, "per_round": 8, "rounds": 3, "heldout": 0, "seed": 0},
    "eval": {"every_round": False, "variants": []},
}
# (label, pocketfed backend, its CPUs per device, Flower's CPUs per actor): equal compute per pair
PAIRS = [("1 actor x 2 threads", "inprocess", 2, 2), ("2 actors x 1 thread", "ray", 1, 1)]


# ---- measuring a process tree -----------------------------------------------------------------


def watch(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 1800) -> dict[str, Any]:
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
                    name = (p.cmdline() or [""])[0]  # a Ray worker: "ray::DeviceWorker"; not its agents or idle ones
                    if name.startswith("ray::") and name != "ray::IDLE" and not name.endswith("Agent"):
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
    from pocketfed.memory import allocator, reexec_under_jemalloc

    reexec_under_jemalloc()  # as `pocketfed simulate` does (pocketfed.cli.main)
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
        "train_loss": [r["train_loss"] for r in result.history],
        "allocator": allocator(),
    }), flush=True)


def pocketfed_run(workload: dict[str, Any], backend: str, device_cpus: int = 1) -> dict[str, Any]:
    spec = json.loads(json.dumps(workload))
    spec["sim"].update(backend=backend, device_cpus=device_cpus)
    run = watch([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)])
    return {**run, **_result(run, "POCKETFED_RESULT")}


def flower_run(workload: dict[str, Any], device_cpus: int = 1) -> dict[str, Any]:
    """Flower's simulation engine on all cores, each actor declaring (and training on) `device_cpus`."""
    spec = {"overrides": workload, "cpus": len(os.sched_getaffinity(0)), "device_cpus": device_cpus}
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


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median seconds per round, its peak PSS replaced by the median peak PSS."""
    by_speed = sorted(runs, key=_per_round)
    mid = dict(by_speed[len(runs) // 2])
    mid["peak_pss"] = statistics.median(r["peak_pss"] for r in runs)
    mid["peak_worker_uss"] = statistics.median(r["peak_worker_uss"] for r in runs)
    mid["n"] = len(runs)
    return mid


def _row(label: str, engine: str, r: dict[str, Any], model_mb: float) -> dict[str, Any]:
    notes = [f"{r['workers']} Ray workers" if r["workers"] else "one process"]
    if r["workers"]:
        notes.append(f"largest worker private memory (USS) {r['peak_worker_uss'] / MB:.0f} MB vs model {model_mb:.0f} MB")
    if engine.startswith("pocketfed"):
        notes.append("allocates with " + ("jemalloc" if r.get("allocator") == "jemalloc" else "glibc's malloc (no libjemalloc2 here)"))
    if r.get("n", 1) > 1:
        notes.append(f"median of {r['n']} runs")
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


def side_by_side(repeats: int = REPEATS) -> list[dict[str, Any]]:
    """The fair side-by-side on SmolLM2-135M: each pairing's two engines, runs interleaved."""
    label = "SmolLM2-135M, 8 devices x 4 steps x 3 rounds"
    why_not = flower_available()
    rows: list[dict[str, Any]] = []
    for pairing, backend, cpus, flower_cpus in PAIRS:
        ours, theirs = [], []
        for _ in range(repeats):  # interleaved, so a change in the machine's load touches both
            ours.append(pocketfed_run(SMOLLM2, backend, cpus))
            if not why_not:
                theirs.append(flower_run(SMOLLM2, flower_cpus))
        p = _median(ours)
        mb = p["model_bytes"] / MB
        rows.append(_row(f"{label}, {pairing}", f"pocketfed {backend}" + (f", sim.device_cpus={cpus}" if backend == "ray" else ""), p, mb))
        if why_not:
            rows.append({"workload": f"{label}, {pairing}", "engine": "Flower", "notes": f"not run: {why_not}"})
            continue
        f = _median(theirs)
        rows.append(_row(f"{label}, {pairing}", f"Flower (flwr[simulation], Ray), {flower_cpus} CPU per actor", f, mb))
        rows.append({"workload": f"{label}, {pairing}", "engine": "pocketfed vs Flower",
                     "s / round": round(_per_round(f) / _per_round(p), 2),
                     "peak memory MB (PSS, tree)": round(p["peak_pss"] / f["peak_pss"], 2),
                     "notes": "s / round: Flower's over pocketfed's (> 1: pocketfed faster); memory: pocketfed's over "
                              "Flower's (goal <= 0.6); same tokens: first-round mean train loss "
                              f"{p['train_loss'][0]:.6f} vs Flower's {f['train_loss'][0]:.6f}"})
    return rows


def many_devices() -> list[dict[str, Any]]:
    """`tiny` with 100 devices a round: the engines' per-device overheads."""
    label = "tiny, all 1,319 roles, 100/round x 5 rounds, 1 step"
    why_not = flower_available()
    tiny = {b: pocketfed_run(TINY, b) for b in ("inprocess", "ray")}
    mb = tiny["inprocess"]["model_bytes"] / MB
    rows = [_row(label, f"pocketfed {b}", r, mb) for b, r in tiny.items()]
    if why_not:
        return rows + [{"workload": label, "engine": "Flower", "notes": f"not run: {why_not}"}]
    fl = flower_run(TINY, 1)
    rows.append(_row(label, "Flower (flwr[simulation], Ray), 1 CPU per actor", fl, mb))
    rows.append({"workload": label, "engine": "pocketfed ray vs Flower",
                 "s / round": round(_per_round(fl) / _per_round(tiny["ray"]), 2),
                 "peak memory MB (PSS, tree)": round(tiny["ray"]["peak_pss"] / fl["peak_pss"], 2),
                 "notes": "as above: Flower's s / round over pocketfed's; pocketfed's memory over Flower's"})
    return rows


def run() -> list[dict[str, Any]]:
    return side_by_side() + many_devices()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
    else:
        parts = sys.argv[1:] or ["smollm2", "tiny"]
        repeats = int(os.environ.get("BENCH_SCALE_REPEATS", REPEATS))
        for row in (side_by_side(repeats) if "smollm2" in parts else []) + (many_devices() if "tiny" in parts else []):
            print(json.dumps(row), flush=True)
