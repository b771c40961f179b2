"""User mistakes around the HTTP commands: one sentence, no traceback."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from pocketfed.errors import UserError
from pocketfed.server.http.certs import make_dev_certs, server_files
from pocketfed.device.http_client import connect


def test_bad_urls_and_missing_ca(tmp_path):
    with pytest.raises(UserError, match="must be a URL"):
        connect("ftp://example.org", None)
    with pytest.raises(UserError, match="--ca is needed"):
        connect("https://127.0.0.1:8443", None)
    with pytest.raises(UserError, match="does not exist"):
        connect("https://127.0.0.1:8443", tmp_path / "nope.pem")
    with pytest.raises(UserError, match="only on loopback"):
        connect("http://example.org:80", None)


def test_certs_and_tls_folder(tmp_path):
    with pytest.raises(UserError, match="lacks server.pem"):
        server_files(tmp_path)
    make_dev_certs(tmp_path / "c")
    assert all(p.is_file() for p in server_files(tmp_path / "c"))
    assert (tmp_path / "c" / "server.key").stat().st_mode & 0o077 == 0
    with pytest.raises(UserError, match="already holds"):
        make_dev_certs(tmp_path / "c")


def test_device_cli_unreachable_server_says_so(tmp_path):
    from pocketfed.cli import _register_extensions, app
    from pocketfed.device.agent import run_device

    make_dev_certs(tmp_path / "c")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("some text")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here
    with pytest.raises(UserError, match="cannot reach the server"):
        run_device(f"https://127.0.0.1:{port}", tmp_path / "c" / "ca.pem", tmp_path / "data", tmp_path / "home",
                   patience_s=0.5)
    _register_extensions()
    out = CliRunner().invoke(app, ["device", "--server", "https://127.0.0.1:1", "--ca", str(tmp_path / "missing.pem"),
                                   "--data", str(tmp_path / "data"), "--home", str(tmp_path / "home")])
    assert isinstance(out.exception, UserError) and "missing.pem" in str(out.exception)
