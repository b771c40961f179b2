"""A hardened coordinator (issue 16, audit findings 2, 3, 4 and 6) and a device that survives a bad
round. Each `attack` test failed against the code before the fix (noted in its docstring)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sqlite3
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from pocketfed.device import agent, guard, ledger
from pocketfed.device import task as device_task
from pocketfed.device.http_client import DeviceClient
from pocketfed.privacy import pipeline
from pocketfed.protocol import auth, wire
from pocketfed.protocol.messages import TrainResult
from pocketfed import signing
from pocketfed.server import coordinator as co
from pocketfed.server.http.app import create_app
from pocketfed.server.http.limits import server_config
from tests.conftest import wait_for
from tests.unit.deploy.http_fixtures import OK, SHAPES, Clock, device, make_coordinator, refused, update

FAST = {"read_timeout_s": 0.5, "request_timeout_s": 2.0, "keep_alive_s": 0.5}


# ---- helpers -------------------------------------------------------------------------------------
def call_asgi(app, method: str, path_qs: str, headers: dict[str, str], pieces: list[bytes], on_read=None):
    """Call the app as uvicorn does, the body in `pieces` (more_body on all but the last).
    -> (status, response headers, JSON body, how many pieces the app read)."""
    path, _, qs = path_qs.partition("?")
    reads = 0

    async def receive():
        nonlocal reads
        if reads < len(pieces):
            if on_read is not None:
                on_read(reads)
            reads += 1
            return {"type": "http.request", "body": pieces[reads - 1], "more_body": reads < len(pieces)}
        await asyncio.sleep(3600)  # a client that sends nothing more

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": qs.encode(), "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body), reads


def upload_headers(key: Ed25519PrivateKey, round_id: int, body: bytes, length: int | None = None) -> dict[str, str]:
    path = f"/v1/rounds/{round_id}/upload?offset=0"
    return {"content-type": "application/octet-stream", "content-length": str(len(body) if length is None else length),
            **auth.sign_headers(key, "PUT", path, body)}


def nonce_rows(folder: Path) -> int:
    db = sqlite3.connect(folder / "state.sqlite")
    try:
        return db.execute("SELECT COUNT(*) FROM nonces").fetchone()[0]
    finally:
        db.close()


# ---- finding 2: nothing of a stranger's body is read; bodies stream to disk ------------------------
def test_attack_header_checks_come_before_any_body_read(tmp_path):
    """An upload with a key no device registered, a stale timestamp or malformed headers is refused
    from its headers alone, and its connection closed: the app never reads a byte of the 4 MiB it
    announces (old code: the body-limit middleware buffered the whole body first)."""
    c = make_coordinator(tmp_path, **FAST)
    app = create_app(c, clock=Clock())
    body = b"x" * 1024
    stranger = Ed25519PrivateKey.generate()
    for headers, code in [
        (upload_headers(stranger, 1, body, length=wire.CHUNK_MAX_BYTES), "unknown_device"),
        ({**upload_headers(stranger, 1, body), auth.TIMESTAMP: f"{time.time() - 3600:.3f}"}, "stale_timestamp"),
        ({**upload_headers(stranger, 1, body), auth.KEY: "zz"}, "bad_auth_headers"),
    ]:
        status, resp_headers, err, reads = call_asgi(app, "PUT", "/v1/rounds/1/upload?offset=0", headers, [body] * 4)
        assert (status, err["error"], reads) == (401, code, 0), (status, err, reads)
        assert resp_headers.get("connection") == "close"
    assert nonce_rows(tmp_path) == 0  # and no stranger's nonce was kept


def test_attack_upload_streams_to_disk_and_a_forged_chunk_is_removed(tmp_path):
    """A registered key's upload is hashed and written to a private file as it arrives (old code:
    held in memory whole before the signature check); a chunk whose signature does not verify
    leaves no file behind and nothing in the upload; a genuine one lands in the .part file."""
    c = make_coordinator(tmp_path, **FAST)
    app = create_app(c, clock=Clock())
    a, b = device(app, "a"), device(app, "b")
    task = a.checkin(OK).task
    b.checkin(OK)
    assert task is not None
    data = update()
    pieces = [data[: len(data) // 3], data[len(data) // 3 : 2 * len(data) // 3], data[2 * len(data) // 3 :]]
    incoming = tmp_path / "uploads" / "incoming"
    seen: list[bytes] = []

    def on_read(i: int) -> None:  # before piece i is handed over: piece i - 1 is on disk already
        if i == 2:
            (chunk,) = incoming.iterdir()
            seen.append(chunk.read_bytes())
            assert stat.S_IMODE(chunk.stat().st_mode) == 0o600

    forged = upload_headers(a.key, task.round_id, data[:-1] + b"!")  # signed over other bytes
    path = f"/v1/rounds/{task.round_id}/upload?offset=0"
    status, _, err, reads = call_asgi(app, "PUT", path, {**forged, "content-length": str(len(data))}, pieces, on_read)
    assert (status, err["error"], reads) == (401, "bad_signature", 3)
    assert seen == [pieces[0] + pieces[1]]
    assert list(incoming.iterdir()) == [] and not c.store.upload_path(task.round_id, "a").exists()
    status, _, out, _ = call_asgi(app, "PUT", path, upload_headers(a.key, task.round_id, data), pieces)
    assert (status, out) == (200, {"received": len(data)})
    assert c.store.upload_path(task.round_id, "a").read_bytes() == data and list(incoming.iterdir()) == []
    a.commit(task.round_id, data, 10, {})  # the streamed upload is a valid one


def _serve(app, cfg_deploy):
    from tests.integration.test_http_rounds import free_port

    port = free_port()
    server = __import__("uvicorn").Server(server_config(app, cfg_deploy, "127.0.0.1", port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for("the server to start", lambda: server.started, lambda: thread.is_alive(), stall_s=60)
    return server, thread, port


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (reading what it sent before, e.g. a 408)."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_attack_idle_slow_and_excess_connections_are_closed(tmp_path):
    """Against a real uvicorn under `server_config`: connections that send nothing, trickle their
    headers, or stop halfway through a registered key's 4 MiB body are all closed by the server
    within the timeouts, and the bodies' bytes do not stay in memory (old code: uvicorn never timed
    out a connection before its first answer, the middleware buffered each body: 40 such connections
    held +150 MB, never closed)."""
    c = make_coordinator(tmp_path, **FAST, max_connections=64)
    app = create_app(c, clock=Clock())
    a = device(app, "a")
    server, thread, port = _serve(app, c.cfg.deploy)
    try:
        socks: list[socket.socket] = []

        def connect() -> socket.socket:
            s = socket.create_connection(("127.0.0.1", port))
            socks.append(s)
            return s

        silent = [connect() for _ in range(4)]
        trickling = [connect() for _ in range(4)]
        half = b"x" * (wire.CHUNK_MAX_BYTES // 2)
        head = "".join(f"{k}: {v}\r\n" for k, v in upload_headers(a.key, 1, half, length=wire.CHUNK_MAX_BYTES).items())
        rss0 = _rss_mb()
        bodies = []
        for _ in range(10):
            s = connect()
            s.sendall(f"PUT /v1/rounds/1/upload?offset=0 HTTP/1.1\r\nhost: x\r\n{head}\r\n".encode() + half)
            bodies.append(s)
        for s in socks:
            s.setblocking(False)
        # each trickles a valid request head one byte per poll, never reaching its end
        heads = {id(s): iter(b"GET /v1/release/key HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 4000) for s in trickling}
        assert silent and trickling
        closed: set[int] = set()

        def progress() -> tuple[int, float]:
            for s in trickling:  # one byte at a time: never a whole request head
                if id(s) not in closed:
                    try:
                        s.send(bytes([next(heads[id(s)])]))
                    except OSError:
                        pass
            closed.update(id(s) for s in socks if id(s) not in closed and _closed(s))
            return len(closed), round(_rss_mb())

        wait_for("every idle, trickling and half-sent connection to be closed", lambda: len(closed) == len(socks),
                 progress, stall_s=20)
        grown = _rss_mb() - rss0
        assert grown < 0.5 * 10 * len(half) / 2**20, f"RSS grew {grown:.0f} MB for 10 half-sent 4 MiB bodies"
        assert list((tmp_path / "uploads" / "incoming").iterdir()) == []  # the unfinished bodies' files are gone
    finally:
        for s in socks:
            s.close()
        server.should_exit = True
        thread.join(timeout=30)


def test_connections_beyond_the_cap_are_closed_at_once(tmp_path):
    c = make_coordinator(tmp_path, read_timeout_s=30.0, request_timeout_s=60.0, max_connections=6)
    server, thread, port = _serve(create_app(c, clock=Clock()), c.cfg.deploy)
    try:
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(9)]
        for s in socks:
            s.setblocking(False)
        closed: set[int] = set()

        def progress() -> int:
            closed.update(i for i, s in enumerate(socks) if i not in closed and _closed(s))
            return len(closed)

        wait_for("the 3 connections past the cap to be closed", lambda: progress() >= 3, progress, stall_s=20)
        assert closed == {6, 7, 8}
        for s in socks[:6]:  # the others are served
            s.setblocking(True)
            s.sendall(b"GET /v1/release/key HTTP/1.1\r\nhost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for s in socks:
            s.close()
        server.should_exit = True
        thread.join(timeout=30)


# ---- finding 3: the ticker outlives a failing tick -------------------------------------------------
def test_attack_ticker_survives_a_failing_tick_and_deadlines_still_pass(tmp_path, monkeypatch, caplog):
    """Three ticks raise (as a database an operator's shell holds locked does); the round's deadline
    then passes with no request arriving, and the failure is logged with the round (old code: the
    background task died on the first exception, and the round stayed open until a device called)."""
    c = make_coordinator(tmp_path)
    clock = Clock()
    app = create_app(c, clock=clock, tick_every_s=0.02)
    a, b = device(app, "a"), device(app, "b")
    task = a.checkin(OK).task
    b.checkin(OK)
    assert task is not None
    a.upload(task.round_id, update(), 1 << 20)
    a.commit(task.round_id, update(), 10, {})  # 1 of the goal's 2: the round waits for its deadline
    real, calls = co.tick, []

    def flaky(c_, now):
        calls.append(now)
        if len(calls) <= 3:
            raise sqlite3.OperationalError("database is locked")
        return real(c_, now)

    monkeypatch.setattr(co, "tick", flaky)
    caplog.set_level(logging.ERROR, logger="pocketfed.server")
    with TestClient(app):  # runs the app's lifespan: the background ticker
        clock.offset = 120.0  # past the 60 s deadline; no device calls from here on
        wait_for("the round to close at its deadline", lambda: c.store.round(task.round_id).status != "open",
                 lambda: len(calls), stall_s=20)
    assert c.store.round(task.round_id).status == "committed"
    logged = [r.getMessage() for r in caplog.records if "background tick failed" in r.getMessage()]
    assert len(logged) == 3 and f"open round {task.round_id}" in logged[0] and "database is locked" in logged[0]


# ---- finding 4: one answer for every unenrolled caller, and no nonce rows --------------------------
def test_attack_unenrolled_callers_cannot_tell_which_names_exist(tmp_path):
    """Registering a taken name and a free one, without a token or with a made-up one, gets the very
    same answer, and adds no nonce row (old code: 409 name_taken for a taken name, 403 otherwise,
    and every attempt stored its nonce)."""
    c = make_coordinator(tmp_path)
    app = create_app(c, clock=Clock())
    device(app, "alice")
    rows = nonce_rows(tmp_path)
    for token in (None, "x" * 43):
        answers = set()
        for name in ("alice", "nobody"):
            e = refused(lambda: DeviceClient(TestClient(app), Ed25519PrivateKey.generate()).register(name, token),
                        403, co.NOT_ENROLLED if token is None else co.ENROLLMENT_REFUSED)
            answers.add((e.status, e.code, e.detail))
        assert len(answers) == 1, answers
    assert nonce_rows(tmp_path) == rows
    d = DeviceClient(TestClient(app), Ed25519PrivateKey.generate())
    assert d.register("bob", co.enroll(c.store)[0]) == "bob"
    assert nonce_rows(tmp_path) == rows + 1  # a registration that succeeds spends its nonce
    d.checkin(OK)
    assert nonce_rows(tmp_path) == rows + 2


# ---- finding 6: private state; leftovers cleaned at start -----------------------------------------
def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_attack_state_and_uploads_are_private(tmp_path):
    """The state folder and everything under it are the server's alone: folders 0700, the database
    with its -wal/-shm, blobs and partial uploads 0600 (old code: 0644 files in 0755 folders)."""
    folder = tmp_path / "state"
    c = make_coordinator(folder)
    app = create_app(c, clock=Clock())
    a, b = device(app, "a"), device(app, "b")
    task = a.checkin(OK).task
    b.checkin(OK)
    assert task is not None
    data = update()
    a.upload(task.round_id, data[:100], 1 << 20)  # half an upload: a .part file
    part = c.store.upload_path(task.round_id, "a")
    files = [folder / "state.sqlite", folder / "state.sqlite-wal", folder / "state.sqlite-shm", part,
             *[p for p in (folder / "blobs").rglob("*") if p.is_file()]]
    folders = [folder, folder / "blobs", folder / "uploads", part.parent,
               *[p for p in (folder / "blobs").rglob("*") if p.is_dir()]]
    assert {str(p): oct(_mode(p)) for p in files} == {str(p): "0o600" for p in files}
    assert {str(p): oct(_mode(p)) for p in folders} == {str(p): "0o700" for p in folders}


def test_an_older_state_folder_is_tightened_and_leftover_uploads_cleaned(tmp_path):
    folder = tmp_path / "state"
    c = make_coordinator(folder)
    app = create_app(c, clock=Clock())
    a, b = device(app, "a"), device(app, "b")
    task = a.checkin(OK).task
    b.checkin(OK)
    a.upload(task.round_id, update()[:100], 1 << 20)
    c.store.close()
    for p in (folder, folder / "uploads"):
        p.chmod(0o755)
    (folder / "state.sqlite").chmod(0o644)
    stale = folder / "uploads" / "999" / "x.part"  # a closed round's folder a crash left
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    body = folder / "uploads" / "incoming" / "f00d.chunk"  # a request body that was being received
    body.parent.mkdir(exist_ok=True)
    body.write_bytes(b"half")
    part = c.store.upload_path(task.round_id, "a")
    (part.parent / "junk.tmp").write_bytes(b"?")  # not an upload: nothing resumes from it
    c2 = make_coordinator(folder)
    assert _mode(folder) == 0o700 and _mode(folder / "uploads") == 0o700 and _mode(folder / "state.sqlite") == 0o600
    assert not stale.parent.exists() and not body.exists() and not (part.parent / "junk.tmp").exists()
    assert part.read_bytes() == update()[:100]  # the open round's upload resumes where it was
    assert c2.store.upload_path(task.round_id, "a") == part


# ---- the device side: a poisoned release or a NaN round does not end the device --------------------
def test_a_device_refuses_a_non_finite_release(tmp_path):
    """A release whose adapter holds Inf (what a poisoned round released before the server-side
    defenses) is refused with its reason and never installed."""
    def poisoned():
        return {k: torch.full(s, float("inf")) if "lora_B" in k else torch.zeros(s) for k, s in SHAPES.items()}

    c = co.open_coordinator(tmp_path / "state", make_coordinator(tmp_path / "other").cfg, "synthetic", poisoned)
    v = c.store.latest_version()
    manifest, signature = co.manifest_for(c, v, time.time())
    release = wire.SignedManifest(manifest=manifest, signature=signature)
    home = tmp_path / "home"
    with pytest.raises(signing.ReleaseRejected, match=r"holds NaN or Inf in 1 of its 2 tensors"):
        agent.accept_release(home, c.release_key.public_key(), release, lambda sha: c.store.get_blob(sha), time.time())
    assert not home.exists() or not [p for p in home.rglob("*") if p.is_file()]  # nothing installed
    assert guard.release_problem({k: torch.zeros(s) for k, s in SHAPES.items()}, 1) is None


def test_round_problem_names_what_is_not_finite():
    ok = {k: torch.full(s, 0.01) for k, s in SHAPES.items()}
    plan = pipeline.PrivacyPlan()

    def result(update_, loss):
        return TrainResult(0, "a", update_, 10, {"train_loss": loss}, pipeline.device_privatize(update_, plan))

    assert guard.round_problem(result(ok, 2.5)) is None
    assert "training loss is nan" in guard.round_problem(result(ok, float("nan")))
    bad = {**ok, "base_model.model.l0.lora_B.weight": torch.full(SHAPES["base_model.model.l0.lora_B.weight"], float("inf"))}
    assert "lora_B" in guard.round_problem(result(bad, 2.5))


def test_a_device_skips_a_round_it_cannot_train_and_takes_the_next(tmp_path, monkeypatch):
    """The device process (run_device, over real HTTP) trains a NaN in its first two rounds (the
    second time the privacy pipeline raises on it): it skips each with the reason in its ledger,
    sends nothing for them, and uploads in the third (old code: EgressRefused on the NaN loss, or
    the pipeline's ValueError, a traceback, the process gone)."""
    import uvicorn

    from tests.integration.test_http_rounds import free_port

    c = make_coordinator(tmp_path / "state", goal=1, quorum=1, overselect=1.0, deadline_s=2.0)
    token = co.enroll(c.store, 1)[0]
    trained: dict[str, torch.Tensor] = {}
    no_model = SimpleNamespace(backend=SimpleNamespace(value="none (training replaced)"), get_state=lambda: trained)
    monkeypatch.setattr(agent, "open_session", lambda task, data, device_id, profile: agent.Session(
        no_model, None, None, agent.session_key(task)))  # type: ignore[arg-type]
    rounds: list[int] = []

    def fake_run_task(model, train, task):
        """Round 1: a NaN loss and update. Round 2: training goes NaN and the privacy pipeline raises
        (as distributed DP's rounding does: "x must be finite"). Round 3: a fine update."""
        rounds.append(task.round)
        value = 0.01 if len(rounds) == 3 else float("nan")
        update_ = {k: torch.full(s, value) for k, s in SHAPES.items()}
        trained.update(update_)
        if len(rounds) == 2:
            raise ValueError("x must be finite")
        return TrainResult(task.round, task.device_id, update_, 123, {"train_loss": value * 100},
                           pipeline.device_privatize(update_, task.privacy))

    monkeypatch.setattr(device_task, "run_task", fake_run_task)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(c, clock=Clock(), tick_every_s=0.05), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    wait_for("the server to start", lambda: server.started, lambda: None, stall_s=60)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("words\n")
    events: list[tuple[str, dict]] = []
    try:
        sent = agent.run_device(f"http://127.0.0.1:{port}", None, tmp_path / "data", tmp_path / "home", name="d",
                                threads=0, max_rounds=1, patience_s=30, max_wait_s=0.2, enrollment_token=token,
                                on_event=lambda kind, info: events.append((kind, info)))
    finally:
        server.should_exit = True
    kinds = [k for k, _ in events]
    assert sent == 1 and kinds.count("round_skipped") == 2 and kinds.index("uploaded") > max(
        i for i, k in enumerate(kinds) if k == "round_skipped")
    skipped = [info for k, info in events if k == "round_skipped"]
    assert "not finite" in skipped[0]["reason"] and "privacy pipeline refused it" in skipped[1]["reason"]
    lines = (tmp_path / "home" / ledger.LEDGER_FILE).read_text().splitlines()
    refusals = [e["reason"] for e in map(json.loads, lines) if e["kind"] == ledger.REFUSAL]
    assert all(any(f"round {s['round_id']}:" in r for r in refusals) for s in skipped)
    statuses = [r.status for r in c.store.rounds()]
    assert statuses[:2] == ["aborted", "aborted"] and "committed" in statuses  # the skipped rounds sent nothing


# ---- the serving settings --------------------------------------------------------------------------
def test_serving_settings_are_validated_and_not_part_of_the_run(tmp_path):
    from pocketfed.config import load_config
    from pocketfed.errors import UserError

    with pytest.raises(UserError, match=r"deploy.read_timeout_s must be positive and at most deploy.request_timeout_s \(10\), got 20"):
        load_config(None, {"deploy": {"read_timeout_s": 20.0, "request_timeout_s": 10.0}})
    with pytest.raises(UserError, match="deploy.max_connections must be at least 1, got 0"):
        load_config(None, {"deploy": {"max_connections": 0}})
    make_coordinator(tmp_path)
    c = make_coordinator(tmp_path, read_timeout_s=3.0, max_connections=10)  # a restart may change them
    assert (c.cfg.deploy.read_timeout_s, c.cfg.deploy.max_connections) == (3.0, 10)


def test_the_open_files_limit_is_raised_to_fit_the_connections(monkeypatch, caplog):
    from pocketfed.server.http import limits

    calls: list[tuple[int, int]] = []
    for hard, expected in ((4096, 1024 + 256), (1100, 1100)):
        monkeypatch.setattr(limits.resource, "getrlimit", lambda _, hard=hard: (1024, hard))
        monkeypatch.setattr(limits.resource, "setrlimit", lambda _, pair: calls.append(pair))
        assert limits.raise_open_files_limit(1024) == expected
    assert calls == [(1280, 4096), (1100, 1100)]
    assert "open files are limited to 1100" in caplog.text  # the second could not fit: said so


def test_a_408_is_retried_as_a_slow_link_not_a_refusal():
    import httpx

    from pocketfed.device.http_client import Unreachable

    answers = iter([httpx.Response(408, json={"error": "request_timeout", "detail": "late"}),
                    httpx.Response(200, json={"public_key": "ab" * 32})])
    client = DeviceClient(httpx.Client(base_url="http://127.0.0.1:1", transport=httpx.MockTransport(lambda r: next(answers))),
                          Ed25519PrivateKey.generate())
    with pytest.raises(Unreachable, match="timed out the request"):  # `run_device`'s `call` retries these
        client.release_key()
    assert client.release_key() == "ab" * 32
