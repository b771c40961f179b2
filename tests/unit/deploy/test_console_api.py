"""The console's JSON API and the operator's actions (`pocketfed.server.operations`), on the
synthetic coordinator: each action is recorded with its time and the credential's fingerprint,
and does what it says (pause: no new round; cohort size: the next rounds' goal; freeze: nothing
newer signed or served; revoke: the device's requests refused)."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient

from pocketfed.server import operations
from pocketfed.server.http.traffic import CountTraffic
from tests.unit.deploy.http_fixtures import OK, Clock, app_for, device, make_coordinator, operator_token, refused, update


@pytest.fixture
def server(tmp_path):
    c = make_coordinator(tmp_path)
    clock = Clock()
    app = app_for(c, clock)
    return c, app, TestClient(app), operator_token(tmp_path), clock


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def overview(http: TestClient, token: str) -> dict:
    r = http.get("/console/api/overview", headers=bearer(token))
    assert r.status_code == 200, r.text
    return r.json()


def play_round(c, devices, num_tokens: int = 10) -> list[bytes]:
    """Every device takes the open round's task and uploads; returns what each uploaded."""
    sent = []
    for d in devices:
        task = d.checkin(OK).task
        assert task is not None
        data = update()
        d.upload(task.round_id, data, chunk_bytes=100)
        d.commit(task.round_id, data, num_tokens=num_tokens, metrics={"train_loss": 2.0})
        sent.append(data)
    return sent


def test_console_needs_the_operator_token_attack(server):
    c, app, http, token, _ = server
    page = http.get("/console")  # the page is a shell: no data in it, so no credential needed
    assert page.status_code == 200 and "operator token" in page.text
    assert "script-src" not in page.headers["content-security-policy"] and "'self'" in page.headers["content-security-policy"]
    for method, path in (("GET", "/console/api/overview"), ("POST", "/console/api/pause"), ("POST", "/console/api/freeze"),
                         ("POST", "/console/api/devices/a/revoke")):
        for headers in ({}, bearer("x" * 43), {"Authorization": token}, bearer(token[:-1] + ("A" if token[-1] != "A" else "B"))):
            r = http.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"] in ("operator_auth_required", "operator_auth_refused") and r.json()["detail"]
    assert c.store.actions() == [] and c.controls == operations.Controls()  # nothing acted on
    assert overview(http, token)["version"] == 0


def test_overview_counts_a_committed_round_and_its_bytes(server):
    c, app, http, token, _ = server
    a, b = device(app, "a"), device(app, "b")
    sent = play_round(c, [a, b])
    a.checkin(OK.model_copy(update={"profile": "watch"}))  # the profile of its last check-in
    d = overview(http, token)
    r = d["rounds"][0]
    assert (r["status"], r["sampled"], r["assigned"], r["accepted"], r["dropped"], r["refused"]) == ("committed", 2, 2, 2, 0, 0)
    assert r["update_bytes"] == sum(map(len, sent))
    # every upload byte is counted for the round (its path names it), plus the small JSON bodies
    # of its check-ins and commits (a few hundred bytes each), never more
    assert r["update_bytes"] <= r["bytes_up"] <= r["update_bytes"] + 4 * 1024
    assert r["bytes_down"] > 0
    assert [s[0] for s in r["stages"]][:2] == ["draw to first task", "training and uploads"]
    assert r["metrics"]["train_loss"] == pytest.approx(2.0)
    assert d["rounds"][1]["status"] == "open" and d["version"] == 1
    devices = {x["device_id"]: x for x in d["devices"]["rows"]}
    assert devices["a"]["profile"] == "watch" and devices["a"]["eligible"] is True
    assert d["devices"]["registered"] == 2 and d["devices"]["eligible_now"] == 2
    assert [v["version"] for v in d["releases"]["versions"]] == [1, 0] and all(v["served"] for v in d["releases"]["versions"])


def test_traffic_counts_bodies_by_round():
    """1,234 bytes up and 567 down under /v1/rounds/7/, 10 up elsewhere; the status route is not counted."""
    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 567})

    counter = operations.Traffic()
    http = TestClient(CountTraffic(app, counter))
    http.put("/v1/rounds/7/upload?offset=0", content=b"u" * 1234)
    http.post("/v1/checkin", content=b"c" * 10)
    http.get("/v1/status")
    assert counter.take() == {7: [1234, 567], None: [10, 567]}
    assert counter.take() == {}


def test_pause_stops_new_rounds_and_is_recorded(server):
    c, app, http, token, clock = server
    a, b = device(app, "a"), device(app, "b")
    a.checkin(OK)
    assert c.store.open_round() is not None
    r = http.post("/console/api/pause", headers=bearer(token))
    assert r.status_code == 200 and r.json()["controls"]["paused"] is True
    [row] = c.store.actions()
    assert (row["action"], row["value"]) == ("pause", "paused")
    assert row["credential"] == hashlib.sha256(token.encode()).hexdigest()[:16] and token not in str(row)
    assert abs(row["at"] - clock()) < 60
    play_round(c, [a, b])  # the open round runs to its end...
    assert c.store.rounds()[-1].status == "committed" and c.store.open_round() is None  # ...and no new one opens
    wait = a.checkin(OK)
    assert wait.task is None and "paused" in wait.reason
    assert overview(http, token)["controls"]["paused"] is True
    http.post("/console/api/resume", headers=bearer(token))
    assert a.checkin(OK).task is not None  # the next round opened
    assert [x["action"] for x in c.store.actions()] == ["resume", "pause"]


def test_cohort_size_applies_to_the_next_rounds(server):
    c, app, http, token, _ = server
    a, b, d3 = device(app, "a"), device(app, "b"), device(app, "c")
    a.checkin(OK)
    first = c.store.open_round()
    for bad in (0, -1, 10_001, "3", 2.5, True, None):
        r = http.post("/console/api/cohort", headers=bearer(token), json={"goal": bad})
        assert r.status_code == 422 and r.json()["detail"], bad
    for body in (b"", b"[3]", b"{", b'{"size": 3}'):
        r = http.post("/console/api/cohort", headers=bearer(token), content=body)
        assert r.status_code == 422 and "goal" in r.json()["detail"], body
    assert http.post("/console/api/cohort", content=b"{").status_code == 401  # the credential comes first
    assert "deploy.quorum (1)" in http.post("/console/api/cohort", headers=bearer(token), json={"goal": 0}).json()["detail"]
    assert c.store.actions() == []  # refused actions are not recorded
    assert http.post("/console/api/cohort", headers=bearer(token), json={"goal": 3}).json()["controls"]["goal"] == 3
    assert c.store.open_round().goal == first.goal == 2  # the open round keeps the goal it opened with
    assert c.plan.expected_devices == 2
    play_round(c, [x for n, x in {"a": a, "b": b, "c": d3}.items() if c.store.in_cohort(first.round_id, n)][:2])
    second = c.store.open_round()
    assert second.round_id != first.round_id and second.goal == 3 and c.plan.expected_devices == 3
    assert c.store.actions()[0]["value"] == "3"
    # a restart keeps the operator's goal; one with another deploy.goal in its config drops it
    assert operations.next_goal(make_coordinator(c.store.folder)) == 3
    assert operations.next_goal(make_coordinator(c.store.folder, goal=4)) == 4


def test_revoked_device_is_refused_attack(server):
    c, app, http, token, _ = server
    a, b, d3 = device(app, "a"), device(app, "b"), device(app, "c")
    assert a.checkin(OK) is not None
    r = http.post("/console/api/devices/a/revoke", headers=bearer(token))
    assert r.status_code == 200 and r.json()["controls"]["revoked"] == ["a"]
    refused(lambda: a.checkin(OK), 403, "device_revoked")
    refused(lambda: a.latest_release() and a.adapter(c.store.latest_version().adapter_sha), 403, "device_revoked")
    assert http.post("/console/api/devices/nobody/revoke", headers=bearer(token)).status_code == 422
    assert b.checkin(OK) is not None  # the others go on
    c2 = make_coordinator(c.store.folder)  # a restart keeps the revocation
    assert operations.is_revoked(c2, "a") and not operations.is_revoked(c2, "b")
    rows = {x["device_id"]: x for x in overview(http, token)["devices"]["rows"]}
    assert rows["a"]["revoked_at"] is not None and rows["b"]["revoked_at"] is None
    [row] = c.store.actions()
    assert (row["action"], row["value"]) == ("revoke_device", "a")
    # the round drawn before the revocation commits without it; the next rounds never draw it
    play_round(c, [b, d3])
    seen = 0
    while (r := c.store.open_round()) is not None:
        assert "a" not in c.store.cohort(r.round_id) and set(c.store.cohort(r.round_id)) == {"b", "c"}
        play_round(c, [b, d3])
        seen += 1
    assert seen == 2  # sim.rounds = 3


def test_frozen_releases_are_neither_signed_nor_served(tmp_path):
    # with federated evaluation after every round: the evaluation of an unreleased version hands out nothing
    c = make_coordinator(tmp_path, eval_every=1, eval_devices=2)
    app = app_for(c)
    http, token = TestClient(app), operator_token(tmp_path)
    a, b = device(app, "a"), device(app, "b")
    a.checkin(OK)
    assert http.post("/console/api/freeze", headers=bearer(token)).json()["controls"]["frozen_at"] == 0
    play_round(c, [a, b])  # the round in flight (on version 0) commits version 1...
    v1 = c.store.latest_version()
    assert v1.version == 1
    assert a.latest_release().manifest["version"] == 0  # ...which is not released
    refused(lambda: a.adapter(v1.adapter_sha), 404, "unknown_adapter")
    assert c.store.open_round() is None and "frozen at version 0" in a.checkin(OK).reason  # no round on v1
    assert c.store.open_evaluation() is not None and c.store.open_evaluation().version == 1  # nor its evaluation
    assert b.checkin(OK).task is None
    d = overview(http, token)
    assert d["releases"]["served"] == 0 and [v["served"] for v in d["releases"]["versions"]] == [False, True]
    http.post("/console/api/unfreeze", headers=bearer(token))
    assert a.latest_release().manifest["version"] == 1 and a.adapter(v1.adapter_sha)
    assert a.checkin(OK).task is not None  # unfrozen: v1 goes out (its evaluation first, then its round)
    assert [(x["action"], x["value"]) for x in c.store.actions()] == [("unfreeze_releases", "unfrozen"),
                                                                     ("freeze_releases", "at version 0")]


def test_admin_token_prints_and_creates_the_credential(tmp_path, capsys):
    from pocketfed.console.cli import admin_token
    from pocketfed.errors import UserError

    with pytest.raises(UserError, match="is not a folder"):
        admin_token(db=tmp_path / "missing")
    admin_token(db=tmp_path)  # created on first use, 0600, printed alone on stdout
    token = capsys.readouterr().out.strip()
    assert token == (tmp_path / "operator.token").read_text().strip() and len(token) == 43
    assert (tmp_path / "operator.token").stat().st_mode & 0o777 == 0o600
    admin_token(db=tmp_path)
    assert capsys.readouterr().out.strip() == token  # the same one after


def test_overview_times_each_secure_aggregation_stage(tmp_path):
    """A secagg round of 4: every stage is timed from the tick that entered it; the round's bytes
    include its masked inputs and key messages."""
    from tests.unit.deploy.test_http_secagg import Party, delta, make
    from pocketfed.privacy import dp

    clock = Clock()
    c = make(tmp_path, {"secagg": True})
    app = app_for(c, clock)
    parties = [Party(app, f"d{i}") for i in range(4)]
    for p in parties:
        p.checkin()
    for step in ("advertise", "share", "mask", "sign", "unmask"):
        clock.offset += 1.0  # each stage visibly takes a second of the coordinator's clock
        for i, p in enumerate(parties):
            if step == "mask":
                p.mask(dp.flatten_update(delta(i)))
            else:
                getattr(p, step)()
    d = overview(TestClient(app), operator_token(tmp_path))
    r = d["rounds"][0]
    assert r["status"] == "committed" and (r["sampled"], r["accepted"]) == (4, 4)
    assert [s[0] for s in r["stages"]] == ["advertise", "share", "masked", "consistency", "unmask"]
    assert all(s[1] >= 0.9 for s in r["stages"][:-1])  # each stage lasted about the second the test waited
    masked = sum(u.size for u in c.store.updates(r["round_id"]))
    assert r["update_bytes"] == masked and r["bytes_up"] > masked  # + the keys, shares, signatures, unmask shares
