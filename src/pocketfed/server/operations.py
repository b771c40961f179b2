"""The operator's controls over a running coordinator, and the record of every change to them.

    pause / resume       paused: no new round opens (the open round, if any, runs to its end)
    cohort size          the goal of the rounds opened from now on (their Poisson target is
                         ceil(goal x deploy.overselect)), until a restart with another deploy.goal;
                         the open round keeps the goal it opened with, and its privacy plan (the
                         fixed DP denominator, the devices' noise share) is the one it handed out.
                         Each round is accounted at the q its cohort was drawn at, so a larger
                         cohort spends the budget faster, never silently
    freeze / unfreeze    releases frozen at the newest version v at the time: nothing newer than v
                         is signed or served (GET /v1/release/latest answers v; newer adapters are
                         not served). A round hands its base version to its devices, so no round
                         opens on a version newer than v: the round in flight may still commit,
                         then training holds until the operator unfreezes
    revoke a device      its signed requests are refused (403 device_revoked) from then on, and it
                         leaves the sampling frame; for good (a device that should come back
                         enrolls again under a new key with a fresh token)

Each action is one store transaction: the control's new value and a row in `operator_actions` with
the time and the credential's fingerprint (the first 16 hex digits of the token's sha256: it tells
which credential acted without being one). The controls are cached on the coordinator
(`Coordinator.controls`), which is the only writer, so every request reads them without SQL.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pocketfed.server.store import Store

if TYPE_CHECKING:  # service imports this module for `Controls`
    from pocketfed.server.service import Coordinator

PAUSE, RESUME, COHORT, FREEZE, UNFREEZE, REVOKE = "pause", "resume", "cohort_size", "freeze_releases", "unfreeze_releases", "revoke_device"
DEVICE_REVOKED, RELEASES_FROZEN = "device_revoked", "releases_frozen"
_META = "operator_controls"


@dataclass(frozen=True)
class Controls:
    paused: bool = False
    goal: int | None = None  # the next rounds' goal (None: deploy.goal)
    goal_base: int | None = None  # the deploy.goal it overrode: a restart with another goal drops it
    frozen_at: int | None = None  # releases frozen at this version (None: not frozen)
    revoked: frozenset[str] = field(default_factory=frozenset)

    @staticmethod
    def load(store: Store) -> "Controls":
        raw = json.loads(store.get_meta(_META) or "{}")
        return Controls(bool(raw.get("paused", False)), raw.get("goal"), raw.get("goal_base"), raw.get("frozen_at"),
                        frozenset(store.revoked()))

    def to_json(self) -> str:
        return json.dumps({"paused": self.paused, "goal": self.goal, "goal_base": self.goal_base,
                           "frozen_at": self.frozen_at})


class Traffic:
    """Bytes of device request and response bodies the HTTP layer counted, until the next flush
    (`flush_traffic`) writes them to the store: a counter in memory, so a request costs no SQL.
    A request under /v1/rounds/{id}/ counts for that round; any other (check-ins, adapter
    downloads, registrations) for the round that is newest when the counts are flushed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[int | None, list[int]] = {}

    def add(self, round_id: int | None, up: int, down: int) -> None:
        with self._lock:
            c = self._counts.setdefault(round_id, [0, 0])
            c[0] += up
            c[1] += down

    def take(self) -> dict[int | None, list[int]]:
        with self._lock:
            out, self._counts = self._counts, {}
        return out


class ActionRefused(ValueError):
    """An action the coordinator cannot take as asked (the sentence says why and what is valid)."""


def fingerprint(token: str) -> str:
    """What the action log records of a credential: sha256(token)[:16]."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def next_goal(c: Coordinator) -> int:
    """The goal of the next round: the operator's, unless the coordinator restarted since with
    another deploy.goal (the later decision wins)."""
    ctl = c.controls
    return ctl.goal if ctl.goal is not None and ctl.goal_base == c.cfg.deploy.goal else c.cfg.deploy.goal


def hold_reason(c: Coordinator) -> str | None:
    """Why no new round opens at the operator's word (None: nothing holds it)."""
    if c.controls.paused:
        return "rounds are paused by the operator; the next round opens when they resume"
    frozen = c.controls.frozen_at
    latest = c.store.latest_version()
    if frozen is not None and latest is not None and latest.version > frozen:
        return (f"releases are frozen at version {frozen} by the operator: no round opens on the unreleased "
                f"version {latest.version} until they unfreeze")
    return None


def is_revoked(c: Coordinator, device_id: str) -> bool:
    return device_id in c.controls.revoked


def released_version(c: Coordinator) -> Any:
    """The newest version the coordinator signs and serves: the latest, or the frozen one."""
    latest = c.store.latest_version()
    frozen = c.controls.frozen_at
    if frozen is None or latest is None or latest.version <= frozen:
        return latest
    return c.store.version(frozen)


def is_served(c: Coordinator, sha256: str) -> bool:
    """Whether the adapter with this hash is a release the coordinator serves now."""
    first = c.store.release_version_of(sha256)
    return first is not None and (c.controls.frozen_at is None or first <= c.controls.frozen_at)


def is_signable(c: Coordinator, version: int) -> bool:
    """Whether the coordinator may sign (and so hand to devices) this version now."""
    return c.controls.frozen_at is None or version <= c.controls.frozen_at


def check_signable(c: Coordinator, version: int) -> None:
    if not is_signable(c, version):
        from pocketfed.server.service import Refused

        raise Refused(RELEASES_FROZEN, f"releases are frozen at version {c.controls.frozen_at}; version {version} "
                                       "is neither signed nor served until the operator unfreezes them")


def act(c: Coordinator, action: str, value: Any, token: str, now: float) -> Controls:
    """Apply one operator action and record it (one transaction); ActionRefused names what is valid."""
    with c.lock:
        old = c.controls
        if action == PAUSE:
            new, shown = replace(old, paused=True), "paused"
        elif action == RESUME:
            new, shown = replace(old, paused=False), "resumed"
        elif action == COHORT:
            goal = _valid_goal(c, value)
            new, shown = replace(old, goal=goal, goal_base=c.cfg.deploy.goal), str(goal)
        elif action == FREEZE:
            latest = c.store.latest_version()
            assert latest is not None
            at = old.frozen_at if old.frozen_at is not None else latest.version
            new, shown = replace(old, frozen_at=at), f"at version {at}"
        elif action == UNFREEZE:
            new, shown = replace(old, frozen_at=None), "unfrozen"
        elif action == REVOKE:
            device = str(value)
            if c.store.device_key(device) is None:
                raise ActionRefused(f"no device is registered as {device!r}; revoke one of the registered devices")
            new, shown = replace(old, revoked=old.revoked | {device}), device
        else:
            raise ActionRefused(f"unknown operator action {action!r}; valid: {', '.join(ACTIONS)}")
        with c.store.transaction():
            if action == REVOKE:
                c.store.revoke(shown, now)
            else:
                c.store.set_meta(_META, new.to_json())
            c.store.add_action(now, action, shown, fingerprint(token))
        c.controls = new
        return new


ACTIONS = (PAUSE, RESUME, COHORT, FREEZE, UNFREEZE, REVOKE)


def _valid_goal(c: Coordinator, value: Any) -> int:
    """A cohort goal the round engine can run: an integer from deploy.quorum (a smaller goal would
    commit below the quorum) to 10,000, and one secure aggregation can be configured for."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ActionRefused(f"the cohort size must be a whole number, not {value!r}")
    low = c.cfg.deploy.quorum
    if not low <= value <= 10_000:
        raise ActionRefused(f"the cohort size must be between deploy.quorum ({low}) and 10000, not {value}")
    if c.cfg.privacy.secagg:
        from pocketfed.errors import UserError
        from pocketfed.server.service import _check_secagg_config

        try:
            _check_secagg_config(replace(c.cfg, deploy=replace(c.cfg.deploy, goal=value)), c.dimension)
        except UserError as e:
            raise ActionRefused(str(e)) from None
    return value


def flush_traffic(c: Coordinator) -> None:
    """Write the bytes the HTTP layer counted since the last flush to their rounds' rows (bytes of
    no particular round to the newest one: open, or the last closed while none is). Called on every
    lifecycle tick, so a round's figure is right to within one tick."""
    counts = c.traffic.take()
    if not counts:
        return
    newest = c.store.rounds(limit=1)
    for round_id, (up, down) in counts.items():
        if round_id is not None and c.store.round(round_id) is None:  # a path naming no round (refused)
            round_id = None
        target = round_id if round_id is not None else (newest[-1].round_id if newest else None)
        if target is None:  # before the first round: nothing to put it on, keep it for round 1
            c.traffic.add(None, up, down)
        elif up or down:
            c.store.add_traffic(target, up, down)
