"""`pocketfed app --home H --port 8765`: the device app, a page on this machine only.

`register(app)` adds the command to the main `pocketfed` typer app.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pocketfed.errors import UserError

KEEP_ALIVE_S = 330
HOME_HELP = "the device's home folder (the --home of `pocketfed device`)"
HOST_HELP = "address to listen on; only this machine (127.0.0.1) unless --allow-remote"
REMOTE_HELP = ("also serve another address: anyone who can reach it reads your suggestions, the model's "
               "provenance and the ledger of what left this device")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> list[str]:
    """The Host header names the server accepts; UserError for a non-loopback host without the flag."""
    if is_loopback(host):
        return ["127.0.0.1", "localhost", host]
    if not allow_remote:
        raise UserError(
            f"--host {host} would let other machines on the network use this app: read what you type, its "
            "suggestions and the ledger of what left this device; it serves 127.0.0.1 only. Open "
            "http://127.0.0.1:PORT on this machine, or add --allow-remote if you mean it"
        )
    # a wildcard address is reached under any of the machine's names
    return ["*"] if ipaddress.ip_address(host).is_unspecified else ["127.0.0.1", "localhost", host]


def app_cmd(
    home: Annotated[Path, typer.Option("--home", envvar="POCKETFED_HOME", help=HOME_HELP)],
    port: Annotated[int, typer.Option("--port", help="port to listen on")] = 8765,
    host: Annotated[str, typer.Option("--host", help=HOST_HELP)] = "127.0.0.1",
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help=REMOTE_HELP)] = False,
    model: Annotated[Path | None, typer.Option("--model", help="a runtime model folder (default: <home>/model)")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="ONNX Runtime threads (default: 2, or 1)")] = None,
    spin: Annotated[bool | None, typer.Option("--spin/--no-spin", help="spin idle worker threads (default: chosen at start-up)",
                                              show_default=False)] = None,
) -> None:
    """A local page: type with next-word suggestions made on this device, the privacy lock, and what left it."""
    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535, not {port}")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise UserError(f"--host must be an IP address such as 127.0.0.1, not {host!r}") from None
    allowed = check_host(host, allow_remote)
    sock = listen_socket("127.0.0.1" if host == "localhost" else host, port)  # before the slow load: fail fast
    import uvicorn  # noqa: PLC0415  (only when serving)

    from pocketfed.app.server import create_app  # noqa: PLC0415  (loads onnxruntime)

    console = Console()
    with console.status("loading the model and verifying the privacy lock"):
        api = create_app(home, model, threads=threads, spin=spin, allowed_hosts=allowed)
    lock = api.state.app_state.lock
    if lock["ok"]:
        console.print(f"privacy lock: {lock['line']}", highlight=False)
    else:
        console.print(f"[red]privacy lock failed:[/] {lock['line']}", highlight=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"
    console.print(f"device app on {url} (Ctrl-C stops it)", highlight=False)
    # access_log off: the typed text is in each suggestion request's URL, and a log would keep it.
    # keep-alive longer than a browser keeps an idle connection (Chromium: 300 s): with uvicorn's 5 s, a
    # page idle for a moment can send its next request on a connection the server is just closing,
    # and a browser does not retry a POST that fails so (the page retries once too)
    config = uvicorn.Config(api, log_level="warning", access_log=False, timeout_keep_alive=KEEP_ALIVE_S)
    uvicorn.Server(config).run(sockets=[sock])


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it), or UserError naming the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets whose
    # proto says TCP. With proto 0 the response's body, written after its headers, waited for the
    # client's delayed ACK: +44 ms on every keep-alive request (suggestion p95 72 ms instead of 28)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); is another app on it? "
                        "Give another --port") from None
    return sock


def register(app: typer.Typer) -> None:
    app.command("app")(app_cmd)
