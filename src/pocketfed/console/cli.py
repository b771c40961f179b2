"""`pocketfed admin-token | console`: the operator's credential, and the console over simulation runs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from pocketfed.errors import UserError

console = Console(stderr=True)


def admin_token(
    db: Path = typer.Option(Path("state"), "--db", help="The coordinator's state folder (pocketfed server --db)."),
) -> None:
    """Print the operator credential (for the console and `pocketfed status`), creating it if missing."""
    from pocketfed.server import operator

    if not db.is_dir():
        raise UserError(f"--db {str(db)!r} is not a folder; give the state folder of `pocketfed server --db`")
    path = operator.token_path(db)
    existed = path.is_file()
    token = operator.load_or_create(db)
    print(token)  # stdout holds the token alone, for `$(pocketfed admin-token --db state)`
    console.print(f"{'read' if existed else 'created'} {path} (mode 0600); paste it into the console at "
                  "/console, or give the file to `pocketfed status --token-file`", highlight=False)


def console_runs(
    runs: Path = typer.Argument(Path("runs"), help="A folder of simulation runs (each with metrics.jsonl), or one run."),
    port: int = typer.Option(8050, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback unless you mean to share the runs)."),
) -> None:
    """The console's charts over simulation run folders, side by side, read only."""
    import uvicorn

    from pocketfed.console.routes import runs_app
    from pocketfed.console.views import run_folders

    if not runs.is_dir():
        raise UserError(f"{str(runs)!r} is not a folder; give a folder of `pocketfed simulate --out` runs")
    found = run_folders(runs)
    if not found:
        raise UserError(f"{str(runs)!r} holds no simulation run (a folder with metrics.jsonl, from `pocketfed simulate --out`)")
    console.print(f"[bold]pocketfed console[/] http://{host}:{port}/console over {len(found)} runs in {runs}: "
                  + ", ".join(p.name for p in found), highlight=False)
    uvicorn.run(runs_app(runs), host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    app.command("admin-token")(admin_token)
    app.command("console")(console_runs)
