"""`pocketfed certs | server | enroll | device | status`: real federated rounds over HTTPS."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from pocketfed.device.floors import PrivacyFloors
from pocketfed.errors import UserError

console = Console()


def certs(out: Path = typer.Option(Path("certs"), "--out", "-o", help="Folder to write ca.pem, server.pem and keys into.")) -> None:
    """A development CA and a server certificate for 127.0.0.1 / localhost."""
    from pocketfed.server.http.certs import make_dev_certs

    make_dev_certs(out)
    console.print(f"wrote {out}/ca.pem (give to devices as --ca) and {out}/server.pem, server.key (--tls {out})")


def server(
    db: Path = typer.Option(Path("state"), "--db", help="State folder (SQLite + blobs); reused on restart."),
    port: int = typer.Option(8443, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    tls: Optional[Path] = typer.Option(None, "--tls", help="Folder with server.pem and server.key (pocketfed certs)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config (see configs/)."),
    model: Optional[str] = typer.Option(None, help="Zoo name (smollm2-135m, tiny) or a local HF model folder."),
    set_: list[str] = typer.Option([], "--set", help="Override any config key: --set deploy.goal=20"),
) -> None:
    """The coordinator: rounds over HTTPS with state in --db (crash-safe: restart it on the same folder)."""
    import uvicorn

    from pocketfed.config import load_config, parse_overrides
    from pocketfed.server.coordinator import open_coordinator
    from pocketfed.server import operator
    from pocketfed.server.http.app import create_app
    from pocketfed.server.http.certs import server_files
    from pocketfed.server.http.limits import server_config

    ov = parse_overrides(set_)
    if model is not None:
        ov.setdefault("model", {})["name"] = model
    cfg = load_config(config, ov)
    ssl: dict[str, Any] = {}
    if tls is not None:
        cert, key = server_files(tls)
        ssl = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    elif host not in ("127.0.0.1", "localhost", "::1"):
        raise UserError(f"--host {host} is not loopback: give --tls (plain http is for loopback trials only)")

    def init_params() -> dict:
        from pocketfed.model import lora
        from pocketfed.model.zoo import load_base

        base = load_base(cfg.model.name, cfg.model.cache_dir)
        return lora.get_state(lora.attach(base.model, cfg.lora, seed=cfg.sim.seed))

    _log_to_console()  # the coordinator's warnings (config changes, aborted rounds) appear here
    t0 = time.perf_counter()
    coord = open_coordinator(db, cfg, _model_id(cfg.model.name, cfg.model.cache_dir), init_params)
    operator_token = operator.load_or_create(db)  # the path is printed below, never the token
    latest = coord.store.latest_version()
    ready = (f"[bold]pocketfed server[/] {'https' if ssl else 'http'}://{host}:{port} state={db} "
             f"model={coord.model_id} version={latest.version if latest else 0} "
             f"rounds {latest.rounds_applied if latest else 0}/{cfg.sim.rounds}")

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)  # a port already in use exits here, with uvicorn's error, before "ready"
            if self.started:  # bound and listening: a device that connects now is served
                console.print(f"{ready} (ready in {time.perf_counter() - t0:.1f} s)")
                console.print(f"operator token (for `pocketfed status --token-file`): {operator.token_path(db)}",
                              highlight=False, soft_wrap=True)  # a path to copy: never broken across lines
                console.print(f"console: {'https' if ssl else 'http'}://{host}:{port}/console "
                              f"(its credential: `pocketfed admin-token --db {db}`)", highlight=False, soft_wrap=True)

    # deploy's read timeouts and connection cap (`pocketfed.server.http.limits`)
    Server(server_config(create_app(coord, operator_token=operator_token), cfg.deploy, host, port, log_level="warning",
                         **ssl)).run()


def _log_to_console() -> None:
    """Print the `pocketfed` loggers' warnings and notes (the coordinator's) on stderr, with the time."""
    import logging

    log = logging.getLogger("pocketfed")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def enroll(
    db: Path = typer.Option(Path("state"), "--db", help="The coordinator's state folder (pocketfed server --db)."),
    count: int = typer.Option(1, "--count", "-n", help="How many one-time tokens to make."),
    ttl_hours: float = typer.Option(168.0, "--ttl-hours", help="Hours each token stays valid."),
) -> None:
    """Print one-time enrollment tokens: a device registers once with one (`pocketfed device --enroll-token`)."""
    from pocketfed.server.enrollment import enroll as make_tokens  # light: no round engine, no torch
    from pocketfed.server.store import DB_FILE, Store

    if not (db / DB_FILE).is_file():
        raise UserError(f"--db {str(db)!r} holds no coordinator state; start `pocketfed server --db {db}` first")
    for token in make_tokens(Store(db), count, ttl_hours * 3600):
        print(token)


def _model_id(name: str, cache_dir: str) -> str:
    if name in ("smollm2-135m", "tiny"):  # zoo names are their own ids (no model load on restart)
        return name
    from pocketfed.model.zoo import resolve

    return resolve(name, cache_dir)[1]


def device(
    server_url: str = typer.Option(..., "--server", help="Coordinator URL, e.g. https://127.0.0.1:8443."),
    ca: Optional[Path] = typer.Option(None, "--ca", help="CA certificate that signed the server's (https)."),
    data: Path = typer.Option(..., "--data", help="Folder of this device's .txt/.md/.jsonl files (never uploaded)."),
    home: Path = typer.Option(Path("~/.pocketfed"), "--home", help="Identity, installed release and egress ledger."),
    name: Optional[str] = typer.Option(None, help="Device name to register (default: a random device-xxxxxxxx, "
                                       "kept in --home)."),
    release_key: Optional[Path] = typer.Option(None, "--release-key", help="Trusted release public key (hex file); "
                                               "default: pinned on first contact."),
    threads: int = typer.Option(1, help="Torch threads for training (0 = torch's default)."),
    max_rounds: int = typer.Option(0, "--max-rounds", help="Stop after this many updates (0 = until training ends)."),
    patience: float = typer.Option(600.0, help="Give up after the server is unreachable this many seconds."),
    enroll_token: Optional[str] = typer.Option(None, "--enroll-token", envvar="POCKETFED_ENROLL_TOKEN",
                                               help="One-time token from `pocketfed enroll` (first registration only)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Train within this device profile's memory "
                                          "(watch, phone, car, or one from --profiles-file); default: no budget."),
    profiles_file: str = typer.Option("", "--profiles-file", help="YAML file of user-defined device profiles."),
    min_noise_multiplier: float = typer.Option(PrivacyFloors.min_noise_multiplier, "--min-noise-multiplier", help="Refuse a DP task whose noise "
                                               "multiplier z is below this (the default: one unsampled round costs epsilon ~10 at delta 1e-5)."),
    max_clip_norm: float = typer.Option(PrivacyFloors.max_clip_norm, "--max-clip-norm", help="Refuse a DP task whose clip norm is above this."),
    max_expected_devices: int = typer.Option(PrivacyFloors.max_expected_devices, "--max-expected-devices", help="Refuse a distributed-DP task "
                                             "whose expected cohort n is above this (the noise share is z C / sqrt(n))."),
    require_dp: bool = typer.Option(False, "--require-dp", help="Refuse tasks that claim no differential privacy."),
    on_device_model: bool = typer.Option(True, "--on-device-model/--no-on-device-model", help="After each installed "
                                         "release: train the personal adapter and build the int4 model in --home."),
) -> None:
    """Take part in federated rounds: check in, train on --data locally, upload the update."""
    from pocketfed.device.agent import run_device

    floors = PrivacyFloors(min_noise_multiplier, max_clip_norm, max_expected_devices, require_dp)

    last_wait: list[str] = [""]

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "unreachable":
            return
        if kind == "wait":  # each new reason once (a device polls every few seconds)
            if info.get("reason") == last_wait[0]:
                return
            last_wait[0] = str(info.get("reason"))
        console.print(f"{kind}: " + ", ".join(f"{k}={v}" for k, v in info.items()), highlight=False)

    sent = run_device(server_url, ca, data, home, name, release_key, threads, max_rounds, patience, on_event=on_event,
                      enrollment_token=enroll_token, profile=profile, profiles_file=profiles_file, floors=floors,
                      on_device_model=on_device_model)
    console.print(f"sent {sent} update{'s' * (sent != 1)}; the egress ledger is {home}/ledger.jsonl")


def status(
    server_url: str = typer.Option(..., "--server", help="Coordinator URL."),
    ca: Optional[Path] = typer.Option(None, "--ca", help="CA certificate (https)."),
    token_file: Path = typer.Option(Path("state/operator.token"), "--token-file",
                                    help="The operator token: <state>/operator.token of `pocketfed server --db <state>`."),
) -> None:
    """Rounds, devices and round aggregates of a running coordinator (needs its operator token)."""
    import os

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from pocketfed.device.http_client import DeviceClient, ServerRefused, Unreachable, connect
    from pocketfed.server import operator

    # POCKETFED_OPERATOR_TOKEN, when set, is the token itself (not a flag: a flag shows in `ps`)
    token = os.environ.get("POCKETFED_OPERATOR_TOKEN") or operator.read(token_file)
    try:
        s = DeviceClient(connect(server_url, ca), Ed25519PrivateKey.generate()).status(token)
    except Unreachable as e:
        raise UserError(f"cannot reach {server_url}: {e}") from None
    except ServerRefused as e:
        raise UserError(f"{server_url} refused the status request: {e.detail}") from None
    console.print(f"model {s.model}, {s.strategy}; version {s.version}; rounds {s.rounds_applied}/{s.rounds_planned}"
                  f"{' (finished)' if s.done else ''}; {s.devices} devices registered")
    if s.open_round:
        o = s.open_round
        console.print(f"open round {o.round_id} (training round {o.idx}): {o.assigned}/{o.target} assigned, "
                      f"{o.updates}/{o.goal} updates, quorum {o.quorum}, deadline in {o.deadline_in_s:.0f} s")
    table = Table(title="rounds")
    for col in ("id", "round", "status", "devices", "train loss", "update norm", "reason"):
        table.add_column(col)
    for r in s.rounds:
        loss, norm = r.metrics.get("train_loss"), r.metrics.get("update_norm")
        table.add_row(str(r.round_id), str(r.idx), r.status, str(r.devices), f"{loss:.3f}" if loss is not None else "-",
                      f"{norm:.4f}" if norm is not None else "-", r.reason)
    console.print(table)
    if s.evaluations:  # federated evaluation (deploy.eval_every): token-weighted totals over the sampled devices
        secure = " (secure sum)" if any(e["secure"] for e in s.evaluations) else ""
        evals = Table(title=f"federated evaluation{secure}")
        for col in ("version", "round", "status", "devices", "loss", "top-1", "top-3", "tokens"):
            evals.add_column(col)

        def fmt(e: dict, key: str, spec: str) -> str:
            return format(e[key], spec) if e.get(key) is not None else "-"  # None: open, or nothing reported

        for e in s.evaluations:
            evals.add_row(str(e["version"]), str(e["rounds_applied"]), e["status"], f"{e['devices']}/{e['sampled']}",
                          fmt(e, "loss", ".4f"), fmt(e, "top1", ".3f"), fmt(e, "top3", ".3f"), fmt(e, "tokens", ".0f"))
        console.print(evals)


def register(app: typer.Typer) -> None:
    app.command("certs")(certs)
    app.command("server")(server)
    app.command("enroll")(enroll)
    app.command("device")(device)
    app.command("status")(status)
