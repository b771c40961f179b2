"""CLI commands for release and on-device use: export, suggest, generate, bench-runtime.

`register(app)` adds them to the main `pocketfed` typer app. Bad input raises
`pocketfed.errors.UserError`, which the main CLI prints as one sentence (no traceback).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from pocketfed.release.formats import Format

STEPS = {
    "load": "1/4 loading the base model and adapters",
    "merge": "2/4 merging the adapters into the weights",
    "quantize": "3/4 quantizing and writing",
    "write": "4/4 writing the manifest",
}
HOME_HELP = "the device's home folder holding ledger.jsonl (default: $POCKETFED_HOME)"


def _home(home: Path | None) -> Path | None:
    if home is not None:
        return home
    env = os.environ.get("POCKETFED_HOME")
    return Path(env) if env else None


def export_cmd(
    run: Annotated[Path, typer.Option("--run", help="the --out folder of `pocketfed simulate`")],
    fmt: Annotated[str, typer.Option("--format", help=" | ".join(f.value for f in Format))],
    out: Annotated[Path, typer.Option("--out", help="folder to write the exported model to")],
    personal: Annotated[Path | None, typer.Option("--personal", help="a personal adapter folder to merge on top")] = None,
) -> None:
    """Merge a run's adapter (and a personal one) into the base model and export it for on-device use."""
    from pocketfed.release.export import export  # noqa: PLC0415  (imports torch)
    from pocketfed.release.formats import parse_format  # noqa: PLC0415

    parse_format(fmt)  # refuse an unknown format before any work
    console = Console()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("0/4 checking the run folder", total=len(STEPS))

        def step(name: str) -> None:
            progress.update(task, description=STEPS[name], completed=list(STEPS).index(name))

        folder = export(run, fmt, out, personal=personal, progress=step)
    from pocketfed.runtime.model import read_manifest  # noqa: PLC0415

    _, manifest = read_manifest(folder)
    console.print(
        f"exported {manifest['format']} to {folder} ({manifest['total_bytes'] / 1e6:.1f} MB, "
        f"base {manifest['base_model']}, {'personal' if manifest['personalized'] else 'global'} adapter)"
    )


THREADS_HELP = "ONNX Runtime threads (default: 2, or 1 on a single-core device)"
SPIN_HELP = ("whether idle worker threads spin (fast on an idle CPU, slow on a busy one); "
             "default: spin when a core is free at start-up")
Threads = Annotated[int | None, typer.Option("--threads", help=THREADS_HELP)]
Spin = Annotated[bool | None, typer.Option("--spin/--no-spin", help=SPIN_HELP, show_default=False)]


def suggest_cmd(
    prefix: Annotated[str, typer.Argument(help="the text typed so far")],
    model: Annotated[Path, typer.Option("--model", help="an export folder (onnx-*)")],
    home: Annotated[Path | None, typer.Option("--home", help=HOME_HELP)] = None,
    threads: Threads = None,
    spin: Spin = None,
) -> None:
    """Show the three most likely next words, as a keyboard would."""
    from pocketfed.runtime import load, privacy_lock, suggest  # noqa: PLC0415

    words = suggest(load(model, threads, spin), prefix)
    print("  |  ".join(words) if words else "(no suggestion)")
    print(privacy_lock(model, _home(home)))


def generate_cmd(
    prompt: Annotated[str, typer.Argument(help="the prompt to continue")],
    model: Annotated[Path, typer.Option("--model", help="an export folder (onnx-*)")],
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="new tokens at most")] = 64,
    home: Annotated[Path | None, typer.Option("--home", help=HOME_HELP)] = None,
    threads: Threads = None,
    spin: Spin = None,
) -> None:
    """Continue a prompt (greedy), streaming tokens as they come."""
    from pocketfed.runtime import generate, load, privacy_lock  # noqa: PLC0415

    loaded = load(model, threads, spin)
    print(prompt, end="", flush=True)
    for text in generate(loaded, prompt, max_tokens=max_tokens):
        print(text, end="", flush=True)
    print()
    print(privacy_lock(model, _home(home)))


def bench_runtime_cmd(
    model: Annotated[Path, typer.Option("--model", help="an export folder (onnx-*)")],
    threads: Threads = None,
    spin: Spin = None,
) -> None:
    """Measure decode tok/s (128 and 1,024 context), time to first token, suggest latency, RSS, size."""
    from pocketfed.runtime.bench import measure  # noqa: PLC0415

    row = measure(model, threads=threads, spin=spin)
    table = Table(title=f"runtime benchmark: {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in row.items():
        table.add_row(key, str(value))
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
    app.command("suggest")(suggest_cmd)
    app.command("generate")(generate_cmd)
    app.command("bench-runtime")(bench_runtime_cmd)
