"""CLI commands for release and on-device use: export, suggest, generate, bench-runtime.

`register(app)` adds them to the main `pocketfed` typer app. Bad input raises
`pocketfed.errors.UserError`, which the main CLI prints as one sentence (no traceback).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

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
HOME_HELP = "the device's home folder (default: $POCKETFED_HOME, else ~/.pocketfed)"


def _home(home: Path | None) -> Path | None:
    if home is not None:
        return home
    env = os.environ.get("POCKETFED_HOME")
    return Path(env) if env else None


def export_cmd(
    fmt: Annotated[str, typer.Option("--format", help=" | ".join(f.value for f in Format))],
    out: Annotated[Path, typer.Option("--out", help="folder to write the exported model to")],
    run: Annotated[Path | None, typer.Option("--run", help="the --out folder of `pocketfed simulate`")] = None,
    server_db: Annotated[Path | None, typer.Option(
        "--server-db", help="a coordinator's state folder (`pocketfed server --db`): its latest committed model")] = None,
    personal: Annotated[Path | None, typer.Option("--personal", help="a personal adapter folder to merge on top")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace the export already in --out")] = False,
) -> None:
    """Export a simulation run's model (--run) or a deployment's latest committed one (--server-db),
    optionally with a personal adapter, quantized for on-device use."""
    import tempfile  # noqa: PLC0415

    from pocketfed.errors import UserError  # noqa: PLC0415
    from pocketfed.release.export import check_out, export  # noqa: PLC0415  (imports torch)
    from pocketfed.release.formats import parse_format  # noqa: PLC0415

    if (run is None) == (server_db is None):
        raise UserError("give the model to export: --run (a `pocketfed simulate` folder) or --server-db "
                        "(a coordinator's state folder), not both")
    if server_db is not None and personal is not None:
        raise UserError("--personal works with --run; a deployment's personal adapters stay on their devices "
                        "(a device builds its own model: `pocketfed release` on the device)")
    parse_format(fmt)  # refuse an unknown format before any work
    check_out(out, force)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="pocketfed-export-") as scratch, \
            Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                     console=console, transient=True) as progress:
        task = progress.add_task("0/4 checking the run folder", total=len(STEPS))
        source: Any = run
        if server_db is not None:
            from pocketfed.release.deployment import read_deployment  # noqa: PLC0415

            source, version = read_deployment(server_db, Path(scratch) / "adapter")  # the export's inputs, read
            console.print(f"{server_db}: version {version.version}, {version.rounds_applied} committed "
                          f"round{'s' * (version.rounds_applied != 1)}", highlight=False)

        def step(name: str) -> None:
            progress.update(task, description=STEPS[name], completed=list(STEPS).index(name))

        folder = export(source, fmt, out, personal=personal, progress=step)
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


MODEL_HELP = "an export folder (onnx-*); default: the on-device model of --home, checked by the privacy lock"


def _model_and_lock(model: Path | None, home: Path | None) -> tuple[Path, Any]:
    """(the model folder to load, a function giving the lock line). Without --model: the device
    home's runtime model (--home, $POCKETFED_HOME or ~/.pocketfed), and the lock's checks on the
    very folder loaded (`privacy_lock.verify`); with --model: an export folder, the ledger-only line."""
    if model is not None:
        from pocketfed.runtime import privacy_lock  # noqa: PLC0415

        return model, lambda: privacy_lock(model, _home(home))
    from pocketfed.device.home_cli import resolve_home  # noqa: PLC0415
    from pocketfed.runtime.home import model_dir  # noqa: PLC0415
    from pocketfed.runtime.privacy_lock import verify  # noqa: PLC0415

    device = resolve_home(home)
    folder = model_dir(device)

    def lock() -> str:
        report = verify(device, folder)
        return f"privacy lock: {report.line}" if report.ok else f"privacy lock NOT verified: {report.line}"

    return folder, lock


def suggest_cmd(
    prefix: Annotated[str, typer.Argument(help="the text typed so far")],
    model: Annotated[Path | None, typer.Option("--model", help=MODEL_HELP)] = None,
    home: Annotated[Path | None, typer.Option("--home", help=HOME_HELP)] = None,
    threads: Threads = None,
    spin: Spin = None,
) -> None:
    """Show the three most likely next words, as a keyboard would."""
    from pocketfed.runtime import load, suggest  # noqa: PLC0415

    folder, lock = _model_and_lock(model, home)
    words = suggest(load(folder, threads, spin), prefix)
    print("  |  ".join(words) if words else "(no suggestion)")
    print(lock())


def generate_cmd(
    prompt: Annotated[str, typer.Argument(help="the prompt to continue")],
    model: Annotated[Path | None, typer.Option("--model", help=MODEL_HELP)] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="new tokens at most")] = 64,
    home: Annotated[Path | None, typer.Option("--home", help=HOME_HELP)] = None,
    threads: Threads = None,
    spin: Spin = None,
) -> None:
    """Continue a prompt (greedy), streaming tokens as they come."""
    from pocketfed.runtime import generate, load  # noqa: PLC0415

    folder, lock = _model_and_lock(model, home)
    loaded = load(folder, threads, spin)
    print(prompt, end="", flush=True)
    for text in generate(loaded, prompt, max_tokens=max_tokens):
        print(text, end="", flush=True)
    print()
    print(lock())


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
