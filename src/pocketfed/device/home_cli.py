"""A device home's commands: `pocketfed release status|pull|verify|trust` and `pocketfed personalize`.

`release` is light (no torch import: `pocketfed.device.releases`, `pocketfed.runtime.home`, the
privacy lock); `pull` builds the runtime model in a child process. `personalize` trains, so it
loads torch. `register(app)` adds them to the main typer app; bad input raises UserError.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pocketfed.errors import UserError

release_app = typer.Typer(no_args_is_help=True, help="The signed releases a device holds: status, pull, verify, trust.")
console = Console()
HOME_HELP = "the device's home folder (default: $POCKETFED_HOME, else ~/.pocketfed)"
Home = Annotated[Path | None, typer.Option("--home", help=HOME_HELP)]


def resolve_home(home: Path | None) -> Path:
    """--home, else $POCKETFED_HOME, else ~/.pocketfed; a UserError when it is not a folder."""
    path = (home or Path(os.environ.get("POCKETFED_HOME") or "~/.pocketfed")).expanduser()
    if not path.is_dir():
        raise UserError(f"device home {str(path)!r} does not exist; give the --home of `pocketfed device`")
    return path


def _device_info(home: Path) -> dict:
    from pocketfed.runtime import home as device_home  # noqa: PLC0415

    info = device_home.read_json(home / device_home.DEVICE_INFO)
    if info is None:
        raise UserError(f"device home {str(home)!r} has no {device_home.DEVICE_INFO}: run `pocketfed device` with "
                        "this --home once (it records the server and the data folder)")
    return info


@release_app.command("status")
def status_cmd(home: Home = None) -> None:
    """The installed release, the trusted key, the personal adapter and the runtime model."""
    from pocketfed.runtime import home as device_home  # noqa: PLC0415
    from pocketfed.runtime.privacy_lock import key_fingerprint, verify  # noqa: PLC0415

    home = resolve_home(home)
    pin = home / device_home.RELEASE_PIN
    table = Table(title=f"device home {home}", show_header=False)
    table.add_column("")
    table.add_column("")
    table.add_row("trusted release key", key_fingerprint(pin.read_text().strip()) if pin.is_file() else "none yet")
    table.add_row("installed release", device_home.current_release(home) or "none")
    table.add_row("releases kept", ", ".join(map(str, device_home.installed_versions(home))) or "none")
    personal = device_home.personal_record(home)
    table.add_row("personal adapter", f"release {personal.get('release')}, {personal.get('date')}, gain "
                  f"{100 * float(personal.get('gain') or 0):.1f}% lower validation perplexity" if personal else "none")
    record = device_home.read_json(home / device_home.MODEL_DIR / device_home.MODEL_RECORD)
    table.add_row("runtime model", f"{record.get('format')} of release {record.get('release')}, built "
                  f"{record.get('built_at')}" if record else "none")
    report = verify(home)
    table.add_row("privacy lock", report.line if report.ok else f"[red]not verified:[/] {report.line}")
    console.print(table)


@release_app.command("verify")
def verify_cmd(home: Home = None) -> None:
    """Run the privacy lock's checks (signature, weights, ledger, epsilon); exit 1 if one fails."""
    from pocketfed.runtime.privacy_lock import verify  # noqa: PLC0415

    report = verify(resolve_home(home))
    for check in report.checks:
        mark = "[green]ok[/]  " if check.ok else "[red]FAIL[/]"
        console.print(f"{mark} {check.name:<9} {check.detail}", highlight=False)
    console.print(f"privacy lock: {report.line}" if report.ok else f"[red]privacy lock not verified:[/] {report.line}",
                  highlight=False)
    if not report.ok:
        sys.exit(1)


@release_app.command("pull")
def pull_cmd(home: Home = None,
             build: Annotated[bool, typer.Option("--build/--no-build", help="build the runtime model")] = True) -> None:
    """Fetch the newest signed release from the server this home joined, verify and install it."""
    import time  # noqa: PLC0415

    from pocketfed.device import http_client as http  # noqa: PLC0415
    from pocketfed.device import ondevice, releases  # noqa: PLC0415
    from pocketfed import signing  # noqa: PLC0415

    home = resolve_home(home)
    info = _device_info(home)
    server, ca = str(info["server"]), info.get("ca")
    identity = home / "identity.key"
    if not identity.is_file():
        raise UserError(f"device home {str(home)!r} has no identity.key; run `pocketfed device` with it first")
    key = signing.load_or_create_key(home, identity.name)
    client = http.DeviceClient(http.connect(server, ca), key)
    try:
        trusted = releases.trusted_release_key(home, None, client.release_key, server)
        latest = client.latest_release()
        manifest, _, fresh = releases.accept_release(home, trusted, latest, client.adapter, time.time(),
                                                     releases.installed_task(home), releases.finite_problem)
    except http.Unreachable as e:
        raise UserError(f"cannot reach the server at {server}: {e}") from None
    except http.ServerRefused as e:
        raise UserError(f"the server at {server} refused: {e.detail}") from None
    except signing.ReleaseRejected as e:
        raise UserError(f"the release from {server} was refused: {e}") from None
    console.print(f"release {manifest.version} " + ("installed" if fresh else "was already installed"), highlight=False)
    if build and not ondevice.model_is_current(home):
        with console.status("building the on-device model (onnx-int4)"):
            out = ondevice.convert(home)
        console.print(f"on-device model built in {out['model']} (peak memory {out['peak_rss_mb']:.0f} MB)", highlight=False)


@release_app.command("trust")
def trust_cmd(key: Annotated[str, typer.Option("--key", help="the new coordinator's release public key (64 hex digits)")],
              home: Home = None) -> None:
    """Trust a new coordinator's release key (the old key's releases are kept aside)."""
    from pocketfed.device import releases  # noqa: PLC0415

    console.print(releases.trust(resolve_home(home), key), highlight=False)


def personalize_cmd(home: Home = None,
                    data: Annotated[Path | None, typer.Option("--data", help="the device's data folder "
                                                              "(default: the one `pocketfed device` used)")] = None) -> None:
    """Train the personal adapter on this device's data for the installed release, keep it if it
    beats the global model on a local validation split, and rebuild the runtime model."""
    home = resolve_home(home)
    info = _device_info(home)
    data_dir = (data or Path(str(info["data"]))).expanduser()
    if not data_dir.is_dir():
        raise UserError(f"--data {str(data_dir)!r} is not a folder of .txt/.md/.jsonl files")
    with console.status("loading the model and this device's data"):
        from pocketfed.device import agent, ondevice  # noqa: PLC0415  (torch)
        from pocketfed.device.profiles import get_profile  # noqa: PLC0415

        profile = get_profile(info["profile"], info.get("profiles_file") or "") if info.get("profile") else None
        session = agent.home_session(home, data_dir, "device", profile)
    if session is None:
        raise UserError(f"device home {str(home)!r} has no installed release to personalize; run "
                        f"`pocketfed release pull --home {home}`")
    with console.status("training the personal adapter (early stopping on a local validation split)"):
        out = ondevice.personalize_home(home, session.model, session.train, force=True)
    del session
    if out.get("personalized"):
        console.print(f"personal adapter kept: validation perplexity {100 * out['gain']:.1f}% lower than the global "
                      f"model's after {out['steps']} steps", highlight=False)
    else:
        console.print(f"no personal adapter kept: {out.get('reason')}", highlight=False)
    if not ondevice.model_is_current(home):
        with console.status("building the on-device model (onnx-int4)"):
            built = ondevice.convert(home)
        console.print(f"on-device model built in {built['model']} (peak memory {built['peak_rss_mb']:.0f} MB)",
                      highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(release_app, name="release")
    app.command("personalize")(personalize_cmd)
