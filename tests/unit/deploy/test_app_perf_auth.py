"""The HTTP layer's request path: signed requests cost one trip to the thread pool, the signature
headers are documented without being FastAPI parameters, and the task's fixed fields are the config's."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from pocketfed.protocol import auth
from pocketfed.server.http import app as http_app
from tests.unit.deploy.http_fixtures import OK, app_for, device, make_coordinator, update

HEADERS = {"X-PF-Key", "X-PF-Timestamp", "X-PF-Nonce", "X-PF-Signature"}


@pytest.fixture
def app(tmp_path):
    return app_for(make_coordinator(tmp_path))


def test_signed_routes_document_the_signature_headers(app):
    paths = TestClient(app).get("/openapi.json").json()["paths"]
    signed = {"/v1/register", "/v1/checkin", "/v1/adapters/{sha256}", "/v1/rounds/{round_id}/upload",
              "/v1/rounds/{round_id}/commit", "/v1/rounds/{round_id}/secagg", "/v1/rounds/{round_id}/secagg/{kind}",
              "/v1/evaluations/{round_id}/report"}
    for path, ops in paths.items():
        for method, op in ops.items():
            params = {p["name"]: p for p in op.get("parameters", [])}
            if path in signed:
                assert HEADERS <= set(params), (method, path)
                assert all(params[h]["in"] == "header" and params[h]["required"] for h in HEADERS)
                # the path and query parameters are still there beside them
                assert {p for p in ("round_id", "sha256", "kind", "offset") if "{" + p + "}" in path} <= set(params)
            else:
                assert not HEADERS & set(params), (method, path)
    assert paths["/v1/rounds/{round_id}/upload"]["put"]["requestBody"]["content"]["application/octet-stream"]


def test_one_thread_pool_trip_per_signed_request(app, monkeypatch):
    a = device(app, "a")
    trips: list[str] = []
    real = http_app.run_in_threadpool

    async def counted(fn, *args):
        trips.append(getattr(fn, "__qualname__", repr(fn)))
        return await real(fn, *args)

    monkeypatch.setattr(http_app, "run_in_threadpool", counted)
    task = a.checkin(OK).task
    assert task is not None and len(trips) == 1
    data = update()
    a.upload(task.round_id, data, chunk_bytes=len(data))
    a.commit(task.round_id, data, num_tokens=10, metrics={})
    assert len(trips) == 4  # check-in, upload status (the resume point), one chunk, commit
    device(app, "b")  # register
    assert len(trips) == 5


def test_body_errors_come_before_the_nonce_check(app):
    """A request whose fields are invalid is refused (422) without spending its nonce; the same
    nonce on a valid request then counts, once. (The key is checked before the body is read: the
    Gate, `test_hardening.py`.)"""
    d = device(app, "a")
    bad = json.dumps({"eligibility": {**OK.model_dump(), "free_memory_mb": -1}}).encode()
    headers = {"content-type": "application/json", **auth.sign_headers(d.key, "POST", "/v1/checkin", bad, nonce="ab" * 16)}
    r = TestClient(app).post("/v1/checkin", content=bad, headers=headers)
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    good = json.dumps({"eligibility": OK.model_dump()}).encode()
    headers = {"content-type": "application/json", **auth.sign_headers(d.key, "POST", "/v1/checkin", good, nonce="ab" * 16)}
    assert TestClient(app).post("/v1/checkin", content=good, headers=headers).status_code == 200
    r = TestClient(app).post("/v1/checkin", content=good, headers=headers)
    assert r.status_code == 401 and r.json()["error"] == "replayed_request"


def test_task_fixed_fields_are_the_config(app):
    c = app.state.coordinator
    task = device(app, "a").checkin(OK).task
    assert task is not None and task.model == c.model_id
    assert (task.lora.rank, task.lora.alpha, list(task.lora.target_modules)) == (
        c.cfg.lora.rank, c.cfg.lora.alpha, list(c.cfg.lora.target_modules))
    assert task.data.seq_len == c.cfg.data.seq_len and task.codec == c.cfg.privacy.codec.value
    assert {t.name: list(t.shape) for t in task.adapter_schema} == {k: list(v.shape) for k, v in c.like.items()}
    assert task.max_upload_bytes == c.max_upload_bytes
