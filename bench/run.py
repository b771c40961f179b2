"""`make bench`: run every benchmark and write docs/BENCHMARKS.md (figure, command, machine).

Each bench module has `run() -> list[dict]`; a row's keys become its table's columns. A
benchmark that cannot run here (a missing optional package, say) is reported, not fatal.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SECTIONS = [
    ("Simulation (issue 2)", "bench_sim"),
    ("Secure aggregation (issue 4)", "bench_secagg"),
    ("Differential privacy on Shakespeare (issue 4)", "bench_dp"),
    ("On-device inference (issue 5)", "bench_runtime"),
    ("Device budgets (issue 6)", "bench_budget"),
    ("Scale-out (issue 7)", "bench_scale"),
    ("Coordinator load (issue 3)", "bench_server"),
]


def machine() -> str:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def table(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/BENCHMARKS.md")
    ap.add_argument("--only", nargs="*", help="module names to run (default: all)")
    args = ap.parse_args()
    parts = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`.venv/bin/python bench/run.py`) on {datetime.date.today()}.",
        f"Machine: {machine()}. Shared and noisy: compare ratios within a table, not across runs.",
        "",
    ]
    for title, module in SECTIONS:
        if args.only and module not in args.only:
            continue
        print(f"== {title} ({module})", flush=True)
        start = time.perf_counter()
        try:
            # The runtime bench merges a trained adapter when `make demo` has left one.
            trained = {"run_dir": "runs/demo"} if module == "bench_runtime" and Path("runs/demo/adapter").is_dir() else {}
            rows = importlib.import_module(module).run(**trained)
            body = table(rows)
        except ModuleNotFoundError as e:
            body = f"_not run: {e}_"
        except Exception:  # a broken benchmark is reported in the file, the others still run
            body = "_failed:_\n\n```\n" + traceback.format_exc()[-2000:] + "\n```"
        parts += [f"## {title}", "", f"Command: `.venv/bin/python bench/run.py --only {module}` "
                  f"({time.perf_counter() - start:.0f} s)", "", body, ""]
        print(body, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
