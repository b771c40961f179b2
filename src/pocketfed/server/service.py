"""The coordinator's state and set-up: the store, the run's config, the release key, the privacy
run in force, and the things every request reads (the round's privacy plan, signed manifests).

The round's logic is the round engine's (`pocketfed.server.round`); `pocketfed.server.lifecycle`
drives it from requests and ticks; `device_requests`, `secagg_stages`, `registry` and `status`
answer the HTTP layer (`pocketfed.server.coordinator` gathers their public functions).
A refusal raises `Refused(code, sentence)`; the HTTP layer maps the code to a status.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import load as st_load

from pocketfed import codec
from pocketfed.config import DPMode, RunConfig, load_config, to_dict
from pocketfed.errors import UserError
from pocketfed.privacy import pipeline, secagg
from pocketfed.privacy.budget import PrivacyRun, init_privacy
from pocketfed.privacy.pipeline import PrivacyPlan
from pocketfed.protocol import secagg_wire as sw
from pocketfed import signing
from pocketfed.server import checkpoint, config_change, strategies
from pocketfed.server.operations import Controls, Traffic, check_signable
from pocketfed.server import round as engine
from pocketfed.server.store import Store, Version

AdapterState = dict[str, torch.Tensor]
log = logging.getLogger("pocketfed.server")  # `pocketfed server` prints it on its console

# Refusal codes (the HTTP layer maps them to statuses).
UNKNOWN_ROUND, ROUND_CLOSED, NOT_ASSIGNED, DUPLICATE = "unknown_round", "round_closed", "not_assigned", "duplicate_upload"
OFFSET_MISMATCH, TOO_LARGE, TRUNCATED, HASH_MISMATCH = "offset_mismatch", "upload_too_large", "truncated_upload", "hash_mismatch"
INVALID_UPDATE, NAME_TAKEN, KEY_TAKEN = "invalid_update", "name_taken", "key_registered"
NOT_ENROLLED, ENROLLMENT_REFUSED = "enrollment_required", "enrollment_refused"
WRONG_STAGE, NOT_IN_COHORT, INVALID_SECAGG = "wrong_stage", "not_in_cohort", "invalid_secagg_message"
STAGE_OF = {sw.KEYS: "advertise", sw.SHARES: "share", sw.MASKED: "masked", sw.CONSISTENCY: "consistency",
            sw.UNMASK: "unmask"}


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
    privacy: PrivacyRun | None = None  # the accountant and clip state in force (the store's copy, kept in step)
    stop_cache: dict[int, str | None] = field(default_factory=dict)  # version -> why no round opens (or None)
    # (round_id, stage) -> the secagg routing every device of that stage reads (key directories or
    # share bundles): its inputs are frozen once the stage opens, so it is built once, not per poll
    secagg_routing: dict[tuple[int, str], Any] = field(default_factory=dict)
    controls: Controls = field(default_factory=Controls)  # the operator's (`server.operations`), the store's copy
    traffic: Traffic = field(default_factory=Traffic)  # device bytes counted since the last tick
    round_goal: int = 0  # the goal the round in force opened with (0: deploy.goal); its privacy plan's

    @property
    def dimension(self) -> int:
        return sum(v.numel() for v in self.like.values())

    @property
    def global_rank(self) -> int:
        """The global adapter's LoRA rank (the rows of its A matrices)."""
        return max((v.shape[0] for k, v in self.like.items() if "lora_A" in k), default=0)

    @property
    def plan(self) -> PrivacyPlan:
        """The open round's privacy plan (C and z move only at commits); the goal is the expected cohort."""
        return engine.round_plan(self.cfg, self.privacy, self.round_goal or self.cfg.deploy.goal)


@dataclass(frozen=True)
class Eligibility:
    charging: bool
    idle: bool
    unmetered: bool
    free_memory_mb: int
    profile: str = ""  # the device's memory profile name (watch, phone, car...), for the console


@dataclass(frozen=True)
class Assignment:
    round_id: int
    idx: int
    seed: int
    deadline: float
    version: Version
    evaluate: bool = False  # an evaluation task (`pocketfed.server.evaluations`), not a training one


@dataclass(frozen=True)
class Wait:
    retry_at: float
    reason: str
    done: bool = False


# ---- set-up ---------------------------------------------------------------------------------------
def _with_defaults(config_json: str) -> dict[str, Any] | None:
    """A stored config with the keys a newer pocketfed added at their defaults (None if it no longer
    parses), so that upgrading does not make an existing state folder look like another run's."""
    try:
        return to_dict(load_config(None, json.loads(config_json)))
    except (UserError, ValueError, TypeError, KeyError):
        return None


SERVING_KEYS = ("read_timeout_s", "request_timeout_s", "keep_alive_s", "max_connections")


def _run_identity(d: dict[str, Any] | None) -> dict[str, Any] | None:
    """A config without the deploy keys that only say how connections are served (timeouts, the
    connection cap): a restart may change them without making the state another run's."""
    if d is None:
        return None
    return {**d, "deploy": {k: v for k, v in d.get("deploy", {}).items() if k not in SERVING_KEYS}}


def _clean_uploads(store: Store) -> None:
    """The last process's leftovers (closed rounds' upload folders, unverified request bodies); the
    open round's and open evaluation's partial uploads stay, to resume."""
    from pocketfed.server.evaluations import secagg_id  # it imports this module

    r, e = store.open_round(), store.open_evaluation()
    store.clean_uploads([x for x in (r and r.round_id, e and secagg_id(e.eval_id)) if x is not None])


def open_coordinator(folder: Path, cfg: RunConfig, model_id: str,
                     init_params: Callable[[], AdapterState], now: float | None = None) -> Coordinator:
    """Open (or create) the state in `folder`. `init_params` is called only for a new state."""
    now = time.time() if now is None else now
    store = Store(folder)
    _clean_uploads(store)
    config_json = json.dumps(to_dict(cfg), sort_keys=True)
    stored = store.get_meta("config")
    changed: list[tuple[str, Any, Any]] = []
    if stored is not None and stored != config_json:
        before = _with_defaults(stored)
        if before is None:
            raise UserError(f"the config stored in {folder} no longer parses with this pocketfed; start a new run in "
                            "another --db folder")
        # safe keys (goal, quorum, deadlines...) may change on a restart; a fixed one raises, naming it
        changed = config_change.check_restart(_run_identity(before) or {}, _run_identity(to_dict(cfg)) or {}, Path(folder))
    key = signing.load_or_create_key(Path(folder))
    if store.latest_version() is None:
        state = strategies.init(init_params(), cfg.server)
        adapter_sha = store.put_blob(checkpoint.adapter_to_bytes(state.params))
        state_sha = store.put_blob(checkpoint.state_to_bytes(state))
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
    if stored is not None and stored != config_json:
        store.set_meta("config", config_json)  # the next restart compares with the config in force
        if changed:
            log.warning("config changed since the state in %s was last opened: %s", folder, config_change.describe(changed))
    raw = store.get_meta("privacy")
    privacy = PrivacyRun.from_json(json.loads(raw)) if raw else None
    open_r = store.open_round()  # a round open across a restart keeps the plan it handed out
    return Coordinator(store, cfg, key, model_id, like, limit, privacy=privacy, controls=Controls.load(store),
                       round_goal=open_r.goal if open_r is not None else 0)


# ---- privacy set-up and bookkeeping ---------------------------------------------------------------
def _init_privacy(cfg: RunConfig) -> PrivacyRun | None:
    """The accountant for a DP run. z is calibrated (for privacy.target_epsilon) at the planned
    rate ceil(goal * overselect) / deploy.population, or 1 with the population unknown (0): the
    devices register after the server starts. Each round is then accounted at the q its cohort was
    drawn at (`lifecycle.open_round`), and a device's rounds are bounded by the participation cap."""
    d = cfg.deploy
    rate = engine.planned_sample_rate(engine.cohort_target(d.goal, d.overselect), d.population)
    try:
        return init_privacy(cfg, rate, max_participations=engine.participation_bound(cfg))
    except ValueError as e:
        raise UserError(f"privacy settings cannot be accounted: {e}") from None


def _check_secagg_config(cfg: RunConfig, dim: int) -> None:
    p, n = cfg.privacy, cfg.deploy.goal
    if n < 2:
        raise UserError("privacy.secagg needs deploy.goal of at least 2 (the threshold t is at least 2)")
    plan = engine.round_plan(cfg, None, n)
    plan = replace(plan, noise_multiplier=p.noise_multiplier or 1.0,  # a bound for a calibrated z too
                   adaptive_clip=p.dp is not DPMode.none and p.adaptive_clip, count_noise_std=p.count_noise_std)
    try:
        secagg.SecAggConfig(0, n, pipeline.secure_length(plan, dim), secagg.default_threshold(n, p.secagg_degree),
                            pipeline.secure_bound(plan, dim), p.frac_bits)
    except ValueError as e:
        raise UserError(f"privacy.secagg with deploy.goal={n}, privacy.clip_norm={p.clip_norm}, "
                        f"privacy.frac_bits={p.frac_bits}: {e}") from None


# ---- releases -------------------------------------------------------------------------------------
def manifest_for(c: Coordinator, v: Version, now: float) -> tuple[dict[str, Any], str]:
    """The version's manifest, freshly signed with a new expiry (freeze protection). Under DP it
    carries the recipients' epsilon spent so far (an upper bound for an older version: epsilon only
    grows), signed, so a device's privacy lock reads it from nowhere else."""
    check_signable(c, v.version)  # nothing newer than a frozen release is signed
    eps = c.privacy.epsilons() if c.privacy is not None else {}
    m = signing.Manifest(
        version=v.version, parent_version=v.parent, sha256=v.adapter_sha, round=v.rounds_applied,
        strategy=c.cfg.server.strategy.value, base_model=c.model_id,
        issued_at=now, expires_at=now + c.cfg.deploy.manifest_ttl_s,
        epsilon=eps.get("epsilon_recipients"), delta=eps.get("delta") if eps.get("epsilon_recipients") is not None else None,
    )
    return m.to_json(), signing.sign(c.release_key, m)



