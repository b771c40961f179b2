"""`pocketfed app`'s refusals: one sentence and exit code 2, never a traceback."""

from __future__ import annotations

import socket
import sys

import pytest

from tests.conftest import run_cli


def app(*args):
    return run_cli([sys.executable, "-m", "pocketfed", "app", *args])


def test_app_refuses_a_network_address_without_allow_remote(tmp_path):
    r = app("--home", str(tmp_path), "--host", "0.0.0.0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--allow-remote" in r.stderr and "127.0.0.1" in r.stderr


@pytest.mark.parametrize("args, says", [
    (["--home", "{tmp}/absent"], "does not exist"),
    (["--home", "{tmp}"], "has no on-device model yet"),
    (["--home", "{tmp}", "--host", "example.com"], "must be an IP address"),
    (["--home", "{tmp}", "--port", "70000"], "between 1 and 65535"),
])
def test_app_bad_input_is_one_sentence(tmp_path, args, says):
    r = app(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert says in " ".join(r.stderr.split())


def test_app_port_in_use_is_named(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = app("--home", str(tmp_path), "--port", str(port))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"127.0.0.1:{port}" in " ".join(r.stderr.split()) and "--port" in r.stderr


def test_the_app_socket_turns_nagle_off_for_every_connection():
    """asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; without it every keep-alive
    response's body waited for the client's delayed ACK (~40 ms a suggestion)."""
    import asyncio

    from pocketfed.app.cli import listen_socket

    async def accepted_nodelay() -> int:
        sock = listen_socket("127.0.0.1", 0)
        got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Record(asyncio.Protocol):
            def connection_made(self, transport):
                got.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Record, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        try:
            return await asyncio.wait_for(got, 30)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0
