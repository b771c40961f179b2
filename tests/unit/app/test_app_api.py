"""The device app's JSON API and its guards (pocketfed.app.server), on a verified `tiny` device home."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pocketfed.app.server import CSP, LOCK_TEXT, create_app
from pocketfed.egress import LEDGER_FILE, REFUSAL
from tests.conftest import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from device_home import flip_weight_byte  # noqa: E402


@pytest.fixture
def client(device_home):
    return TestClient(create_app(device_home, threads=1, spin=False), base_url="http://127.0.0.1:8765")


def test_suggestions_are_distinct_words(client):
    body = client.get("/api/suggest", params={"text": "To be or not to "}).json()
    assert 1 <= len(body["words"]) <= 3
    assert all(w and " " not in w for w in body["words"])
    assert len({w.lower() for w in body["words"]}) == len(body["words"])
    assert body["lock_ok"] is True and body["ms"] > 0 and body["cpu_ms"] >= 0 and body["stale"] is False


def test_a_partial_word_is_completed_as_typed(client):
    words = client.get("/api/suggest", params={"text": "To be or not to b"}).json()["words"]
    assert words and all(w.lower().startswith("b") for w in words)


def test_lock_of_a_verified_home_carries_the_exact_hover_text(client):
    lock = client.get("/api/lock").json()
    assert lock["ok"] is True and lock["failing"] == []
    assert lock["hover"] == LOCK_TEXT
    assert [c["name"] for c in lock["checks"]] == ["signature", "weights", "ledger", "epsilon", "loaded"]
    assert lock["release"]["version"] == 2 and lock["release"]["epsilon"] == pytest.approx(3.1)
    assert len(lock["release"]["signed_by"]) == 16
    assert lock["personal"]["gain"] == pytest.approx(0.042) and lock["personal"]["date"] == "2026-11-28T10:00:00Z"
    assert "sent so far" in lock["line"]


def test_ledger_rows_are_the_ledger_file(client, device_home):
    lines = [json.loads(x) for x in (device_home / LEDGER_FILE).read_text().splitlines()]
    sent = [x for x in lines if x["kind"] != REFUSAL]
    body = client.get("/api/ledger").json()
    # make_device_home's ledger: 1 registration, 3 check-ins, 2 updates, 2 metrics, 1 refusal
    assert [m["kind"] for m in body["messages"]] == [x["kind"] for x in reversed(sent)]
    assert sorted(m["kind"] for m in body["messages"]) == sorted(["registration"] + ["checkin"] * 3
                                                                 + ["update"] * 2 + ["metrics"] * 2)
    assert body["total_bytes"] == sum(x["bytes"] for x in sent)
    assert [m["bytes"] for m in body["messages"]] == [x["bytes"] for x in reversed(sent)]
    assert all(m["destination"] == "https://coordinator.test:8443" for m in body["messages"])
    assert body["total_refusals"] == 1 and body["refusals"][0]["requested_kind"] == "personal_adapter"
    # the page's rows and the lock's counts read the same file: they agree
    lock = client.get("/api/lock").json()
    assert {k: v["count"] for k, v in lock["sent"].items() if v["count"]} == {
        "registration": 1, "checkin": 3, "update": 2, "metrics": 2}
    assert sum(v["bytes"] for v in lock["sent"].values()) == body["total_bytes"]


def test_every_response_carries_the_csp_and_assets_come_from_the_package(client):
    for path, media in [("/", "text/html"), ("/app.css", "text/css"), ("/app.js", "text/javascript"),
                        ("/favicon.svg", "image/svg+xml"), ("/api/lock", "application/json")]:
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(media), path
        assert r.headers["content-security-policy"] == CSP
    html = client.get("/").text
    # nothing from another origin: no absolute URL in the page or its script and style
    for text in (html, client.get("/app.js").text, client.get("/app.css").text):
        assert "http://" not in text and "https://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "<script>" not in html and "style=" not in html  # the CSP would block inline script and style


def test_attack_dns_rebinding_host_is_refused(device_home):
    api = create_app(device_home, threads=1, spin=False)
    assert TestClient(api, base_url="http://127.0.0.1:8765").get("/api/ledger").status_code == 200
    assert TestClient(api, base_url="http://localhost:8765").get("/api/ledger").status_code == 200
    # a web site re-pointing its own name at 127.0.0.1 sends its name as Host
    r = TestClient(api, base_url="http://attacker.example:8765").get("/api/ledger")
    assert r.status_code == 400 and "messages" not in r.text


def test_attack_flipped_weight_byte_fails_the_lock_at_start(device_home):
    flip_weight_byte(device_home)
    lock = TestClient(create_app(device_home, threads=1, spin=False), base_url="http://127.0.0.1").get("/api/lock").json()
    assert lock["ok"] is False and "weights" in lock["failing"]
    assert lock["hover"] != LOCK_TEXT and "model.onnx.data" in lock["hover"]
    assert "do not match" in lock["line"]


def test_attack_lock_reverified_on_demand(client, device_home):
    assert client.get("/api/lock").json()["ok"] is True
    flip_weight_byte(device_home)  # after start-up: the cached result still says ok...
    assert client.get("/api/lock").json()["ok"] is True
    lock = client.post("/api/lock").json()  # ...until the page asks again
    assert lock["ok"] is False and lock["failing"] == ["weights"]
    assert client.get("/api/suggest", params={"text": "To be "}).json()["lock_ok"] is False
    assert client.get("/api/lock").json()["verified_at"] == lock["verified_at"]


def test_attack_edited_epsilon_fails_the_lock(client, device_home):
    release = device_home / "releases" / "2" / "manifest.json"
    manifest = json.loads(release.read_text())
    manifest["epsilon"] = 0.5
    release.write_text(json.dumps(manifest, sort_keys=True))
    lock = client.post("/api/lock").json()
    assert lock["ok"] is False and "signature" in lock["failing"] and lock["hover"] != LOCK_TEXT


def test_app_imports_neither_torch_nor_server_nor_device_code():
    import subprocess

    code = ("import sys, pocketfed.app.server, pocketfed.app.cli; "
            "print([m for m in ('torch', 'pocketfed.server', 'pocketfed.device') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_attack_model_rebuilt_after_start_is_not_vouched_for(client, device_home):
    """The device rebuilt <home>/model (a new release) while the app runs the model it loaded at start:
    the files on disk verify, but they are not the weights making the suggestions."""
    record = device_home / "model" / "pocketfed.json"
    record.write_text(json.dumps(json.loads(record.read_text()), indent=1))  # same content, another build
    lock = client.post("/api/lock").json()
    assert lock["failing"] == ["loaded"] and lock["ok"] is False
    assert "restart `pocketfed app`" in lock["line"] and lock["hover"] != LOCK_TEXT


def test_a_request_overtaken_while_waiting_is_not_run(client):
    state = client.app.state.app_state
    results = {}
    with state.suggest_lock:  # a slow suggestion is running
        first = threading.Thread(target=lambda: results.setdefault(
            "first", client.get("/api/suggest", params={"text": "To be "}).json()))
        first.start()
        wait_for("the first request to queue", lambda: state.asked == 1, lambda: state.asked)
        second = threading.Thread(target=lambda: results.setdefault(
            "second", client.get("/api/suggest", params={"text": "To be or "}).json()))
        second.start()
        wait_for("the second request to queue", lambda: state.asked == 2, lambda: state.asked)
    first.join()
    second.join()
    assert results["first"]["stale"] is True and results["first"]["words"] == []
    assert results["second"]["stale"] is False and results["second"]["words"]
