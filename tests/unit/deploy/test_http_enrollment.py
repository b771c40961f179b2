"""Registration spends a one-time enrollment token (unless deploy.open_registration)."""

import sqlite3
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from pocketfed.errors import UserError
from pocketfed.server import coordinator as co
from pocketfed.server.store import sha256_hex
from pocketfed.protocol import auth
from pocketfed.device.http_client import DeviceClient, ServerRefused
from tests.unit.deploy.http_fixtures import OK, app_for, make_coordinator, refused, snapshot


def _client(app) -> DeviceClient:
    return DeviceClient(TestClient(app), Ed25519PrivateKey.generate())


def test_a_new_device_needs_a_valid_unused_token(tmp_path):
    c = make_coordinator(tmp_path)
    app = app_for(c)
    token, other = co.enroll(c.store, 2)
    before = snapshot(tmp_path)
    refused(lambda: _client(app).register("a"), 403, co.NOT_ENROLLED)
    refused(lambda: _client(app).register("a", "x" * 43), 403, co.ENROLLMENT_REFUSED)  # made up
    assert snapshot(tmp_path) == before  # refusals register nothing

    a = _client(app)
    assert a.register("a", token) == "a"
    assert a.register("a") == "a"  # the same device again: already registered, no token needed
    assert a.checkin(OK).task is not None
    refused(lambda: _client(app).register("b", token), 403, co.ENROLLMENT_REFUSED)  # spent
    assert _client(app).register("b", other) == "b"


def test_expired_tokens_are_refused_and_only_hashes_are_stored(tmp_path):
    c = make_coordinator(tmp_path)
    app = app_for(c)
    (expired,) = co.enroll(c.store, 1, ttl_s=60, now=time.time() - 120)
    refused(lambda: _client(app).register("a", expired), 403, co.ENROLLMENT_REFUSED)
    (fresh,) = co.enroll(c.store, 1)
    db = sqlite3.connect(tmp_path / "state.sqlite")
    try:
        dump = "\n".join(db.iterdump())
    finally:
        db.close()
    assert expired not in dump and fresh not in dump  # a copied state folder holds no usable token
    assert sha256_hex(fresh.encode()) in dump


def test_malformed_tokens_and_bad_counts(tmp_path):
    c = make_coordinator(tmp_path)
    d = _client(app_for(c))
    body = {"name": "a", "public_key": auth.public_hex(d.key), "enrollment_token": "short!"}
    with pytest.raises(ServerRefused) as e:
        d._json("POST", "/v1/register", body)  # past the client's own check, to the server's
    assert e.value.status == 422  # the wire schema: 16-64 of [A-Za-z0-9_-]
    with pytest.raises(UserError, match="--count must be between 1 and 10000"):
        co.enroll(c.store, 0)
    with pytest.raises(UserError, match="--ttl-hours must be positive"):
        co.enroll(c.store, 1, ttl_s=0)


def test_open_registration_needs_no_token(tmp_path):
    app = app_for(make_coordinator(tmp_path, open_registration=True))
    assert _client(app).register("a") == "a"


def test_enroll_cli(tmp_path):
    from pocketfed.cli import _register_extensions, app

    _register_extensions()
    make_coordinator(tmp_path / "state")
    out = CliRunner().invoke(app, ["enroll", "--db", str(tmp_path / "state"), "-n", "3"])
    assert out.exit_code == 0, out.output
    tokens = out.output.split()
    assert len(tokens) == 3 and len(set(tokens)) == 3 and all(len(t) == 43 for t in tokens)
    out = CliRunner().invoke(app, ["enroll", "--db", str(tmp_path / "nothing")])
    assert isinstance(out.exception, UserError) and "holds no coordinator state" in str(out.exception)


def test_device_runtime_says_why_it_was_not_registered(tmp_path, monkeypatch):
    from pocketfed.device import agent as runtime
    from pocketfed.device import http_client as client

    def refuse(self, name, token=None):
        raise ServerRefused(403, co.NOT_ENROLLED, "this coordinator registers enrolled devices only")

    monkeypatch.setattr(client.DeviceClient, "register", refuse)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("some text")
    # the default name is the home's random one, never the data folder's ("data")
    with pytest.raises(UserError, match=r"refused to register 'device-[0-9a-f]{8}': this coordinator registers enrolled"):
        runtime.run_device("http://127.0.0.1:1", None, tmp_path / "data", tmp_path / "home")
    with pytest.raises(UserError, match="--enroll-token is not a token"):
        runtime.run_device("http://127.0.0.1:1", None, tmp_path / "data", tmp_path / "home", enrollment_token="a b")
