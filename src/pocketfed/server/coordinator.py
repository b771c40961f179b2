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

Privacy, through the simulation's own functions (`pocketfed.server.aggregate`):
    central DP   devices clip (`dp.privatize_update`); the server clips again, sums, adds
                 N(0, (z C)^2 I) and divides by deploy.goal (the fixed expected cohort)
    accountant   `PrivacyRun` (accountant ledger + clip state) lives in the store's meta and is
                 stepped at every commit; epsilon goes into the round's metrics; no round opens
                 once the next one would overspend privacy.target_epsilon
    secagg       the round runs the four stages of Bonawitz et al. (CCS 2017) over HTTP, each with
                 a deadline (`_tick_secagg`): advertise keys (the training deadline), share keys,
                 masked input (the resumable upload), unmasking; the server calls the same
                 `pocketfed.privacy.secagg` steps `simulate_round` calls and sees only public keys,
                 ciphertexts, masked vectors and the shares the protocol reveals. Fewer than t
                 devices at any stage fails the round ("failed", model unchanged).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pocketfed import codec
from pocketfed.config import Codec, RunConfig, load_config, to_dict
from pocketfed.errors import UserError
from pocketfed.privacy import accountant, dp, secagg
from pocketfed.privacy.budget import PrivacyRun, init_privacy
from pocketfed.release import signing
from pocketfed.server import strategies
from pocketfed.server.aggregate import aggregate_round, device_noise_std, private_mean, secagg_bound
from pocketfed.server.sampling import device_seed
from pocketfed.server.store import Round, SecAggRound, Store, Update, Version, sha256_hex
from pocketfed.server.strategies import ServerState, WeightedUpdate
from pocketfed.protocol import secagg_wire as sw

AdapterState = dict[str, torch.Tensor]
CODEC_DTYPES = {Codec.float32: {"float32"}, Codec.float16: {"float16"}, Codec.int8: {"int8", "float32"}}

# Refusal codes (the HTTP layer maps them to statuses).
UNKNOWN_ROUND, ROUND_CLOSED, NOT_ASSIGNED, DUPLICATE = "unknown_round", "round_closed", "not_assigned", "duplicate_upload"
OFFSET_MISMATCH, TOO_LARGE, TRUNCATED, HASH_MISMATCH = "offset_mismatch", "upload_too_large", "truncated_upload", "hash_mismatch"
INVALID_UPDATE, NAME_TAKEN, KEY_TAKEN = "invalid_update", "name_taken", "key_registered"
NOT_ENROLLED, ENROLLMENT_REFUSED = "enrollment_required", "enrollment_refused"
WRONG_STAGE, NOT_IN_COHORT, INVALID_SECAGG = "wrong_stage", "not_in_cohort", "invalid_secagg_message"
STAGE_OF = {sw.KEYS: "advertise", sw.SHARES: "share", sw.MASKED: "masked", sw.UNMASK: "unmask"}


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
    _budget_spent: dict[int, bool] = field(default_factory=dict)  # rounds_done -> would the next overspend
    # (round_id, stage) -> the secagg routing every device of that stage reads (key directories or
    # share bundles): its inputs are frozen once the stage opens, so it is built once, not per poll
    _secagg_routing: dict[tuple[int, str], Any] = field(default_factory=dict)

    @property
    def dimension(self) -> int:
        return sum(v.numel() for v in self.like.values())


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
def _with_defaults(config_json: str) -> dict[str, Any] | None:
    """A stored config with the keys a newer pocketfed added at their defaults (None if it no longer
    parses), so that upgrading does not make an existing state folder look like another run's."""
    try:
        return to_dict(load_config(None, json.loads(config_json)))
    except (UserError, ValueError, TypeError, KeyError):
        return None


def open_coordinator(folder: Path, cfg: RunConfig, model_id: str,
                     init_params: Callable[[], AdapterState], now: float | None = None) -> Coordinator:
    """Open (or create) the state in `folder`. `init_params` is called only for a new state."""
    now = time.time() if now is None else now
    store = Store(folder)
    config_json = json.dumps(to_dict(cfg), sort_keys=True)
    stored = store.get_meta("config")
    if stored is not None and stored != config_json and _with_defaults(stored) != to_dict(cfg):
        raise UserError(f"the state in {folder} was started with another config; use the same config or a new --db folder")
    key = signing.load_or_create_key(Path(folder))
    if store.latest_version() is None:
        state = strategies.init(init_params(), cfg.server)
        adapter_sha = store.put_blob(adapter_bytes(state.params))
        state_sha = store.put_blob(state_bytes(state))
        privacy = _init_privacy(cfg)
        with store.transaction():
            store.add_version(Version(0, -1, None, 0, adapter_sha, state_sha, now))
            store.set_meta("config", config_json)
            store.set_meta("model_id", model_id)
            if privacy is not None:
                store.set_meta("privacy", json.dumps(privacy.to_json()))
    elif store.get_meta("model_id") != model_id:
        raise UserError(f"the state in {folder} was trained on model {store.get_meta('model_id')!r}, not {model_id!r}")
    latest = store.latest_version()
    assert latest is not None
    params = st_load(store.get_blob(latest.adapter_sha))
    like = {k: torch.zeros_like(v) for k, v in params.items()}
    expected = len(codec.encode(like, cfg.privacy.codec))
    if cfg.privacy.secagg:  # the masked input: D words of up to 8 bytes in safetensors
        expected = max(expected, 8 * sum(v.numel() for v in like.values()) + 1024)
        _check_secagg_config(cfg, sum(v.numel() for v in like.values()))
    limit = min(int(cfg.deploy.max_upload_mb * 2**20), expected + 64 * 1024)
    return Coordinator(store, cfg, key, model_id, like, limit)


# ---- privacy set-up and bookkeeping ---------------------------------------------------------------
def _init_privacy(cfg: RunConfig) -> PrivacyRun | None:
    """The accountant for a DP run. Each round is accounted as Poisson sampling at rate
    goal / deploy.population; with the population unknown (0), at rate 1 (no amplification)."""
    rate = min(1.0, cfg.deploy.goal / cfg.deploy.population) if cfg.deploy.population else 1.0
    try:
        return init_privacy(cfg, rate)
    except ValueError as e:
        raise UserError(f"privacy settings cannot be accounted: {e}") from None


def _check_secagg_config(cfg: RunConfig, dim: int) -> None:
    p, n = cfg.privacy, cfg.deploy.goal
    if n < 2:
        raise UserError("privacy.secagg needs deploy.goal of at least 2 (the threshold t is at least 2)")
    std = device_noise_std(p, p.clip_norm, p.noise_multiplier or 1.0, n)
    try:
        secagg.SecAggConfig(0, n, dim, secagg.default_threshold(n, p.secagg_degree), secagg_bound(p.clip_norm, std, dim),
                            p.frac_bits)
    except ValueError as e:
        raise UserError(f"privacy.secagg with deploy.goal={n}, privacy.clip_norm={p.clip_norm}, "
                        f"privacy.frac_bits={p.frac_bits}: {e}") from None


def privacy_run(c: Coordinator) -> PrivacyRun | None:
    raw = c.store.get_meta("privacy")
    return PrivacyRun.from_json(json.loads(raw)) if raw else None


def budget_spent(c: Coordinator) -> bool:
    """True once one more round would spend more than privacy.target_epsilon (as in simulate)."""
    run = privacy_run(c)
    if run is None:
        return False
    done = run.ledger.rounds_done
    if done not in c._budget_spent:
        c._budget_spent[done] = accountant.budget_exhausted(accountant.step(run.ledger))
    return c._budget_spent[done]


def task_privacy(c: Coordinator) -> dict[str, Any]:
    """What a device needs for steps 1-2: the clip norm C (adaptive), its noise std, and the mode."""
    run, p = privacy_run(c), c.cfg.privacy
    clip = run.clip.clip_norm if run else p.clip_norm
    z = run.ledger.noise_multiplier if run else 0.0
    return {"dp": p.dp.value, "clip_norm": clip, "noise_std": device_noise_std(p, clip, z, c.cfg.deploy.goal),
            "secagg": p.secagg}


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
    return stop_reason(c) is not None


def stop_reason(c: Coordinator) -> str | None:
    latest = c.store.latest_version()
    if latest is not None and latest.rounds_applied >= c.cfg.sim.rounds:
        return f"training is finished ({c.cfg.sim.rounds} rounds)"
    if budget_spent(c):
        run = privacy_run(c)
        assert run is not None
        return (f"the privacy budget is spent: epsilon {run.ledger.epsilon_spent:.3f} after {run.ledger.rounds_done} rounds; "
                f"one more round would pass privacy.target_epsilon={run.ledger.epsilon_budget:g} at delta={run.ledger.delta:g}")
    return None


def tick(c: Coordinator, now: float) -> None:
    """Advance the lifecycle: close a round whose goal or deadline is reached; open the next."""
    with c.lock:
        r = c.store.open_round()
        if r is not None:
            closed = _tick_secagg(c, r, now) if c.cfg.privacy.secagg else _tick_plain(c, r, now)
            if not closed:
                return
        if not is_done(c):
            latest = c.store.latest_version()
            assert latest is not None
            d = c.cfg.deploy
            with c.store.transaction():
                round_id = c.store.add_round(latest.rounds_applied, latest.version, now, now + d.deadline_s,
                                             d.goal, math.ceil(d.goal * d.overselect - 1e-9), d.quorum)
                if c.cfg.privacy.secagg:
                    c.store.add_secagg_round(round_id, now + d.deadline_s)


def _tick_plain(c: Coordinator, r: Round, now: float) -> bool:
    """Commit at the goal, or at the deadline with a quorum; abort below it. -> the round closed."""
    n = c.store.count_updates(r.round_id)
    if n >= r.goal:
        commit_round(c, r, now, "goal reached")
    elif now >= r.deadline:
        if n >= r.quorum:
            commit_round(c, r, now, f"deadline with {n} updates (quorum {r.quorum})")
        else:
            abort_round(c, r, now, f"deadline with {n} updates, below quorum {r.quorum}")
    else:
        return False
    return True


def round_mean(c: Coordinator, r: Round, ups: list[Update], run: PrivacyRun | None) -> tuple[AdapterState, int]:
    """Delta for the round and the bytes each device sent: the plain token-weighted mean, or the
    private pipeline's server half (`private_mean`) over the plain or the secure sum.
    Raises SecAggError (nothing is released) when the secure sum cannot be unmasked."""
    p = c.cfg.privacy
    clip = run.clip.clip_norm if run else p.clip_norm
    z = run.ledger.noise_multiplier if run else 0.0
    denominator = c.cfg.deploy.goal if run else len(ups)
    if p.secagg:
        total = _secure_sum(c, r)
        return private_mean(total, p, clip, z, denominator, c.like), max(u.size for u in ups)
    decoded = [codec.decode(c.store.get_blob(u.blob_sha), c.like) for u in ups]
    if run is None:
        agg = aggregate_round([WeightedUpdate(d, u.num_tokens) for d, u in zip(decoded, ups)], p,
                              clip_norm=p.clip_norm, noise_multiplier=0.0, expected_devices=len(ups), round_id=r.idx)
        return agg.mean, agg.bytes_up_per_device
    # central DP: the devices clipped; the server clips again, so the sensitivity holds whatever a device sent
    total = np.sum([dp.privatize_update(d, clip, 0.0)[0] for d in decoded], axis=0)
    return private_mean(total, p, clip, z, denominator, c.like), max(u.size for u in ups)


def commit_round(c: Coordinator, r: Round, now: float, reason: str) -> Version:
    t0 = time.perf_counter()
    base = c.store.version(r.base_version)
    assert base is not None
    state = state_from_bytes(c.store.get_blob(base.state_sha), base.rounds_applied)
    ups = c.store.updates(r.round_id)  # device-id order, as the simulation's sorted cohort
    run = privacy_run(c)
    mean, bytes_up = round_mean(c, r, ups, run)
    new_state, diag = strategies.apply_mean(state, mean, c.cfg.server)
    adapter_sha = c.store.put_blob(adapter_bytes(new_state.params))  # blobs before the commit row
    state_sha = c.store.put_blob(state_bytes(new_state))
    tokens = sum(u.num_tokens for u in ups)
    losses = [u.metrics.get("train_loss") for u in ups]
    metrics = {
        "devices": len(ups), "tokens": tokens, "bytes_up_per_device": bytes_up, **diag,
        "train_loss": (sum(l * u.num_tokens for l, u in zip(losses, ups) if l is not None) / tokens
                       if tokens and all(l is not None for l in losses) else None),
    }
    if run is not None:  # the accountant steps with the commit, in the same transaction
        unclipped = sum(1 for u in ups if u.metrics.get("unclipped", 0.0) >= 0.5)
        metrics.update({"clip_norm": run.clip.clip_norm, "unclipped": unclipped})
        run = run.after_round(unclipped, len(ups), c.cfg.privacy.adaptive_clip)
        metrics.update({"epsilon": run.ledger.epsilon_spent, "delta": run.ledger.delta})
    metrics["commit_seconds"] = time.perf_counter() - t0  # decode + aggregate + apply + write blobs
    v = Version(base.version + 1, base.version, r.round_id, new_state.round, adapter_sha, state_sha, now)
    with c.store.transaction():
        c.store.add_version(v)
        c.store.close_round(r.round_id, "committed", now, reason, [u.device_id for u in ups], metrics, v.version)
        if run is not None:
            c.store.set_meta("privacy", json.dumps(run.to_json()))
        if c.cfg.privacy.secagg:
            c.store.set_secagg_stage(r.round_id, "done", now)
    _drop_uploads(c, r.round_id)
    return v


def abort_round(c: Coordinator, r: Round, now: float, reason: str, status: str = "aborted") -> None:
    """Close the round without a new version ("aborted" below quorum, "failed" when secagg fails)."""
    with c.store.transaction():
        c.store.close_round(r.round_id, status, now, reason)
        if c.cfg.privacy.secagg:
            c.store.set_secagg_stage(r.round_id, "done", now)
    _drop_uploads(c, r.round_id)


# ---- secure aggregation: the four stages (Bonawitz et al., CCS 2017, Fig. 4) ---------------------
def _sa_config(s: SecAggRound) -> secagg.SecAggConfig:
    assert s.params is not None
    return secagg.SecAggConfig(**s.params)


def _sa_graph(c: Coordinator, s: SecAggRound) -> dict[int, frozenset[int]]:
    assert s.cohort is not None and s.graph_seed is not None
    return secagg.neighbour_graph(range(len(s.cohort)), c.cfg.privacy.secagg_degree or None, bytes.fromhex(s.graph_seed))


def _sa_index(s: SecAggRound) -> dict[str, int]:
    return {name: i for i, name in enumerate(s.cohort or [])}


def _sa_adverts(c: Coordinator, s: SecAggRound) -> list[secagg.AdvertiseKeys]:
    keys = c.store.secagg_messages(s.round_id, sw.KEYS)
    return [secagg.AdvertiseKeys(s.round_id, i, *sw.parse_keys(keys[name])) for name, i in _sa_index(s).items()]


def _sa_shares(c: Coordinator, s: SecAggRound) -> list[secagg.ShareKeys]:
    index, graph = _sa_index(s), _sa_graph(c, s)
    return [sw.parse_shares(body, s.round_id, index[name], graph[index[name]] | {index[name]})
            for name, body in c.store.secagg_messages(s.round_id, sw.SHARES).items()]


def _sa_masked(c: Coordinator, s: SecAggRound) -> list[secagg.MaskedInput]:
    index, config = _sa_index(s), _sa_config(s)
    return [sw.parse_masked(c.store.get_blob(u.blob_sha), config, index[u.device_id]) for u in c.store.updates(s.round_id)]


def _secure_sum(c: Coordinator, r: Round) -> np.ndarray:
    """Step 3 (server): sum_{u in U3} x_u from the masked inputs and the revealed shares."""
    s = c.store.secagg_round(r.round_id)
    assert s is not None and s.survivors is not None and s.dropped is not None
    config, index, graph = _sa_config(s), _sa_index(s), _sa_graph(c, s)
    survivors, dropped = frozenset(s.survivors), frozenset(s.dropped)
    responses = []
    for name, body in c.store.secagg_messages(r.round_id, sw.UNMASK).items():
        u = index[name]
        responses.append(sw.parse_unmask(body, r.round_id, u, survivors & (graph[u] | {u}), dropped & graph[u]))
    request = secagg.UnmaskRequest(r.round_id, survivors, dropped)
    return secagg.aggregate(config, _sa_adverts(c, s), graph, _sa_masked(c, s), request, responses)


def _start_sharing(c: Coordinator, r: Round, now: float) -> str | None:
    """End of step 0: fix the cohort U1 (advertisers, indexed by name order), k, t and N(u).
    -> None, or why the round cannot go on."""
    p = c.cfg.privacy
    keys = c.store.secagg_messages(r.round_id, sw.KEYS)
    cohort = sorted(keys)
    n, dim, tp = len(cohort), c.dimension, task_privacy(c)
    config = secagg.SecAggConfig(r.round_id, n, dim, secagg.default_threshold(n, p.secagg_degree),
                                 secagg_bound(tp["clip_norm"], tp["noise_std"], dim), p.frac_bits)
    seed = os.urandom(32)  # public randomness for the SecAgg+ graph, drawn after the cohort is fixed
    graph = secagg.neighbour_graph(range(n), p.secagg_degree or None, seed)
    try:
        adverts = [secagg.AdvertiseKeys(r.round_id, i, *sw.parse_keys(keys[name])) for i, name in enumerate(cohort)]
        secagg.key_directories(config, adverts, graph)
    except secagg.SecAggError as e:
        return str(e)
    c.store.set_secagg_stage(r.round_id, "share", now + c.cfg.deploy.secagg_stage_s,
                             params=dataclasses.asdict(config), cohort=cohort, graph_seed=seed.hex())
    return None


def _tick_secagg(c: Coordinator, r: Round, now: float) -> bool:
    """Advance a secure-aggregation round by one stage when every device of the stage answered or
    its deadline passed. A stage short of t devices fails the round. -> the round closed."""
    s = c.store.secagg_round(r.round_id)
    assert s is not None
    if s.stage == "advertise":
        n = len(c.store.secagg_messages(r.round_id, sw.KEYS))
        if n < r.goal and now < r.deadline:
            return False
        if n < max(r.quorum, 2):
            abort_round(c, r, now, f"deadline with {n} devices advertising keys, below quorum {max(r.quorum, 2)}")
            return True
        problem = _start_sharing(c, r, now)
        if problem:
            abort_round(c, r, now, problem, "failed")
            return True
        return False
    config = _sa_config(s)
    t, n = config.threshold, config.cohort_size
    if s.stage == "share":
        shared = c.store.secagg_messages(r.round_id, sw.SHARES)
        if len(shared) < n and now < s.stage_deadline:
            return False
        if len(shared) < t:
            abort_round(c, r, now, f"only {len(shared)} of {n} devices shared keys; threshold is {t}", "failed")
            return True
        c.store.set_secagg_stage(r.round_id, "masked", now + c.cfg.deploy.secagg_stage_s)
        return False
    if s.stage == "masked":
        shared = {_sa_index(s)[name] for name in c.store.secagg_messages(r.round_id, sw.SHARES)}
        masked = _sa_masked(c, s)
        if len(masked) < len(shared) and now < s.stage_deadline:
            return False
        try:
            request = secagg.unmask_request(config, masked, shared)
        except secagg.SecAggError as e:
            abort_round(c, r, now, str(e), "failed")
            return True
        c.store.set_secagg_stage(r.round_id, "unmask", now + c.cfg.deploy.secagg_stage_s,
                                 survivors=sorted(request.survivors), dropped=sorted(request.dropped))
        return False
    assert s.stage == "unmask" and s.survivors is not None
    answered = len(c.store.secagg_messages(r.round_id, sw.UNMASK))
    if answered < len(s.survivors) and now < s.stage_deadline:
        return False
    try:
        commit_round(c, r, now, f"secure sum of {len(s.survivors)} masked inputs, {answered} devices unmasked")
    except secagg.SecAggError as e:
        abort_round(c, r, now, str(e), "failed")
    return True


def _check_secagg_step(c: Coordinator, round_id: int, device_id: str, kind: str, now: float) -> tuple[Round, SecAggRound]:
    """The round is open, in `kind`'s stage, before its deadline; the device is in it, once."""
    r = c.store.round(round_id)
    if r is None:
        raise Refused(UNKNOWN_ROUND, f"round {round_id} does not exist")
    if not c.cfg.privacy.secagg:
        raise Refused(WRONG_STAGE, "this run does not use secure aggregation (privacy.secagg is false)")
    if r.status != "open":
        raise Refused(ROUND_CLOSED, f"round {round_id} is closed ({r.status}); its messages are refused")
    if not c.store.is_assigned(round_id, device_id):
        raise Refused(NOT_ASSIGNED, f"device {device_id} was not assigned to round {round_id}")
    s = c.store.secagg_round(round_id)
    assert s is not None
    want = STAGE_OF[kind]
    if s.stage != want:
        raise Refused(WRONG_STAGE, f"round {round_id} is in stage {s.stage!r}; a {kind} message belongs to stage {want!r}")
    if now >= (r.deadline if want == "advertise" else s.stage_deadline):
        raise Refused(WRONG_STAGE, f"round {round_id}'s {want!r} stage passed its deadline")
    if want != "advertise" and device_id not in _sa_index(s):
        raise Refused(NOT_IN_COHORT, f"device {device_id} did not advertise keys in time for round {round_id}")
    done = c.store.has_update(round_id, device_id) if kind == sw.MASKED else c.store.has_secagg_message(round_id, device_id, kind)
    if done:
        raise Refused(DUPLICATE, f"device {device_id} already sent its {kind} message for round {round_id}")
    return r, s


def secagg_message(c: Coordinator, round_id: int, device_id: str, kind: str, body: bytes, now: float) -> None:
    """Record one device's step-0, step-1 or step-3 message after checking it against the round."""
    with c.lock:
        tick(c, now)
        r, s = _check_secagg_step(c, round_id, device_id, kind, now)
        try:
            if kind == sw.KEYS:
                sw.parse_keys(body)
            elif kind == sw.SHARES:
                u, graph = _sa_index(s)[device_id], _sa_graph(c, s)
                sw.parse_shares(body, round_id, u, graph[u] | {u})
            elif kind == sw.UNMASK:
                u, graph = _sa_index(s)[device_id], _sa_graph(c, s)
                if s.survivors is None or u not in s.survivors:
                    raise Refused(NOT_IN_COHORT, f"device {device_id} sent no masked input in round {round_id}; "
                                                 f"only survivors answer the unmasking")
                sw.parse_unmask(body, round_id, u, set(s.survivors) & (graph[u] | {u}), set(s.dropped or ()) & graph[u])
            else:
                raise Refused(WRONG_STAGE, f"{kind!r} is not a secure-aggregation message sent this way")
        except sw.MalformedMessage as e:
            raise Refused(INVALID_SECAGG, f"{kind} message for round {round_id}: {e}") from None
        with c.store.transaction():
            c.store.add_secagg_message(round_id, device_id, kind, body)
        tick(c, now)


def secagg_view(c: Coordinator, round_id: int, device_id: str, now: float) -> dict[str, Any]:
    """What the server tells device `device_id` about the round's current stage (wire.SecAggState)."""
    with c.lock:
        tick(c, now)
        r = c.store.round(round_id)
        if r is None:
            raise Refused(UNKNOWN_ROUND, f"round {round_id} does not exist")
        if not c.store.is_assigned(round_id, device_id):
            raise Refused(NOT_ASSIGNED, f"device {device_id} was not assigned to round {round_id}")
        s = c.store.secagg_round(round_id)
        if s is None:
            raise Refused(WRONG_STAGE, f"round {round_id} does not use secure aggregation")
        if r.status != "open":
            return {"round_id": round_id, "stage": r.status, "reason": r.reason or "", "deadline": r.closed_at or now}
        out: dict[str, Any] = {"round_id": round_id, "stage": s.stage, "reason": "",
                               "deadline": r.deadline if s.stage == "advertise" else s.stage_deadline}
        u = _sa_index(s).get(device_id)
        if s.stage == "advertise" or u is None:
            return out
        out.update(index=u, params=s.params)
        if s.stage == "share":  # step 0 -> 1: N(u)'s public keys (`key_directories`)
            directory = _sa_routing(c, s)[u]
            out["neighbours"] = {v: {"enc_public": k[0].hex(), "mask_public": k[1].hex()} for v, k in directory.neighbours.items()}
        elif s.stage == "masked":  # step 1 -> 2: the ciphertexts addressed to u (`route_shares`)
            bundles = _sa_routing(c, s)
            out["shares"] = [{"sender": e.sender, "nonce": e.nonce.hex(), "ciphertext": e.ciphertext.hex()}
                             for e in (bundles[u].shares if u in bundles else ())]
        elif s.stage == "unmask":  # step 2 -> 3: U3 and D (`unmask_request`)
            out.update(survivors=s.survivors, dropped=s.dropped)
        return out


def _sa_routing(c: Coordinator, s: SecAggRound) -> Any:
    """Every device's key directory (stage "share") or share bundle (stage "masked"), built once per
    stage: the adverts and shares are frozen when the stage opens. Without this, each device's poll
    rebuilt all n devices' routing, O(n^2) work per stage."""
    key = (s.round_id, s.stage)
    if key not in c._secagg_routing:
        if s.stage == "share":
            routing = secagg.key_directories(_sa_config(s), _sa_adverts(c, s), _sa_graph(c, s))
        else:
            routing = secagg.route_shares(_sa_config(s), _sa_shares(c, s))
        c._secagg_routing.clear()  # one stage at a time is asked for; the old ones never again
        c._secagg_routing[key] = routing
    return c._secagg_routing[key]


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
        stop = stop_reason(c)
        if stop is not None:
            return Wait(later, stop, done=True)
        problem = eligibility_problem(e, c)
        if problem:
            return Wait(later, problem)
        r = c.store.open_round()
        assert r is not None
        if c.store.has_update(r.round_id, device_id):
            return Wait(later, f"this device's update for round {r.round_id} is in; wait for the next round")
        s = c.store.secagg_round(r.round_id)
        if s is not None and (s.stage != "advertise" or c.store.has_secagg_message(r.round_id, device_id, sw.KEYS)):
            return Wait(later, f"round {r.round_id} is past this device's key advertising (stage {s.stage!r}); "
                               f"wait for the next round")
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
    if c.cfg.privacy.secagg:  # the upload is step 2's masked input
        _check_secagg_step(c, round_id, device_id, sw.MASKED, now)
        if not c.store.has_secagg_message(round_id, device_id, sw.SHARES):
            raise Refused(NOT_IN_COHORT, f"device {device_id} shared no keys in round {round_id}; its masked input cannot be unmasked")
        return r
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


def _check_payload(c: Coordinator, data: bytes, round_id: int, device_id: str) -> None:
    if c.cfg.privacy.secagg:  # y_u: D words below 2^k, nothing else
        with c.lock:
            s = c.store.secagg_round(round_id)
        assert s is not None
        try:
            sw.parse_masked(data, _sa_config(s), _sa_index(s)[device_id])
        except sw.MalformedMessage as e:
            raise Refused(INVALID_UPDATE, f"masked input: {e}") from None
        return
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
    _check_payload(c, data, round_id, device_id)
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
def register(c: Coordinator, name: str, public_key: str, now: float, token: str | None = None) -> str:
    """Register a device under `name` with its Ed25519 key (idempotent for the same pair). Unless
    deploy.open_registration, a new pair spends a one-time enrollment token (`enroll`)."""
    with c.lock:
        owner = c.store.device_key(name)
        known = c.store.device_by_key(public_key)
        if owner == public_key:
            return name
        if owner is not None:
            raise Refused(NAME_TAKEN, f"device name {name!r} is registered with another key; choose another --name")
        if known is not None:
            raise Refused(KEY_TAKEN, f"this key is already registered as device {known!r}")
        with c.store.transaction():
            if not c.cfg.deploy.open_registration:
                if not token:
                    raise Refused(NOT_ENROLLED, "this coordinator registers enrolled devices only: run "
                                  "`pocketfed enroll` on the server and give the device its token (--enroll-token)")
                if not c.store.spend_enrollment(sha256_hex(token.encode()), name, now):
                    raise Refused(ENROLLMENT_REFUSED, "the enrollment token is unknown, expired or already used; "
                                  "ask the server's operator for a new one (`pocketfed enroll`)")
            c.store.add_device(name, public_key, now)
        return name


ENROLL_TTL_S = 7 * 86400.0


def enroll(store: Store, count: int = 1, ttl_s: float = ENROLL_TTL_S, now: float | None = None) -> list[str]:
    """`count` new one-time enrollment tokens, valid for `ttl_s` seconds. Only their sha256 is stored,
    so the state folder does not hold a usable token; a token is 32 random bytes (secrets)."""
    if count < 1 or count > 10_000:
        raise UserError(f"--count must be between 1 and 10000, not {count}")
    if not ttl_s > 0:
        raise UserError(f"--ttl-hours must be positive, not {ttl_s / 3600:g}")
    now = time.time() if now is None else now
    tokens = [secrets.token_urlsafe(32) for _ in range(count)]
    with store.transaction():
        for token in tokens:
            store.add_enrollment(sha256_hex(token.encode()), now, now + ttl_s)
    return tokens


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
            "stopped": stop_reason(c) or "",
            "privacy": _privacy_status(c),
            "open_round": None if r is None else {
                "round_id": r.round_id, "idx": r.idx, "assigned": len(c.store.assigned(r.round_id)),
                "updates": c.store.count_updates(r.round_id), "goal": r.goal, "target": r.target,
                "quorum": r.quorum, "deadline_in_s": max(0.0, r.deadline - now),
                "stage": (s.stage if (s := c.store.secagg_round(r.round_id)) else ""),
            },
            "rounds": [
                {"round_id": x.round_id, "idx": x.idx, "status": x.status, "reason": x.reason or "",
                 "devices": len(x.participants or []), "metrics": {k: v for k, v in (x.metrics or {}).items()
                                                                  if isinstance(v, (int, float))}}
                for x in rounds
            ],
        }


def _privacy_status(c: Coordinator) -> dict[str, Any] | None:
    run = privacy_run(c)
    if run is None:
        return None if not c.cfg.privacy.secagg else {"dp": "none", "secagg": True}
    return {**run.summary(), "dp": c.cfg.privacy.dp.value, "secagg": c.cfg.privacy.secagg,
            "target_epsilon": c.cfg.privacy.target_epsilon}
