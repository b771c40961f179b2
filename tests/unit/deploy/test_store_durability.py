"""The state store's SQLite set-up: what a commit survives, what the caches may hold, which
lookups an index serves, and how nonces are forgotten."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from pocketfed.server.store import DB_FILE, NONCE_PRUNE_S, Store, Version


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path)
    yield s
    s.close()


def _version(n: int) -> Version:
    return Version(n, n - 1, None, n, "a" * 64, "b" * 64, 1.0)


def test_wal_with_normal_sync(store, tmp_path):
    db = sqlite3.connect(tmp_path / DB_FILE)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert store._db.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL


def test_committed_rows_survive_sigkill(tmp_path):
    """A transition that committed is there after the process is SIGKILLed; one that did not is not."""
    code = textwrap.dedent(f"""
        import os, signal
        from pocketfed.server.store import Store, Version
        s = Store({str(tmp_path)!r})
        with s.transaction():
            s.add_version(Version(0, -1, None, 0, "a" * 64, "b" * 64, 1.0))
            s.add_device("d1", "{'1' * 64}", 1.0)
        assert s.use_nonce("{'1' * 64}", "{'f' * 32}", 1.0, 0.0)
        s._db.execute("BEGIN IMMEDIATE")
        s.add_device("d2", "{'2' * 64}", 1.0)  # never committed
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == -9, p.stderr
    s = Store(tmp_path)
    assert s.version(0) == Version(0, -1, None, 0, "a" * 64, "b" * 64, 1.0)
    assert s.device_by_key("1" * 64) == "d1" and s.device_by_key("2" * 64) is None
    assert not s.use_nonce("1" * 64, "f" * 32, 1.0, 0.0)  # the nonce was kept: a replay is refused
    s.close()


def test_rollback_forgets_cached_rows(store):
    """A row read (and cached) inside a transaction that rolls back is not served afterwards."""
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.add_version(_version(0))
            store.add_device("d1", "1" * 64, 1.0)
            assert store.version(0) == _version(0)
            assert store.device_by_key("1" * 64) == "d1" and store.device_key("d1") == "1" * 64
            raise RuntimeError("abort")
    assert store.version(0) is None
    assert store.device_by_key("1" * 64) is None and store.device_key("d1") is None


def test_cached_rows_match_the_database(store):
    store.add_version(_version(0))
    store.add_device("d1", "1" * 64, 1.0)
    for _ in range(2):  # the first read fills the cache, the second is served from it
        assert store.version(0) == _version(0) and store.version(1) is None
        assert store.device_by_key("1" * 64) == "d1" and store.device_key("d1") == "1" * 64
        assert store.device_by_key("2" * 64) is None and store.device_key("d2") is None
    store.add_device("d2", "2" * 64, 2.0)  # a miss is not cached: a later registration is seen
    assert store.device_by_key("2" * 64) == "d2"


@pytest.mark.parametrize("sql, args", [
    ("SELECT * FROM rounds WHERE status = 'open' ORDER BY round_id DESC LIMIT 1", ()),
    ("SELECT 1 FROM versions WHERE adapter_sha = ?", ("a" * 64,)),
    ("SELECT device_id FROM devices WHERE public_key = ?", ("1" * 64,)),
    ("DELETE FROM nonces WHERE ts < ?", (1.0,)),
    ("SELECT COUNT(*) FROM assignments WHERE round_id = ?", (1,)),
    ("SELECT COUNT(*) FROM updates WHERE round_id = ?", (1,)),
])
def test_per_request_lookups_use_an_index(store, sql, args):
    """No per-request lookup scans a whole table (rounds and versions grow with every round)."""
    plan = " ".join(str(row[-1]) for row in store._db.execute(f"EXPLAIN QUERY PLAN {sql}", args))
    assert "USING" in plan and not any(f"SCAN {t}" in plan for t in ("rounds", "versions", "devices", "nonces")), plan


def test_an_older_state_folder_gets_the_indexes(tmp_path):
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.execute("DROP INDEX rounds_status")
    db.execute("DROP INDEX versions_adapter")
    db.commit()
    db.close()
    s = Store(tmp_path)
    names = {r[0] for r in s._db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"rounds_status", "versions_adapter", "nonces_ts"} <= names
    s.close()


def test_nonces_refuse_replays_and_are_forgotten_in_batches(store):
    key, p = "1" * 64, NONCE_PRUNE_S
    count = lambda: store._db.execute("SELECT COUNT(*) FROM nonces").fetchone()[0]  # noqa: E731
    assert store.use_nonce(key, "0" * 32, 99.0 + 0.2 * p, 99.0)  # prunes (nothing yet) and remembers 99.0
    assert not store.use_nonce(key, "0" * 32, 99.0 + 0.2 * p, 99.0)
    assert store.use_nonce("2" * 64, "0" * 32, 99.0 + 0.2 * p, 99.0)  # nonces are per key
    assert store.use_nonce(key, "1" * 32, 99.0 + 0.4 * p, 99.0)
    # the horizon passes those three, but by less than NONCE_PRUNE_S since the last pruning
    assert store.use_nonce(key, "2" * 32, 99.0 + 2 * p, 99.0 + 0.9 * p)
    assert count() == 4
    assert not store.use_nonce(key, "0" * 32, 99.0 + 0.2 * p, 99.0 + 0.9 * p)  # kept a while longer: refused
    assert store.use_nonce(key, "3" * 32, 99.0 + 2 * p, 99.0 + p)
    assert count() == 2  # every nonce older than the horizon went at once


def test_count_assigned(store):
    for d in ("b", "a", "c"):
        store.assign(7, d, 1.0)
    store.assign(7, "a", 2.0)  # again: once
    store.assign(8, "z", 1.0)
    assert store.count_assigned(7) == len(store.assigned(7)) == 3 and store.count_assigned(9) == 0
