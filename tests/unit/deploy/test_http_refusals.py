"""Every refusal of the coordinator's HTTP API: a 4xx, a JSON error naming it, state unchanged."""

from __future__ import annotations

import json
import time

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from pocketfed.config import Codec
from pocketfed.protocol import auth
from pocketfed.device.http_client import DeviceClient
from pocketfed.protocol.wire import CHUNK_MAX_BYTES
from pocketfed.server import coordinator as co
from tests.unit.deploy.http_fixtures import (OK, SHAPES, app_for, device, make_coordinator, operator_token, refused,
                                             snapshot, update)


@pytest.fixture
def server(tmp_path):
    c = make_coordinator(tmp_path)
    return c, app_for(c), tmp_path


def test_happy_path_round_commits(server):
    c, app, folder = server
    a, b = device(app, "a"), device(app, "b")
    for d in (a, b):
        task = d.checkin(OK).task
        assert task is not None and task.round_index == 0 and sorted(t.name for t in task.adapter_schema) == sorted(SHAPES)
        data = update()
        d.upload(task.round_id, data, chunk_bytes=100)  # several chunks
        out = d.commit(task.round_id, data, num_tokens=10, metrics={"train_loss": 1.0})
    assert out.round_closed
    status = a.status(operator_token(folder))
    assert status.version == 1 and status.rounds_applied == 1 and status.rounds[0].status == "committed"
    assert status.open_round is not None and status.open_round.idx == 1


def test_unknown_device(server):
    _, app, folder = server
    stranger = DeviceClient(TestClient(app), Ed25519PrivateKey.generate())
    before = snapshot(folder)
    refused(lambda: stranger.checkin(OK), 401, "unknown_device")
    assert snapshot(folder) == before


def _raw(app, key, method, path, body: bytes, **sign):
    headers = {"content-type": "application/json", **auth.sign_headers(key, method, path, body, **sign)}
    return TestClient(app).request(method, path, content=body, headers=headers)


def test_bad_signature_stale_timestamp_replay(server):
    _, app, folder = server
    d = device(app, "a")
    body = json.dumps({"eligibility": OK.model_dump()}).encode()
    before = snapshot(folder)
    headers = {"content-type": "application/json", **auth.sign_headers(d.key, "POST", "/v1/checkin", body)}
    tampered = body.replace(b"4096", b"4097")
    r = TestClient(app).post("/v1/checkin", content=tampered, headers=headers)
    assert r.status_code == 401 and r.json()["error"] == "bad_signature"
    other = Ed25519PrivateKey.generate()
    forged = {**headers, **{auth.SIGNATURE: auth.sign_headers(other, "POST", "/v1/checkin", body)[auth.SIGNATURE]}}
    r = TestClient(app).post("/v1/checkin", content=body, headers=forged)
    assert r.status_code == 401 and r.json()["error"] == "bad_signature"
    r = _raw(app, d.key, "POST", "/v1/checkin", body, now=time.time() - 3600)
    assert r.status_code == 401 and r.json()["error"] == "stale_timestamp"
    assert snapshot(folder) == before
    r = TestClient(app).post("/v1/checkin", content=body, headers=headers)
    assert r.status_code == 200
    after_first = snapshot(folder)
    r = TestClient(app).post("/v1/checkin", content=body, headers=headers)  # the same request again
    assert r.status_code == 401 and r.json()["error"] == "replayed_request"
    assert snapshot(folder) == after_first
    r = TestClient(app).post("/v1/checkin", content=body, headers={k: v for k, v in headers.items() if k != auth.NONCE})
    assert r.status_code == 401 and r.json()["error"] == "bad_auth_headers"


def test_register_needs_the_key_and_a_free_name(server):
    _, app, folder = server
    device(app, "a")
    before = snapshot(folder)
    intruder = DeviceClient(TestClient(app), Ed25519PrivateKey.generate())
    # without a token the answer is the one for a free name (no oracle for which names exist)
    refused(lambda: intruder.register("a"), 403, "enrollment_required")
    token = co.enroll(app.state.coordinator.store)[0]
    refused(lambda: intruder.register("a", token), 409, "name_taken")  # an enrolled caller is told
    assert intruder.register("a2", token) == "a2"  # and its token was not spent on the refusal
    before = snapshot(folder)
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    body = json.dumps({"name": "b", "public_key": auth.public_hex(key)}).encode()
    r = _raw(app, other, "POST", "/v1/register", body)
    assert r.status_code == 401 and r.json()["error"] == "bad_signature"
    assert snapshot(folder) == before


def test_upload_after_the_round_closed_and_twice(server):
    c, app, folder = server
    a, b, late = device(app, "a"), device(app, "b"), device(app, "late")
    tasks = [d.checkin(OK).task for d in (a, b, late)]
    assert all(t is not None for t in tasks)  # target = ceil(2 * 1.5) = 3
    for d, t in zip((a, b), tasks):
        d.upload(t.round_id, update(), 1 << 20)
        d.commit(t.round_id, update(), 10, {})
    before = snapshot(folder)
    refused(lambda: late.upload(tasks[2].round_id, update(), 1 << 20), 409, "round_closed")
    refused(lambda: late.commit(tasks[2].round_id, update(), 10, {}), 409, "round_closed")
    refused(lambda: a.commit(tasks[0].round_id, update(), 10, {}), 409, "round_closed")
    assert snapshot(folder) == before
    # In the next round a device may upload once.
    t = a.checkin(OK).task
    a.upload(t.round_id, update(), 1 << 20)
    a.commit(t.round_id, update(), 10, {})
    before = snapshot(folder)
    refused(lambda: a.upload(t.round_id, update(), 1 << 20), 409, "duplicate_upload")
    refused(lambda: a.commit(t.round_id, update(), 10, {}), 409, "duplicate_upload")
    assert a.checkin(OK).task is None
    assert snapshot(folder) == before


def test_unassigned_and_unknown_round(server):
    c, app, folder = server
    a, b = device(app, "a"), device(app, "b")
    t = a.checkin(OK).task
    before = snapshot(folder)
    refused(lambda: b.upload(t.round_id, update(), 1 << 20), 403, "not_assigned")
    refused(lambda: a.upload(999, update(), 1 << 20), 404, "unknown_round")
    assert snapshot(folder) == before


def test_ineligible_device_gets_no_task(server):
    _, app, folder = server
    a = device(app, "a")
    out = a.checkin(OK.model_copy(update={"charging": False}))
    assert out.task is None and "charging" in out.reason and out.retry_at > time.time()


def test_oversized_and_truncated_uploads(server):
    c, app, folder = server
    a = device(app, "a")
    t = a.checkin(OK).task
    before = snapshot(folder)
    big = update() + b"\0" * c.max_upload_bytes
    refused(lambda: a.upload(t.round_id, big, 1 << 20), 413, "upload_too_large")
    r = _raw(app, a.key, "PUT", f"/v1/rounds/{t.round_id}/upload?offset=0", b"\0" * (CHUNK_MAX_BYTES + 1))
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    data = update()
    a.upload(t.round_id, data[:50], 1 << 20)
    e = refused(lambda: a.commit(t.round_id, data, 10, {}), 400, "truncated_upload")
    assert e.received == 50
    refused(lambda: a.commit(t.round_id, data[:50], 10, {}), 422, "invalid_update")  # truncated safetensors
    assert snapshot(folder) == before
    # Resuming completes it.
    a.upload(t.round_id, data, 16)
    assert a.commit(t.round_id, data, 10, {}).accepted


def _bad_update_refused(server, payload: bytes, words: str):
    c, app, folder = server
    a = device(app, "a")
    t = a.checkin(OK).task
    before = snapshot(folder)
    a.upload(t.round_id, payload, 1 << 20)
    e = refused(lambda: a.commit(t.round_id, payload, 10, {}), 422, "invalid_update")
    assert words in e.detail, e.detail
    assert snapshot(folder) == before


def test_wrong_tensor_names(server):
    from safetensors.torch import save

    payload = save({"base_model.model.l0.lora_A.weight": torch.zeros(2, 8), "evil": torch.zeros(8, 2)})
    _bad_update_refused(server, payload, "schema")


def test_wrong_shape(server):
    _bad_update_refused(server, update(**{"base_model.model.l0.lora_B.weight": torch.zeros(8, 3)}), "shape")


def test_wrong_dtype(server):
    from safetensors.torch import save

    payload = save({k: torch.zeros(s, dtype=torch.float64) for k, s in SHAPES.items()})
    _bad_update_refused(server, payload, "dtype")
    # float16 is a valid codec, but not the one this run uses (float32)


def test_other_codec_dtype(tmp_path):
    c = make_coordinator(tmp_path)
    _bad_update_refused((c, app_for(c), tmp_path), update(codec_=Codec.float16), "codec")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf(server, value):
    bad = torch.zeros(2, 8)
    bad[1, 3] = value
    _bad_update_refused(server, update(**{"base_model.model.l0.lora_A.weight": bad}), "NaN or Inf")


def test_invalid_json_fields(server):
    _, app, folder = server
    a = device(app, "a")
    body = json.dumps({"eligibility": {**OK.model_dump(), "free_memory_mb": -1}}).encode()
    r = _raw(app, a.key, "POST", "/v1/checkin", body)
    assert r.status_code == 422 and r.json()["error"] == "invalid_request" and "free_memory_mb" in r.json()["detail"]
    body = json.dumps({"size": 10, "sha256": "0" * 64, "num_tokens": 5, "metrics": {"loss": float("nan")}}).encode()
    r = _raw(app, a.key, "POST", "/v1/rounds/1/commit", body)
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
