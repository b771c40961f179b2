"""The rows of "What left this device" (pocketfed.app.ledger_rows) and `pocketfed app`'s host rule."""

from __future__ import annotations

import json

import pytest

from pocketfed.app import ledger_rows
from pocketfed.app.cli import check_host
from pocketfed.errors import UserError


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def test_rows_newest_first_with_totals_refusals_and_torn_lines(tmp_path):
    _write(tmp_path / "ledger.jsonl", [
        {"time": 100.0, "destination": "https://c/v1/register", "kind": "registration", "bytes": 300},
        {"time": 200.0, "destination": "https://c/v1/rounds/0/update", "kind": "update", "bytes": 2500},
        {"time": 201.0, "destination": "https://c/v1/rounds/0/metrics", "kind": "metrics", "bytes": 40},
        {"time": 250.0, "destination": "https://c/v1/rounds/1", "kind": "refusal",
         "requested_kind": "personal_adapter", "reason": "a personal adapter never leaves this device"},
        {"time": 300.0, "destination": "https://c/x", "kind": "text", "bytes": 7},
        '{"time": 400.0, "kind": "upd',  # torn last line after a crash
    ])
    rows = ledger_rows.read(tmp_path)
    # 300 + 2500 + 40 + 7 = 2847 bytes in 4 messages; the refusal sent nothing
    assert (rows.total_messages, rows.total_bytes, rows.total_refusals, rows.unreadable) == (4, 2847, 1, 1)
    assert [m["time"] for m in rows.messages] == [300.0, 201.0, 200.0, 100.0]
    assert [m["kind"] for m in rows.messages] == ["text", "metrics", "update", "registration"]
    odd, metrics, update, _ = rows.messages
    assert update == {"time": 200.0, "kind": "update", "what": "model updates", "allowed": True, "bytes": 2500,
                      "destination": "https://c/v1/rounds/0/update"}
    assert metrics["what"] == "metrics"
    assert odd["allowed"] is False and "may not leave" in odd["what"]  # shown, not hidden
    assert rows.refusals == [{"time": 250.0, "destination": "https://c/v1/rounds/1",
                              "requested_kind": "personal_adapter", "reason": "a personal adapter never leaves this device"}]


def test_rows_of_a_home_without_ledger_are_empty(tmp_path):
    rows = ledger_rows.read(tmp_path)
    assert rows.as_json() == {"messages": [], "refusals": [], "total_messages": 0, "total_bytes": 0,
                              "total_refusals": 0, "unreadable": 0}


def test_rows_keep_the_newest_max_rows_but_count_all(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_rows, "MAX_ROWS", 3)
    _write(tmp_path / "ledger.jsonl", [{"time": float(i), "destination": "d", "kind": "checkin", "bytes": 10}
                                       for i in range(5)])
    rows = ledger_rows.read(tmp_path)
    assert [m["time"] for m in rows.messages] == [4.0, 3.0, 2.0]
    assert (rows.total_messages, rows.total_bytes) == (5, 50)


def test_bad_fields_do_not_break_the_view(tmp_path):
    _write(tmp_path / "ledger.jsonl", [
        {"time": "yesterday", "kind": "update", "bytes": -5},  # not a time, not a size
        ["not", "an", "object"],
        {"bytes": 3},  # no kind
    ])
    rows = ledger_rows.read(tmp_path)
    assert rows.unreadable == 2
    assert rows.messages == [{"time": None, "kind": "update", "what": "model updates", "allowed": True, "bytes": 0,
                              "destination": ""}]


def test_loopback_hosts_are_served_without_a_flag():
    assert check_host("127.0.0.1", False) == ["127.0.0.1", "localhost", "127.0.0.1"]
    assert "::1" in check_host("::1", False)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20"])
def test_another_host_is_refused_without_allow_remote(host):
    with pytest.raises(UserError, match=r"--allow-remote") as err:
        check_host(host, False)
    assert f"--host {host}" in str(err.value) and "ledger" in str(err.value)


def test_allow_remote_opens_the_named_host_only():
    assert check_host("192.168.1.20", True) == ["127.0.0.1", "localhost", "192.168.1.20"]
    assert check_host("0.0.0.0", True) == ["*"]  # reached under any of the machine's names
