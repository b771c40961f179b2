"""The `pocketfed` command (typer + rich). User mistakes print one sentence, never a traceback."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pocketfed.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated fine-tuning of pocket-sized language models.")
data_app = typer.Typer(no_args_is_help=True, help="Federated datasets.")
app.add_typer(data_app, name="data")
console = Console()


def _overrides(
    set_: list[str], model: str | None, devices: str | None, per_round: int | None, rounds: int | None, seed: int | None
) -> dict[str, Any]:
    from pocketfed.config import parse_overrides

    ov = parse_overrides(set_)
    flags: dict[tuple[str, str], Any] = {("model", "name"): model, ("sim", "per_round"): per_round,
                                         ("sim", "rounds"): rounds, ("sim", "seed"): seed}
    if devices is not None:
        if devices == "all":
            flags[("sim", "devices")] = 0
        elif devices.isdigit() and int(devices) > 0:
            flags[("sim", "devices")] = int(devices)
        else:
            raise UserError(f"--devices must be a positive number or 'all', got {devices!r}")
    for (section, key), value in flags.items():
        if value is not None:
            ov.setdefault(section, {})[key] = value
    return ov


@app.command()
def simulate(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config (see configs/)."),
    out: Path = typer.Option(Path("runs/latest"), "--out", "-o", help="Run folder to write."),
    model: Optional[str] = typer.Option(None, help="Zoo name (smollm2-135m, tiny) or a local HF model folder."),
    devices: Optional[str] = typer.Option(None, help="Training population size, or 'all'."),
    per_round: Optional[int] = typer.Option(None, "--per-round", help="Devices sampled per round."),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds."),
    seed: Optional[int] = typer.Option(None, help="Run seed."),
    backend: Optional[str] = typer.Option(None, help="inprocess (default) or ray."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="A Ray cluster, e.g. ray://head:10001."),
    set_: list[str] = typer.Option([], "--set", help="Override any config key: --set train.lr=3e-4"),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
) -> None:
    """Federated LoRA fine-tuning of virtual devices, end to end, with evaluation and a report."""
    from pocketfed.config import load_config
    from pocketfed.simulate import simulate as run_simulation

    ov = _overrides(set_, model, devices, per_round, rounds, seed)
    for key, value in (("backend", backend), ("ray_address", ray_address)):
        if value is not None:
            ov.setdefault("sim", {})[key] = value
    cfg = load_config(config, ov)
    console.print(f"[bold]pocketfed simulate[/] model={cfg.model.name} dataset={cfg.data.dataset} "
                  f"strategy={cfg.server.strategy.value} rounds={cfg.sim.rounds} -> {out}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        stage = progress.add_task("set-up", total=None)
        bar: dict[str, Any] = {"task": None}

        def on_event(kind: str, info: dict[str, Any]) -> None:
            if kind == "stage":
                progress.update(stage, description=info["name"])
                if info.get("total"):
                    bar["task"] = progress.add_task(f"  {info['name']}", total=info["total"])
            elif kind == "round_start":
                progress.update(stage, description=f"round {info['round'] + 1}/{cfg.sim.rounds}")
                bar["task"] = progress.add_task(f"  round {info['round'] + 1} devices", total=info["devices"])
            elif kind == "device_done" and bar["task"] is not None:
                progress.advance(bar["task"])
            elif kind == "round_end":
                held = info.get("heldout")
                msg = (f"round {info['round'] + 1}: loss {info['train_loss']:.3f}" if info["train_loss"] is not None
                       else f"round {info['round'] + 1}: skipped (no eligible device finished)")
                if info.get("failed"):  # a non-finite result: nothing committed
                    msg = f"round {info['round'] + 1}: failed ({info['failed']})"
                if held:
                    msg += f", held-out perplexity {held['perplexity']:.2f}"
                if info.get("attack"):
                    msg += f", backdoor success {100 * info['attack']['backdoor_success']:.0f}%"
                if info.get("defense"):
                    d = info["defense"]
                    msg += (f" [refused {len(d['refused'])}, clipped {d['clipped']}, "
                            f"token claims cut {d['tokens_bounded']}]")
                progress.console.print(msg)

        result = run_simulation(cfg, out, resume=resume, on_event=on_event)
        progress.update(stage, description="done", total=1, completed=1)
    _print_summary(result.summary, out)


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    from pocketfed.config import VARIANTS

    table = Table(title=f"Results ({summary['model']}, {summary['devices']['trained']} trained devices, "
                        f"{summary['devices']['heldout']} held-out)")
    for col in ("variant", "own test ppl", "top-1", "top-3", "held-out ppl", "held-out top-3"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for v in VARIANTS:
        if v not in summary:
            continue
        s, h = summary[v], summary[v].get("heldout")
        table.add_row(v, f"{s['perplexity']:.2f}", f"{s['top1']:.3f}", f"{s['top3']:.3f}",
                      f"{h['perplexity']:.2f}" if h else "-", f"{h['top3']:.3f}" if h else "-")
    console.print(table)
    if p := summary.get("personalization"):
        console.print(f"personalization: kept by {p['kept']} of {p['devices']} devices (the rest keep the global model); "
                      f"made {len(p['worse'])} worse on their own test split" + (f": {', '.join(p['worse'])}" if p["worse"] else ""))
    console.print(f"upload per device per round: {summary['bytes_up_per_device_round'] / 1e6:.2f} MB "
                  f"(full model {summary['model_bytes'] / 1e6:.0f} MB); wall {summary['wall_seconds']:.0f} s; "
                  f"outputs in {out}/")


@data_app.command("stats")
def data_stats(
    dataset: str = typer.Argument(..., help="shakespeare, or a folder for textdir"),
    model: str = typer.Option("smollm2-135m", help="Tokenizer of this model counts the tokens."),
    min_train_tokens: int = typer.Option(0, help="Minimum-size filter (0 = show every device)."),
) -> None:
    """Devices and tokens per device (min / median / max) of a federated dataset."""
    import statistics

    from transformers import AutoTokenizer

    from pocketfed.config import DataConfig
    from pocketfed.data.federated import load_dataset
    from pocketfed.model.zoo import resolve, tokenizer_dir

    cfg = DataConfig(min_train_tokens=min_train_tokens)
    if dataset != "shakespeare":
        cfg.dataset, cfg.path = "textdir", dataset
        if not Path(dataset).is_dir():
            raise UserError(f"unknown dataset {dataset!r}: give 'shakespeare' or an existing folder (textdir)")
    tok_path = tokenizer_dir() if model in ("smollm2-135m", "tiny") else resolve(model)[0]
    ds = load_dataset(cfg, AutoTokenizer.from_pretrained(tok_path))
    counts = ds.train_token_counts(ds.device_ids)
    table = Table(title=f"{ds.name}: {len(ds.device_ids)} devices")
    for col in ("", "min", "median", "max", "total"):
        table.add_column(col, justify="right")
    table.add_row("train tokens / device", str(min(counts)), f"{statistics.median(counts):.0f}", str(max(counts)), str(sum(counts)))
    console.print(table)
    top = sorted(zip(counts, ds.device_ids), reverse=True)[:5]
    console.print("largest devices: " + ", ".join(f"{d} ({n})" for n, d in top))


def _register_extensions() -> None:
    """Each area adds its own commands (privacy, export/runtime, server/device, budgets)."""
    from pocketfed.device import cli as device_cli
    from pocketfed.device import home_cli
    from pocketfed.privacy import cli as privacy_cli
    from pocketfed.release import cli as release_cli
    from pocketfed import deploy_cli as http_cli
    from pocketfed.app import cli as app_cli
    from pocketfed.console import cli as console_cli

    for module in (privacy_cli, release_cli, http_cli, device_cli, home_cli, app_cli, console_cli):
        module.register(app)


def main() -> None:
    import os
    import warnings

    if sys.argv[1:2] == ["simulate"]:  # the training command: jemalloc's smaller heap (pocketfed.memory)
        from pocketfed.memory import reexec_under_jemalloc

        reexec_under_jemalloc()

    # The CLI shows its own rich progress; library progress bars and deprecation chatter are noise here.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    _register_extensions()
    try:
        app(standalone_mode=False)
    except UserError as e:
        Console(stderr=True).print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        Console(stderr=True).print("aborted")
        sys.exit(130)
    except Exception as e:  # usage errors arrive here in non-standalone mode
        import click

        # typer >= 0.29 raises its own copy of click's exceptions (typer.TyperException), which
        # click.ClickException does not catch: both have show() and exit_code
        if isinstance(e, click.exceptions.ClickException | typer.TyperException) and hasattr(e, "show"):
            e.show()
            sys.exit(getattr(e, "exit_code", 2))
        raise


