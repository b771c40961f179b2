"""The coordinator's state store: one SQLite database plus content-addressed blobs beside it.

    <folder>/state.sqlite     devices, nonces, rounds (with each round's sample rate q), cohorts (the
                              devices each round's Poisson draw sampled), assignments, updates,
                              versions (WAL, NORMAL sync),
                              secure-aggregation stages and messages; federated evaluations (their
                              draws, cohorts, reports in the clear and totals: `evaluations()`);
                              meta holds config and DP ledger
    <folder>/blobs/ab/abcd..  adapters, server states and device updates, named by their sha256
    <folder>/uploads/<round>/<device>.part   uploads in progress (resumable)
    <folder>/uploads/incoming/<random>.chunk  one upload request's body while its signature is unchecked

Everything is the server process's alone: the folders are 0700 and the files 0600 (the database
and its -wal/-shm, blobs, uploads), so another local user reads no device's update or the
registry; an older state folder is tightened when it is opened.

Crash safety: a blob is written to a temp file, fsynced and renamed to its hash before any row
names it, and every multi-row change runs in one transaction (`with store.transaction():`), so a
SIGKILL leaves either the old state or the new one. Blobs nobody names are harmless leftovers.
SQLite runs in WAL mode with synchronous=NORMAL: a commit is in the WAL file (the OS page cache)
when COMMIT returns, so it survives a kill of the process; only a power cut or kernel crash can
drop the last commits, and the database stays consistent even then. FULL would fsync the WAL on
every commit, one disk flush per request (each signed request records its nonce), and that flush,
taken under the store's lock, was what capped the coordinator's requests per second.

Rows that never change once written (a version, a device's name and key) are cached in memory;
the caches are cleared when a transaction rolls back, so they never hold a row that was undone.

Everything the round logic needs goes through this module's `Store`; the SQL is plain (no
SQLite-only features besides the connection set-up) so a PostgreSQL store with the same methods
can be added later without touching `pocketfed.server.coordinator`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator
from pocketfed.files import write_atomic

DB_FILE = "state.sqlite"
INCOMING = "incoming"  # uploads/incoming/: request bodies whose signature is not checked yet
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, public_key TEXT NOT NULL UNIQUE,
    registered_at REAL NOT NULL, last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS nonces (
    public_key TEXT NOT NULL, nonce TEXT NOT NULL, ts REAL NOT NULL, PRIMARY KEY (public_key, nonce));
CREATE INDEX IF NOT EXISTS nonces_ts ON nonces (ts);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY, parent INTEGER NOT NULL, round_id INTEGER, rounds_applied INTEGER NOT NULL,
    adapter_sha TEXT NOT NULL, state_sha TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS versions_adapter ON versions (adapter_sha);
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY, idx INTEGER NOT NULL, base_version INTEGER NOT NULL,
    status TEXT NOT NULL, opened_at REAL NOT NULL, deadline REAL NOT NULL,
    goal INTEGER NOT NULL, target INTEGER NOT NULL, quorum INTEGER NOT NULL,
    closed_at REAL, reason TEXT, participants TEXT, metrics TEXT, new_version INTEGER, sample_rate REAL,
    sample_key TEXT);
CREATE INDEX IF NOT EXISTS rounds_status ON rounds (status, round_id);
CREATE TABLE IF NOT EXISTS cohorts (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, PRIMARY KEY (round_id, device_id));
CREATE TABLE IF NOT EXISTS assignments (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, assigned_at REAL NOT NULL,
    PRIMARY KEY (round_id, device_id));
CREATE TABLE IF NOT EXISTS updates (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, blob_sha TEXT NOT NULL, size INTEGER NOT NULL,
    num_tokens INTEGER NOT NULL, metrics TEXT NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (round_id, device_id));
CREATE TABLE IF NOT EXISTS secagg_rounds (
    round_id INTEGER PRIMARY KEY, stage TEXT NOT NULL, stage_deadline REAL NOT NULL,
    params TEXT, cohort TEXT, graph_seed TEXT, survivors TEXT, dropped TEXT);
CREATE TABLE IF NOT EXISTS enrollments (
    token_sha TEXT PRIMARY KEY, created_at REAL NOT NULL, expires_at REAL NOT NULL, device_id TEXT, used_at REAL);
CREATE TABLE IF NOT EXISTS secagg_messages (
    round_id INTEGER NOT NULL, device_id TEXT NOT NULL, kind TEXT NOT NULL, body BLOB NOT NULL,
    PRIMARY KEY (round_id, device_id, kind));
CREATE TABLE IF NOT EXISTS evaluations (
    eval_id INTEGER PRIMARY KEY, version INTEGER NOT NULL, rounds_applied INTEGER NOT NULL, status TEXT NOT NULL,
    opened_at REAL NOT NULL, deadline REAL NOT NULL, sample_rate REAL NOT NULL, sample_key TEXT NOT NULL,
    target INTEGER NOT NULL, secure INTEGER NOT NULL, closed_at REAL, reason TEXT, devices INTEGER, totals TEXT);
CREATE TABLE IF NOT EXISTS eval_cohorts (
    eval_id INTEGER NOT NULL, device_id TEXT NOT NULL, PRIMARY KEY (eval_id, device_id));
CREATE TABLE IF NOT EXISTS eval_reports (
    eval_id INTEGER NOT NULL, device_id TEXT NOT NULL, sums TEXT NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (eval_id, device_id));
CREATE TABLE IF NOT EXISTS operator_actions (
    action_id INTEGER PRIMARY KEY, at REAL NOT NULL, action TEXT NOT NULL, value TEXT NOT NULL,
    credential TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revocations (device_id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS device_checkins (
    device_id TEXT PRIMARY KEY, at REAL NOT NULL, eligible INTEGER NOT NULL, profile TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS round_stages (
    round_id INTEGER NOT NULL, stage TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (round_id, stage));
CREATE TABLE IF NOT EXISTS round_traffic (
    round_id INTEGER PRIMARY KEY, bytes_up INTEGER NOT NULL, bytes_down INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Version:
    version: int
    parent: int
    round_id: int | None
    rounds_applied: int
    adapter_sha: str
    state_sha: str
    created_at: float


@dataclass(frozen=True)
class Round:
    round_id: int
    idx: int  # the training round index (= committed rounds before it), what device seeds use
    base_version: int
    status: str  # open | committed | aborted | failed | empty (a sampled cohort too small to commit)
    opened_at: float
    deadline: float
    goal: int
    target: int  # the size of the cohort drawn when the round opened
    quorum: int
    closed_at: float | None
    reason: str | None
    participants: list[str] | None
    metrics: dict[str, Any] | None
    new_version: int | None
    sample_rate: float | None = None  # q, each device's chance to be sampled (None: a round from before sampling)
    sample_key: str | None = None  # hex; the draw's key, kept to draw devices that register during the round


@dataclass(frozen=True)
class SecAggRound:
    """A secure-aggregation round's stage and what the server fixed at each step (JSON columns)."""

    round_id: int
    stage: str  # advertise | share | masked | consistency | unmask | done
    stage_deadline: float
    params: dict[str, Any] | None  # the SecAggConfig fields, fixed when advertising ends
    cohort: list[str] | None  # U1, device names in index order (index = position; ordered by identity key)
    graph_seed: str | None  # hex; the SecAgg+ graph's seed, the hash of the signed adverts (`secagg.graph_seed`)
    survivors: list[int] | None  # U3 (indices), fixed when masking ends
    dropped: list[int] | None  # U2 minus U3


@dataclass(frozen=True)
class Evaluation:
    """One federated evaluation of a released version (`pocketfed.server.evaluations`): its Poisson
    draw (q, key, the sampled count `target`), and once closed the totals of the reports
    (`pocketfed.protocol.fedeval.Sums` fields) over `devices` devices."""

    eval_id: int
    version: int  # the version evaluated
    rounds_applied: int  # that version's training rounds
    status: str  # open | done | empty (too few sampled) | failed (too few reports, or the secure sum failed)
    opened_at: float
    deadline: float
    sample_rate: float
    sample_key: str  # hex; the draw's own key (fresh from `secrets`, not a training round's)
    target: int  # devices the draw sampled when it opened
    secure: bool  # reports went through the secure sum (the server saw only the totals)
    closed_at: float | None = None
    reason: str | None = None
    devices: int | None = None  # devices whose reports are in the totals
    totals: dict[str, float] | None = None  # loss_sum, tokens, top1_hits, top3_hits


@dataclass(frozen=True)
class Update:
    round_id: int
    device_id: str
    blob_sha: str
    size: int
    num_tokens: int
    metrics: dict[str, float]
    received_at: float


def private_dir(path: Path) -> None:
    """Make `path` (and missing parents) a folder only this user can enter (0700)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)  # mkdir's mode is masked by the umask, and an existing folder keeps its own


def private_file(path: Path) -> None:
    """Create `path` empty with 0600 if missing; make an existing one 0600."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    path.chmod(0o600)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


NONCE_PRUNE_S = 1.0  # forget expired nonces at most this often (a DELETE per request is wasted work)


class Store:
    """SQLite + blobs. Thread-safe: one connection behind a re-entrant lock."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        for sub in (self.folder, self.folder / "blobs", self.folder / "uploads"):
            private_dir(sub)
        # the database is made 0600 before SQLite opens it: SQLite gives its -wal and -shm files the
        # database file's permissions (an older, 0644 one is tightened here, its -wal/-shm below)
        private_file(self.folder / DB_FILE)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.folder / DB_FILE, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        for suffix in ("-wal", "-shm"):
            if (side := self.folder / (DB_FILE + suffix)).exists():
                side.chmod(0o600)
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a process kill; see the module docstring
        self._db.execute("PRAGMA busy_timeout=5000")
        self._depth = 0
        self._nonces_pruned_to = float("-inf")
        # immutable rows: version -> Version; device name -> public key; public key -> device name
        self._versions: dict[int, Version] = {}
        self._key_of: dict[str, str] = {}
        self._device_of: dict[str, str] = {}
        with self.transaction():
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(statement)
            for column in ("sample_rate REAL", "sample_key TEXT"):  # a state folder from before Poisson
                try:  # sampling: its rounds get the columns (NULL)
                    self._db.execute(f"SELECT {column.split()[0]} FROM rounds LIMIT 0")
                except sqlite3.OperationalError:
                    self._db.execute(f"ALTER TABLE rounds ADD COLUMN {column}")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- transactions ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All statements inside commit together or not at all (nested uses join the outer one)."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._forget_cached()
                raise
            finally:
                self._depth = 0

    def _forget_cached(self) -> None:
        """Drop the caches of immutable rows: a rolled-back transaction may have put rows in them
        that no longer exist."""
        self._versions.clear()
        self._key_of.clear()
        self._device_of.clear()

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    # ---- meta -----------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        rows = self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self._exec("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    # ---- blobs ----------------------------------------------------------------------------------
    def blob_path(self, sha: str) -> Path:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"not a sha256 hex digest: {sha!r}")
        return self.folder / "blobs" / sha[:2] / sha

    def put_blob(self, data: bytes) -> str:
        """Write `data` under its sha256 (temp file, fsync, rename); return the hash."""
        sha = sha256_hex(data)
        path = self.blob_path(sha)
        if path.is_file():
            return sha
        private_dir(path.parent)
        write_atomic(path, data, mode=0o600)
        return sha

    def get_blob(self, sha: str) -> bytes:
        data = self.blob_path(sha).read_bytes()
        if sha256_hex(data) != sha:
            raise IOError(f"blob {sha} is corrupt on disk")
        return data

    def has_blob(self, sha: str) -> bool:
        try:
            return self.blob_path(sha).is_file()
        except ValueError:
            return False

    # ---- uploads in progress --------------------------------------------------------------------
    def upload_path(self, round_id: int, device_id: str) -> Path:
        return self.folder / "uploads" / str(int(round_id)) / f"{device_id}.part"

    def incoming_path(self) -> Path:
        """A fresh private file for one upload request's body, read before its signature is checked
        (the HTTP layer removes it once the request is answered)."""
        folder = self.folder / "uploads" / INCOMING
        private_dir(folder)
        path = folder / f"{secrets.token_hex(16)}.chunk"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return path

    def clean_uploads(self, keep: Iterable[int]) -> list[Path]:
        """Remove what no upload can resume from (at the coordinator's start): the folders of ids
        not in `keep` (the open round's and evaluation's: others closed before a crash let
        `lifecycle.drop_uploads` run), stray files, and request bodies that were being received.
        The .part files of the ids in `keep` stay, to resume. -> what was removed."""
        root = self.folder / "uploads"
        kept = {str(int(i)) for i in keep}
        removed = []
        for entry in sorted(root.iterdir()):
            if entry.name in kept and entry.is_dir():
                removed += [p for p in entry.iterdir() if not (p.is_file() and p.suffix == ".part")]
            else:
                removed.append(entry)
        for p in removed:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        return removed

    # ---- devices and nonces ---------------------------------------------------------------------
    def add_device(self, device_id: str, public_key: str, now: float) -> None:
        self._exec("INSERT INTO devices VALUES (?, ?, ?, ?)", (device_id, public_key, now, now))
        self._remember_device(device_id, public_key)  # a rollback forgets it again (`_forget_cached`)

    def cached_device(self, public_key: str) -> str | None:
        """The device registered with this key if it is cached (never touches SQLite: callable on
        the event loop; None also when it is not cached yet)."""
        return self._device_of.get(public_key)

    def device_by_key(self, public_key: str) -> str | None:
        """The device registered with this key (a registration never changes, so a hit is cached)."""
        if (device := self._device_of.get(public_key)) is not None:
            return device
        rows = self._rows("SELECT device_id FROM devices WHERE public_key = ?", (public_key,))
        if not rows:
            return None
        self._remember_device(rows[0][0], public_key)
        return str(rows[0][0])

    def device_key(self, device_id: str) -> str | None:
        if (key := self._key_of.get(device_id)) is not None:
            return key
        rows = self._rows("SELECT public_key FROM devices WHERE device_id = ?", (device_id,))
        if not rows:
            return None
        self._remember_device(device_id, rows[0][0])
        return str(rows[0][0])

    def _remember_device(self, device_id: str, public_key: str) -> None:
        with self._lock:
            self._key_of[device_id] = public_key
            self._device_of[public_key] = device_id

    def touch_device(self, device_id: str, now: float) -> None:
        self._exec("UPDATE devices SET last_seen = ? WHERE device_id = ?", (now, device_id))

    def add_enrollment(self, token_sha: str, now: float, expires_at: float) -> None:
        self._exec("INSERT INTO enrollments VALUES (?, ?, ?, NULL, NULL)", (token_sha, now, expires_at))

    def spend_enrollment(self, token_sha: str, device_id: str, now: float) -> bool:
        """Mark an unused, unexpired token as spent by `device_id`; False if there is no such token."""
        return self._exec("UPDATE enrollments SET device_id = ?, used_at = ? WHERE token_sha = ? "
                          "AND device_id IS NULL AND expires_at > ?", (device_id, now, token_sha, now)) == 1

    def count_devices(self) -> int:
        return int(self._rows("SELECT COUNT(*) FROM devices")[0][0])

    def use_nonce(self, public_key: str, nonce: str, ts: float, forget_before: float) -> bool:
        """Record a request nonce; False if this key already used it (a replay). Nonces older than
        `forget_before` are dropped, at most every NONCE_PRUNE_S seconds of `forget_before`: one
        kept a little longer still refuses its replay, which the timestamp check refuses anyway."""
        with self.transaction():
            if forget_before >= self._nonces_pruned_to + NONCE_PRUNE_S:
                self._exec("DELETE FROM nonces WHERE ts < ?", (forget_before,))
                self._nonces_pruned_to = forget_before
            try:
                self._exec("INSERT INTO nonces VALUES (?, ?, ?)", (public_key, nonce, ts))
            except sqlite3.IntegrityError:
                return False
        return True

    # ---- versions -------------------------------------------------------------------------------
    def add_version(self, v: Version) -> None:
        self._exec("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (v.version, v.parent, v.round_id, v.rounds_applied, v.adapter_sha, v.state_sha, v.created_at))

    def latest_version(self) -> Version | None:
        rows = self._rows("SELECT * FROM versions ORDER BY version DESC LIMIT 1")
        return Version(*rows[0]) if rows else None

    def is_release_blob(self, sha: str) -> bool:
        return bool(self._rows("SELECT 1 FROM versions WHERE adapter_sha = ?", (sha,)))

    def version(self, version: int) -> Version | None:
        """A version (they never change once written, so it is cached)."""
        if (v := self._versions.get(version)) is not None:
            return v
        rows = self._rows("SELECT * FROM versions WHERE version = ?", (version,))
        if not rows:
            return None
        with self._lock:
            v = self._versions[version] = Version(*rows[0])
        return v

    # ---- rounds ---------------------------------------------------------------------------------
    @staticmethod
    def _round(row: tuple[Any, ...]) -> Round:
        r = list(row)
        r[11] = json.loads(r[11]) if r[11] is not None else None
        r[12] = json.loads(r[12]) if r[12] is not None else None
        return Round(*r)

    def add_round(self, idx: int, base_version: int, opened_at: float, deadline: float,
                  goal: int, quorum: int, sample_rate: float, sample_key: str, cohort: list[str]) -> int:
        """Open a round with its Poisson-sampled cohort (call inside a transaction: both or neither)."""
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO rounds (idx, base_version, status, opened_at, deadline, goal, target, quorum, sample_rate, "
                "sample_key) VALUES (?, ?, 'open', ?, ?, ?, ?, ?, ?, ?)",
                (idx, base_version, opened_at, deadline, goal, len(cohort), quorum, sample_rate, sample_key))
            round_id = int(cur.lastrowid or 0)
            self._db.executemany("INSERT INTO cohorts VALUES (?, ?)", [(round_id, d) for d in cohort])
            return round_id

    def round(self, round_id: int) -> Round | None:
        rows = self._rows("SELECT * FROM rounds WHERE round_id = ?", (round_id,))
        return self._round(rows[0]) if rows else None

    def open_round(self) -> Round | None:
        rows = self._rows("SELECT * FROM rounds WHERE status = 'open' ORDER BY round_id DESC LIMIT 1")
        return self._round(rows[0]) if rows else None

    def rounds(self, limit: int = 1000) -> list[Round]:
        rows = self._rows("SELECT * FROM rounds ORDER BY round_id DESC LIMIT ?", (limit,))
        return [self._round(r) for r in reversed(rows)]

    def close_round(self, round_id: int, status: str, now: float, reason: str,
                    participants: list[str] | None = None, metrics: dict[str, Any] | None = None,
                    new_version: int | None = None) -> None:
        n = self._exec(
            "UPDATE rounds SET status = ?, closed_at = ?, reason = ?, participants = ?, metrics = ?, new_version = ? "
            "WHERE round_id = ? AND status = 'open'",
            (status, now, reason, json.dumps(participants) if participants is not None else None,
             json.dumps(metrics) if metrics is not None else None, new_version, round_id))
        if n != 1:
            raise RuntimeError(f"round {round_id} is not open")

    def in_cohort(self, round_id: int, device_id: str) -> bool:
        """Whether the round's Poisson draw sampled the device."""
        return bool(self._rows("SELECT 1 FROM cohorts WHERE round_id = ? AND device_id = ?", (round_id, device_id)))

    def add_to_cohort(self, round_id: int, device_id: str) -> None:
        self._exec("INSERT OR IGNORE INTO cohorts VALUES (?, ?)", (round_id, device_id))

    def cohort(self, round_id: int) -> list[str]:
        return [r[0] for r in self._rows("SELECT device_id FROM cohorts WHERE round_id = ? ORDER BY device_id", (round_id,))]

    def device_ids(self) -> list[str]:
        """Every registered device, by name."""
        return [r[0] for r in self._rows("SELECT device_id FROM devices ORDER BY device_id")]

    def participants_since(self, first_idx: int) -> dict[int, list[str]]:
        """Training round index -> the devices whose updates a committed round with that index
        (from `first_idx` on) applied: what the participation cap counts."""
        rows = self._rows("SELECT idx, participants FROM rounds WHERE status = 'committed' AND idx >= ?", (first_idx,))
        return {int(i): json.loads(p) if p else [] for i, p in rows}

    # ---- assignments and updates ----------------------------------------------------------------
    def assign(self, round_id: int, device_id: str, now: float) -> None:
        self._exec("INSERT OR IGNORE INTO assignments VALUES (?, ?, ?)", (round_id, device_id, now))

    def assigned(self, round_id: int) -> list[str]:
        return [r[0] for r in self._rows("SELECT device_id FROM assignments WHERE round_id = ? ORDER BY device_id", (round_id,))]

    def count_assigned(self, round_id: int) -> int:
        return int(self._rows("SELECT COUNT(*) FROM assignments WHERE round_id = ?", (round_id,))[0][0])

    def is_assigned(self, round_id: int, device_id: str) -> bool:
        return bool(self._rows("SELECT 1 FROM assignments WHERE round_id = ? AND device_id = ?", (round_id, device_id)))

    def add_update(self, u: Update) -> None:
        self._exec("INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (u.round_id, u.device_id, u.blob_sha, u.size, u.num_tokens, json.dumps(u.metrics), u.received_at))

    def updates(self, round_id: int) -> list[Update]:
        rows = self._rows("SELECT * FROM updates WHERE round_id = ? ORDER BY device_id", (round_id,))
        return [Update(*r[:5], json.loads(r[5]), r[6]) for r in rows]  # type: ignore[arg-type]

    def has_update(self, round_id: int, device_id: str) -> bool:
        return bool(self._rows("SELECT 1 FROM updates WHERE round_id = ? AND device_id = ?", (round_id, device_id)))

    def count_updates(self, round_id: int) -> int:
        return int(self._rows("SELECT COUNT(*) FROM updates WHERE round_id = ?", (round_id,))[0][0])

    # ---- secure aggregation ---------------------------------------------------------------------
    def add_secagg_round(self, round_id: int, stage_deadline: float) -> None:
        self._exec("INSERT INTO secagg_rounds (round_id, stage, stage_deadline) VALUES (?, 'advertise', ?)",
                   (round_id, stage_deadline))

    def secagg_round(self, round_id: int) -> SecAggRound | None:
        rows = self._rows("SELECT * FROM secagg_rounds WHERE round_id = ?", (round_id,))
        if not rows:
            return None
        r = list(rows[0])
        for i in (3, 4, 6, 7):
            r[i] = json.loads(r[i]) if r[i] is not None else None
        return SecAggRound(*r)

    def set_secagg_stage(self, round_id: int, stage: str, stage_deadline: float, **fixed: Any) -> None:
        """Move to `stage`; `fixed` sets any of params, cohort, graph_seed, survivors, dropped."""
        cols = {k: (v if k == "graph_seed" else json.dumps(v)) for k, v in fixed.items()}
        if not set(cols) <= {"params", "cohort", "graph_seed", "survivors", "dropped"}:
            raise ValueError(f"unknown secagg columns {sorted(cols)}")
        sets = "".join(f", {k} = ?" for k in cols)
        self._exec(f"UPDATE secagg_rounds SET stage = ?, stage_deadline = ?{sets} WHERE round_id = ?",
                   (stage, stage_deadline, *cols.values(), round_id))

    def add_secagg_message(self, round_id: int, device_id: str, kind: str, body: bytes) -> None:
        self._exec("INSERT INTO secagg_messages VALUES (?, ?, ?, ?)", (round_id, device_id, kind, body))

    def secagg_messages(self, round_id: int, kind: str) -> dict[str, bytes]:
        rows = self._rows("SELECT device_id, body FROM secagg_messages WHERE round_id = ? AND kind = ? ORDER BY device_id",
                          (round_id, kind))
        return {d: bytes(b) for d, b in rows}

    def has_secagg_message(self, round_id: int, device_id: str, kind: str) -> bool:
        return bool(self._rows("SELECT 1 FROM secagg_messages WHERE round_id = ? AND device_id = ? AND kind = ?",
                               (round_id, device_id, kind)))

    # ---- the operator's console: actions, controls, revocations, check-ins, stages, traffic -----
    # (`pocketfed.server.operations` holds what they mean; these are the rows)
    def add_action(self, at: float, action: str, value: str, credential: str) -> None:
        """Record an operator action; `credential` is the token's fingerprint, never the token."""
        self._exec("INSERT INTO operator_actions (at, action, value, credential) VALUES (?, ?, ?, ?)",
                   (at, action, value, credential))

    def actions(self, limit: int = 200) -> list[dict[str, Any]]:
        rows = self._rows("SELECT at, action, value, credential FROM operator_actions ORDER BY action_id DESC LIMIT ?",
                          (limit,))
        return [{"at": a, "action": b, "value": v, "credential": f} for a, b, v, f in rows]

    def release_version_of(self, sha: str) -> int | None:
        """The first version that released the adapter with this hash (None: not a release)."""
        rows = self._rows("SELECT MIN(version) FROM versions WHERE adapter_sha = ?", (sha,))
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    def revoke(self, device_id: str, at: float) -> bool:
        """Revoke a device for good; False if it already was."""
        return self._exec("INSERT OR IGNORE INTO revocations VALUES (?, ?)", (device_id, at)) == 1

    def revoked(self) -> dict[str, float]:
        """Revoked device -> when (read on every signed request: the caller caches it)."""
        return {d: float(t) for d, t in self._rows("SELECT device_id, at FROM revocations")}

    def note_checkin(self, device_id: str, at: float, eligible: bool, profile: str) -> None:
        self._exec("INSERT INTO device_checkins VALUES (?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
                   "at = excluded.at, eligible = excluded.eligible, profile = excluded.profile",
                   (device_id, at, int(eligible), profile))

    def device_table(self) -> list[dict[str, Any]]:
        """Every device: registration, last seen, its last check-in's eligibility and profile, revocation."""
        rows = self._rows(
            "SELECT d.device_id, d.registered_at, d.last_seen, c.at, c.eligible, c.profile, r.at FROM devices d "
            "LEFT JOIN device_checkins c ON c.device_id = d.device_id "
            "LEFT JOIN revocations r ON r.device_id = d.device_id ORDER BY d.device_id")
        return [{"device_id": d, "registered_at": reg, "last_seen": seen, "checked_in_at": at,
                 "eligible": None if ok is None else bool(ok), "profile": prof or "", "revoked_at": rev}
                for d, reg, seen, at, ok, prof, rev in rows]

    def mark_stage(self, round_id: int, stage: str, at: float) -> None:
        """When a round entered a stage (the first time: a stage is entered once)."""
        self._exec("INSERT OR IGNORE INTO round_stages VALUES (?, ?, ?)", (round_id, stage, at))

    def stage_times(self, round_ids: list[int]) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {r: {} for r in round_ids}
        if round_ids:
            marks = ",".join("?" * len(round_ids))
            for r, stage, at in self._rows(f"SELECT round_id, stage, at FROM round_stages WHERE round_id IN ({marks})",
                                           tuple(round_ids)):
                out[int(r)][stage] = float(at)
        return out

    def add_traffic(self, round_id: int, bytes_up: int, bytes_down: int) -> None:
        self._exec("INSERT INTO round_traffic VALUES (?, ?, ?) ON CONFLICT(round_id) DO UPDATE SET "
                   "bytes_up = bytes_up + excluded.bytes_up, bytes_down = bytes_down + excluded.bytes_down",
                   (round_id, bytes_up, bytes_down))

    def round_activity(self) -> dict[int, dict[str, Any]]:
        """Per round: bytes up and down counted by the HTTP layer, assignments, updates (count, bytes,
        first and last arrival), the refusals a task drew, and its stage times' source rows."""
        out: dict[int, dict[str, Any]] = {}
        for r, up, down in self._rows("SELECT round_id, bytes_up, bytes_down FROM round_traffic"):
            out.setdefault(int(r), {}).update(bytes_up=int(up), bytes_down=int(down))
        for r, n, first in self._rows("SELECT round_id, COUNT(*), MIN(assigned_at) FROM assignments GROUP BY round_id"):
            out.setdefault(int(r), {}).update(assigned=int(n), first_assigned=first)
        for r, n, size, first, last in self._rows(
                "SELECT round_id, COUNT(*), SUM(size), MIN(received_at), MAX(received_at) FROM updates GROUP BY round_id"):
            out.setdefault(int(r), {}).update(updates=int(n), update_bytes=int(size or 0), first_update=first,
                                              last_update=last)
        for r, n in self._rows("SELECT round_id, COUNT(*) FROM cohorts GROUP BY round_id"):
            out.setdefault(int(r), {}).update(sampled=int(n))
        return out

    # ---- federated evaluation -------------------------------------------------------------------
    @staticmethod
    def _evaluation(row: tuple[Any, ...]) -> Evaluation:
        r = list(row)
        r[9] = bool(r[9])
        r[13] = json.loads(r[13]) if r[13] is not None else None
        return Evaluation(*r)

    def add_evaluation(self, version: int, rounds_applied: int, opened_at: float, deadline: float,
                       sample_rate: float, sample_key: str, cohort: list[str], secure: bool) -> int:
        """Open an evaluation of `version` with its Poisson-sampled cohort (inside a transaction)."""
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO evaluations (version, rounds_applied, status, opened_at, deadline, sample_rate, sample_key, "
                "target, secure) VALUES (?, ?, 'open', ?, ?, ?, ?, ?, ?)",
                (version, rounds_applied, opened_at, deadline, sample_rate, sample_key, len(cohort), int(secure)))
            eval_id = int(cur.lastrowid or 0)
            self._db.executemany("INSERT INTO eval_cohorts VALUES (?, ?)", [(eval_id, d) for d in cohort])
            return eval_id

    def evaluation(self, eval_id: int) -> Evaluation | None:
        rows = self._rows("SELECT * FROM evaluations WHERE eval_id = ?", (eval_id,))
        return self._evaluation(rows[0]) if rows else None

    def evaluation_of(self, version: int) -> Evaluation | None:
        """The evaluation of `version`, if one was opened."""
        rows = self._rows("SELECT * FROM evaluations WHERE version = ? ORDER BY eval_id DESC LIMIT 1", (version,))
        return self._evaluation(rows[0]) if rows else None

    def open_evaluation(self) -> Evaluation | None:
        rows = self._rows("SELECT * FROM evaluations WHERE status = 'open' ORDER BY eval_id DESC LIMIT 1")
        return self._evaluation(rows[0]) if rows else None

    def close_evaluation(self, eval_id: int, status: str, now: float, reason: str, devices: int = 0,
                         totals: dict[str, float] | None = None) -> None:
        n = self._exec("UPDATE evaluations SET status = ?, closed_at = ?, reason = ?, devices = ?, totals = ? "
                       "WHERE eval_id = ? AND status = 'open'",
                       (status, now, reason, devices, json.dumps(totals) if totals is not None else None, eval_id))
        if n != 1:
            raise RuntimeError(f"evaluation {eval_id} is not open")

    def in_eval_cohort(self, eval_id: int, device_id: str) -> bool:
        return bool(self._rows("SELECT 1 FROM eval_cohorts WHERE eval_id = ? AND device_id = ?", (eval_id, device_id)))

    def eval_cohort(self, eval_id: int) -> list[str]:
        return [r[0] for r in self._rows("SELECT device_id FROM eval_cohorts WHERE eval_id = ? ORDER BY device_id", (eval_id,))]

    def add_to_eval_cohort(self, eval_id: int, device_id: str) -> None:
        self._exec("INSERT OR IGNORE INTO eval_cohorts VALUES (?, ?)", (eval_id, device_id))

    def add_eval_report(self, eval_id: int, device_id: str, sums: dict[str, float], now: float) -> None:
        self._exec("INSERT INTO eval_reports VALUES (?, ?, ?, ?)", (eval_id, device_id, json.dumps(sums), now))

    def has_eval_report(self, eval_id: int, device_id: str) -> bool:
        return bool(self._rows("SELECT 1 FROM eval_reports WHERE eval_id = ? AND device_id = ?", (eval_id, device_id)))

    def eval_reports(self, eval_id: int) -> dict[str, dict[str, float]]:
        """Device -> its report, in the clear (only evaluations without secure aggregation have any)."""
        rows = self._rows("SELECT device_id, sums FROM eval_reports WHERE eval_id = ? ORDER BY device_id", (eval_id,))
        return {d: json.loads(s) for d, s in rows}

    def evaluations(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The latest `limit` evaluations, oldest first, as dicts for the console and /v1/status:
        eval_id, version, rounds_applied, status, opened_at, closed_at, sampled (the draw's size),
        sample_rate, devices (reports in the totals), secure, reason, and the figures
        (`pocketfed.protocol.fedeval.metrics`): loss (token-weighted mean, nats), perplexity, top1,
        top3, tokens; None while open or when nothing was reported."""
        from pocketfed.protocol import fedeval

        rows = self._rows("SELECT * FROM evaluations ORDER BY eval_id DESC LIMIT ?", (limit,))
        out = []
        for e in map(self._evaluation, reversed(rows)):
            figures = fedeval.metrics(fedeval.Sums(**e.totals)) if e.totals else dict.fromkeys(
                ("loss", "perplexity", "top1", "top3", "tokens"))
            out.append({"eval_id": e.eval_id, "version": e.version, "rounds_applied": e.rounds_applied,
                        "status": e.status, "opened_at": e.opened_at, "closed_at": e.closed_at, "sampled": e.target,
                        "sample_rate": e.sample_rate, "devices": e.devices or 0, "secure": e.secure,
                        "reason": e.reason or "", **figures})
        return out
