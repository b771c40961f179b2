"""The round lifecycle of a real deployment, as functions over the state store.

    open round r (from the last committed version v; idx = rounds applied so far)
      -> devices check in; eligible ones are assigned until target = ceil(goal * overselect)
      -> each assigned device uploads one update (chunked, resumable, size-limited, validated)
      -> commit when `goal` updates are in, or at the deadline with at least `quorum` of them:
             Delta = aggregate_round(updates)         (the simulation's own function)
             state = strategies.apply_mean(state, Delta)
             blobs first (adapter, state), then one transaction: version v+1 + round committed
      -> otherwise abort at the deadline: the next round starts again from v.

The arithmetic is the simulation's, call for call: the same initial adapter
(`lora.attach(base, cfg.lora, seed=cfg.sim.seed)`), `strategies.init/apply_mean`,
`aggregate.aggregate_round` over the updates in device-id order, device seeds from
`sampling.device_seed(cfg.sim.seed, idx, device_id)`. So replaying a deployment's recorded
participants through `pocketfed.simulate.simulate(..., participants=...)` gives the same adapter.

Cohort selection is by check-in: the first eligible devices to ask while the round has room
(a device population that polls is already a random arrival order; over-selection absorbs
the devices that drop out). A refusal raises `Refused(code, sentence)`; the HTTP layer maps the
code to a status. Every state change happens under `Coordinator.lock` and in store transactions.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pocketfed import codec
from pocketfed.config import Codec, DPMode, RunConfig, to_dict
from pocketfed.errors import UserError
from pocketfed.release import signing
from pocketfed.server import strategies
from pocketfed.server.aggregate import aggregate_round
from pocketfed.server.sampling import device_seed
from pocketfed.server.store import Round, Store, Update, Version, sha256_hex
from pocketfed.server.strategies import ServerState, WeightedUpdate

AdapterState = dict[str, torch.Tensor]
CODEC_DTYPES = {Codec.float32: {"float32"}, Codec.float16: {"float16"}, Codec.int8: {"int8", "float32"}}

# Refusal codes (the HTTP layer maps them to statuses).
UNKNOWN_ROUND, ROUND_CLOSED, NOT_ASSIGNED, DUPLICATE = "unknown_round", "round_closed", "not_assigned", "duplicate_upload"
OFFSET_MISMATCH, TOO_LARGE, TRUNCATED, HASH_MISMATCH = "offset_mismatch", "upload_too_large", "truncated_upload", "hash_mismatch"
INVALID_UPDATE, NAME_TAKEN, KEY_TAKEN = "invalid_update", "name_taken", "key_registered"


class Refused(Exception):
    def __init__(self, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra


@dataclass
class Coordinator:
    """What the round functions work on: the store, the run's config and the release key."""

    store: Store
    cfg: RunConfig
    release_key: Ed25519PrivateKey
    model_id: str
    like: AdapterState  # the adapter schema (names, shapes), as zero tensors
    max_upload_bytes: int
    lock: threading.RLock = field(default_factory=threading.RLock)
    upload_locks: dict[Path, threading.Lock] = field(default_factory=dict)  # per upload in progress


@dataclass(frozen=True)
class Eligibility:
    charging: bool
    idle: bool
    unmetered: bool
    free_memory_mb: int


@dataclass(frozen=True)
class Assignment:
    round_id: int
    idx: int
    seed: int
    deadline: float
    version: Version


@dataclass(frozen=True)
class Wait:
    retry_at: float
    reason: str
    done: bool = False


# ---- serialization of adapters and server states ---------------------------------------------------
def adapter_bytes(params: AdapterState) -> bytes:
    return st_save({k: v.contiguous() for k, v in params.items()})


def state_bytes(state: ServerState) -> bytes:
    """The server state as one safetensors blob (the layout of pocketfed.server.checkpoint)."""
    tensors = {f"params/{k}": v.contiguous() for k, v in state.params.items()}
    for name, part in (("m", state.m), ("v", state.v)):
        if part is not None:
            tensors.update({f"{name}/{k}": v.contiguous() for k, v in part.items()})
    return st_save(tensors, metadata={"round": str(state.round)})


def state_from_bytes(data: bytes, rounds_applied: int) -> ServerState:
    parts: dict[str, AdapterState] = {"params": {}, "m": {}, "v": {}}
    for k, v in st_load(data).items():
        head, key = k.split("/", 1)
        parts[head][key] = v
    return ServerState(parts["params"], parts["m"] or None, parts["v"] or None, rounds_applied)


# ---- set-up ---------------------------------------------------------------------------------------
def open_coordinator(folder: Path, cfg: RunConfig, model_id: str,
                     init_params: Callable[[], AdapterState], now: float | None = None) -> Coordinator:
    """Open (or create) the state in `folder`. `init_params` is called only for a new state."""
    if cfg.privacy.dp is not DPMode.none or cfg.privacy.secagg:
        raise UserError("pocketfed server does not support privacy.dp or privacy.secagg yet; set them to none/false")
    now = time.time() if now is None else now
    store = Store(folder)
    config_json = json.dumps(to_dict(cfg), sort_keys=True)
    stored = store.get_meta("config")
    if stored is not None and stored != config_json:
        raise UserError(f"the state in {folder} was started with another config; use the same config or a new --db folder")
    key = signing.load_or_create_key(Path(folder))
    if store.latest_version() is None:
        state = strategies.init(init_params(), cfg.server)
        adapter_sha = store.put_blob(adapter_bytes(state.params))
        state_sha = store.put_blob(state_bytes(state))
        with store.transaction():
            store.add_version(Version(0, -1, None, 0, adapter_sha, state_sha, now))
            store.set_meta("config", config_json)
            store.set_meta("model_id", model_id)
    elif store.get_meta("model_id") != model_id:
        raise UserError(f"the state in {folder} was trained on model {store.get_meta('model_id')!r}, not {model_id!r}")
    latest = store.latest_version()
    assert latest is not None
    params = st_load(store.get_blob(latest.adapter_sha))
    like = {k: torch.zeros_like(v) for k, v in params.items()}
    expected = len(codec.encode(like, cfg.privacy.codec))
    limit = min(int(cfg.deploy.max_upload_mb * 2**20), expected + 64 * 1024)
    return Coordinator(store, cfg, key, model_id, like, limit)


# ---- releases -------------------------------------------------------------------------------------
def manifest_for(c: Coordinator, v: Version, now: float) -> tuple[dict[str, Any], str]:
    """The version's manifest, freshly signed with a new expiry (freeze protection)."""
    m = signing.Manifest(
        version=v.version, parent_version=v.parent, sha256=v.adapter_sha, round=v.rounds_applied,
        strategy=c.cfg.server.strategy.value, base_model=c.model_id,
        issued_at=now, expires_at=now + c.cfg.deploy.manifest_ttl_s,
    )
    return m.to_json(), signing.sign(c.release_key, m)


# ---- the lifecycle ----------------------------------------------------------------------------------
def is_done(c: Coordinator) -> bool:
    latest = c.store.latest_version()
    return latest is not None and latest.rounds_applied >= c.cfg.sim.rounds


def tick(c: Coordinator, now: float) -> None:
    """Advance the lifecycle: close a round whose goal or deadline is reached; open the next."""
    with c.lock:
        r = c.store.open_round()
        if r is not None:
            n = c.store.count_updates(r.round_id)
            if n >= r.goal:
                commit_round(c, r, now, "goal reached")
            elif now >= r.deadline:
                if n >= r.quorum:
                    commit_round(c, r, now, f"deadline with {n} updates (quorum {r.quorum})")
                else:
                    abort_round(c, r, now, f"deadline with {n} updates, below quorum {r.quorum}")
            else:
                return
        if not is_done(c):
            latest = c.store.latest_version()
            assert latest is not None
            d = c.cfg.deploy
            c.store.add_round(latest.rounds_applied, latest.version, now, now + d.deadline_s,
                              d.goal, math.ceil(d.goal * d.overselect - 1e-9), d.quorum)


def commit_round(c: Coordinator, r: Round, now: float, reason: str) -> Version:
    t0 = time.perf_counter()
    base = c.store.version(r.base_version)
    assert base is not None
    state = state_from_bytes(c.store.get_blob(base.state_sha), base.rounds_applied)
    ups = c.store.updates(r.round_id)  # device-id order, as the simulation's sorted cohort
    decoded = [codec.decode(c.store.get_blob(u.blob_sha), c.like) for u in ups]
    agg = aggregate_round(
        [WeightedUpdate(d, u.num_tokens) for d, u in zip(decoded, ups)], c.cfg.privacy,
        clip_norm=c.cfg.privacy.clip_norm, noise_multiplier=0.0, expected_devices=len(ups), round_id=r.idx,
    )
    new_state, diag = strategies.apply_mean(state, agg.mean, c.cfg.server)
    adapter_sha = c.store.put_blob(adapter_bytes(new_state.params))  # blobs before the commit row
    state_sha = c.store.put_blob(state_bytes(new_state))
    tokens = sum(u.num_tokens for u in ups)
    losses = [u.metrics.get("train_loss") for u in ups]
    metrics = {
        "devices": len(ups), "tokens": tokens, "bytes_up_per_device": agg.bytes_up_per_device, **diag,
        "train_loss": (sum(l * u.num_tokens for l, u in zip(losses, ups) if l is not None) / tokens
                       if tokens and all(l is not None for l in losses) else None),
        "commit_seconds": time.perf_counter() - t0,  # decode + aggregate + apply + write blobs
    }
    v = Version(base.version + 1, base.version, r.round_id, new_state.round, adapter_sha, state_sha, now)
    with c.store.transaction():
        c.store.add_version(v)
        c.store.close_round(r.round_id, "committed", now, reason, [u.device_id for u in ups], metrics, v.version)
    _drop_uploads(c, r.round_id)
    return v


def abort_round(c: Coordinator, r: Round, now: float, reason: str) -> None:
    with c.store.transaction():
        c.store.close_round(r.round_id, "aborted", now, reason)
    _drop_uploads(c, r.round_id)


def _drop_uploads(c: Coordinator, round_id: int) -> None:
    folder = c.store.upload_path(round_id, "x").parent
    for path in [p for p in c.upload_locks if p.parent == folder]:
        del c.upload_locks[path]
    if folder.is_dir():
        for p in folder.iterdir():
            p.unlink(missing_ok=True)
        folder.rmdir()


def eligibility_problem(e: Eligibility, c: Coordinator) -> str | None:
    missing = [name for name, ok in (("charging", e.charging), ("idle", e.idle), ("on an unmetered network", e.unmetered)) if not ok]
    if missing:
        return "device is not " + ", ".join(missing)
    if e.free_memory_mb < c.cfg.deploy.min_free_memory_mb:
        return f"device has {e.free_memory_mb} MB free memory; training needs {c.cfg.deploy.min_free_memory_mb} MB"
    return None


def checkin(c: Coordinator, device_id: str, e: Eligibility, now: float) -> Assignment | Wait:
    """A task for `device_id` in the open round, or when to come back."""
    with c.lock:
        tick(c, now)
        c.store.touch_device(device_id, now)
        later = now + c.cfg.deploy.retry_s
        if is_done(c):
            return Wait(later, f"training is finished ({c.cfg.sim.rounds} rounds)", done=True)
        problem = eligibility_problem(e, c)
        if problem:
            return Wait(later, problem)
        r = c.store.open_round()
        assert r is not None
        if c.store.has_update(r.round_id, device_id):
            return Wait(later, f"this device's update for round {r.round_id} is in; wait for the next round")
        if not c.store.is_assigned(r.round_id, device_id):  # a device that crashed gets its task again
            if len(c.store.assigned(r.round_id)) >= r.target:
                return Wait(later, f"round {r.round_id} has its cohort of {r.target} devices")
            c.store.assign(r.round_id, device_id, now)
        version = c.store.version(r.base_version)
        assert version is not None
        return Assignment(r.round_id, r.idx, device_seed(c.cfg.sim.seed, r.idx, device_id), r.deadline, version)


def _check_can_upload(c: Coordinator, round_id: int, device_id: str, now: float) -> Round:
    r = c.store.round(round_id)
    if r is None:
        raise Refused(UNKNOWN_ROUND, f"round {round_id} does not exist")
    if r.status != "open":
        raise Refused(ROUND_CLOSED, f"round {round_id} is closed ({r.status}); its uploads are refused")
    if now >= r.deadline:
        raise Refused(ROUND_CLOSED, f"round {round_id} passed its deadline; late uploads are refused")
    if not c.store.is_assigned(round_id, device_id):
        raise Refused(NOT_ASSIGNED, f"device {device_id} was not assigned to round {round_id}")
    if c.store.has_update(round_id, device_id):
        raise Refused(DUPLICATE, f"device {device_id} already uploaded its update for round {round_id}")
    return r


def upload_received(c: Coordinator, round_id: int, device_id: str, now: float) -> int:
    with c.lock:
        _check_can_upload(c, round_id, device_id, now)
    path = c.store.upload_path(round_id, device_id)
    return path.stat().st_size if path.exists() else 0


def receive_chunk(c: Coordinator, round_id: int, device_id: str, offset: int, data: bytes, now: float) -> int:
    """Append one chunk of an upload at `offset` (which must be what was received so far)."""
    with c.lock:
        _check_can_upload(c, round_id, device_id, now)
        path = c.store.upload_path(round_id, device_id)
        lock = c.upload_locks.setdefault(path, threading.Lock())
    with lock:  # one device's chunks in order; other devices' chunks and requests go on meanwhile
        have = path.stat().st_size if path.exists() else 0
        if offset != have:
            raise Refused(OFFSET_MISMATCH, f"upload offset {offset} does not follow the {have} bytes received", received=have)
        if have + len(data) > c.max_upload_bytes:
            raise Refused(TOO_LARGE, f"upload would be {have + len(data)} bytes; the limit is {c.max_upload_bytes}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return have + len(data)


def _check_payload(c: Coordinator, data: bytes) -> None:
    try:
        codec.decode(data, c.like)  # names, shapes, float dtypes, NaN / Inf
        dtypes = {str(t.dtype).removeprefix("torch.") for t in st_load(data).values()}
    except codec.PayloadError as e:
        raise Refused(INVALID_UPDATE, str(e)) from None
    allowed = CODEC_DTYPES[c.cfg.privacy.codec]
    if not dtypes <= allowed:
        raise Refused(INVALID_UPDATE, f"update dtypes {sorted(dtypes)} do not match the codec "
                                      f"{c.cfg.privacy.codec.value} ({sorted(allowed)})")


def commit_upload(c: Coordinator, round_id: int, device_id: str, size: int, sha256: str, num_tokens: int,
                  metrics: dict[str, float], now: float) -> bool:
    """Check a complete upload and record it; True if it closed the round."""
    with c.lock:
        _check_can_upload(c, round_id, device_id, now)
    path = c.store.upload_path(round_id, device_id)
    data = path.read_bytes() if path.exists() else b""
    if len(data) != size:
        raise Refused(TRUNCATED, f"upload has {len(data)} bytes, the commit says {size}", received=len(data))
    if sha256_hex(data) != sha256:
        path.unlink(missing_ok=True)
        raise Refused(HASH_MISMATCH, "upload's sha256 differs from the commit's; upload it again from offset 0", received=0)
    _check_payload(c, data)
    blob = c.store.put_blob(data)  # the blob exists before the row that names it
    with c.lock:
        _check_can_upload(c, round_id, device_id, now)
        with c.store.transaction():
            c.store.add_update(Update(round_id, device_id, blob, size, num_tokens, dict(metrics), now))
        path.unlink(missing_ok=True)
        tick(c, now)
        r = c.store.round(round_id)
        return r is not None and r.status != "open"


# ---- registration and status --------------------------------------------------------------------
def register(c: Coordinator, name: str, public_key: str, now: float) -> str:
    """Register a device under `name` with its Ed25519 key (idempotent for the same pair)."""
    with c.lock:
        owner = c.store.device_key(name)
        known = c.store.device_by_key(public_key)
        if owner == public_key:
            return name
        if owner is not None:
            raise Refused(NAME_TAKEN, f"device name {name!r} is registered with another key; choose another --name")
        if known is not None:
            raise Refused(KEY_TAKEN, f"this key is already registered as device {known!r}")
        c.store.add_device(name, public_key, now)
        return name


def status(c: Coordinator, now: float) -> dict[str, Any]:
    with c.lock:
        tick(c, now)
        latest = c.store.latest_version()
        assert latest is not None
        r = c.store.open_round()
        rounds = c.store.rounds(limit=50)
        return {
            "model": c.model_id,
            "strategy": c.cfg.server.strategy.value,
            "version": latest.version,
            "rounds_applied": latest.rounds_applied,
            "rounds_planned": c.cfg.sim.rounds,
            "done": is_done(c),
            "devices": c.store.count_devices(),
            "open_round": None if r is None else {
                "round_id": r.round_id, "idx": r.idx, "assigned": len(c.store.assigned(r.round_id)),
                "updates": c.store.count_updates(r.round_id), "goal": r.goal, "target": r.target,
                "quorum": r.quorum, "deadline_in_s": max(0.0, r.deadline - now),
            },
            "rounds": [
                {"round_id": x.round_id, "idx": x.idx, "status": x.status, "reason": x.reason or "",
                 "devices": len(x.participants or []), "metrics": {k: v for k, v in (x.metrics or {}).items()
                                                                  if isinstance(v, (int, float))}}
                for x in rounds
            ],
        }
