"""Federated evaluation in deployment: sampled devices score a released version on their own test
splits and report sums; the coordinator keeps only the totals (`pocketfed.protocol.fedeval`).

    open     after every deploy.eval_every-th committed round (`open_if_due`), for the new version v: a
             Poisson draw over the registered devices at q = min(1, deploy.eval_devices / |devices|)
             under its own fresh 32-byte key from `secrets` (`round.sample_cohort`, as a training
             round's cohort is drawn; a device registering later is drawn by the same rule when it
             checks in). An evaluation still open is closed first. A draw below the minimum (2 under
             secure aggregation: a secure sum of one device is that device's report; 1 otherwise)
             closes at once as "empty".
      -> a sampled, eligible device that checks in gets an evaluation task (before any training
         task): a `wire.TaskSpec` with `evaluate` set, id `secagg_id(eval_id)`
      -> it reports `fedeval.Sums`: in the clear (`report`, checked by `fedeval.check`), or under
         privacy.secagg as r / T through the five secure-aggregation stages
         (`pocketfed.server.secagg_stages`, the training rounds' code, on a 4-value vector)
      -> on every tick (`tick`): done when every sampled device reported, or at deploy.eval_deadline_s
         with at least the minimum; the totals, device count and time go into the store in one
         transaction (`Store.close_evaluation`); fewer reports, or a secure sum that cannot be
         unmasked, close it as "failed" with nothing released.

Secure-aggregation messages and uploads of an evaluation live in the store's round-keyed tables
under `secagg_id(eval_id)` = 2^40 + eval_id, a range no training round reaches, so both may run at
once and every signed secagg message names which one it belongs to (the id is in each signature).

The evaluation does not change the model or the training rounds' sampling, and it is not
accounted by the DP accountant: docs/PRIVACY.md says what its totals release.
"""

from __future__ import annotations

from pocketfed.privacy import secagg
from pocketfed.protocol import fedeval
from pocketfed.protocol import secagg_wire as sw
from pocketfed.server import round as engine
from pocketfed.server import operations, sampling
from pocketfed.server import secagg_stages as stages
from pocketfed.server.service import (DUPLICATE, INVALID_UPDATE, NOT_ASSIGNED, ROUND_CLOSED, UNKNOWN_ROUND, Assignment,
                                      Coordinator, Refused)
from pocketfed.server.store import Evaluation, Round, Version

EVAL_ID_BASE = 1 << 40  # secagg_id(e) = EVAL_ID_BASE + e: round-keyed tables hold evaluations here
SECURE_SHAPE = (4, fedeval.BOUND)  # the secure vector r / T: 4 values, L2 norm <= BOUND
STATUS_AS_ROUND = {"open": "open", "done": "committed", "failed": "failed", "empty": "empty"}


def secagg_id(eval_id: int) -> int:
    return EVAL_ID_BASE + eval_id


def eval_id_of(round_id: int) -> int | None:
    """The evaluation a task id names, or None for a training round's id."""
    return round_id - EVAL_ID_BASE if round_id >= EVAL_ID_BASE else None


def min_reports(c: Coordinator) -> int:
    return 2 if c.cfg.privacy.secagg else 1


def due(c: Coordinator, v: Version) -> bool:
    """Whether version v is to be evaluated: a committed round's (an empty round's version has the
    same adapter as its parent) at every deploy.eval_every-th training round."""
    k = c.cfg.deploy.eval_every
    if not (k > 0 and v.rounds_applied > 0 and v.rounds_applied % k == 0 and v.round_id is not None):
        return False
    r = c.store.round(v.round_id)
    return r is not None and r.status == "committed"


def open_if_due(c: Coordinator, now: float) -> Evaluation | None:
    """Open the latest version's evaluation if it is due and not opened yet. The lifecycle calls it
    right after a commit and on every tick (a coordinator killed between the two transactions
    opens it when it starts again)."""
    if not c.cfg.deploy.eval_every:
        return None
    v = c.store.latest_version()
    if v is None or not due(c, v) or c.store.evaluation_of(v.version) is not None:
        return None
    return open_evaluation(c, v, now)


def as_round(c: Coordinator, round_id: int) -> Round | None:
    """An evaluation seen as a round by the secure-aggregation stages and the upload checks: its
    id, deadline, the cohort size as the goal (advertising waits for every sampled device that took
    the task until the deadline), and 2 as the quorum. None if `round_id` names no evaluation."""
    eval_id = eval_id_of(round_id)
    e = c.store.evaluation(eval_id) if eval_id is not None else None
    if e is None:
        return None
    goal = max(len(c.store.eval_cohort(e.eval_id)), 1)  # the devices assigned are among these
    return Round(round_id, e.rounds_applied, e.version, STATUS_AS_ROUND[e.status], e.opened_at, e.deadline, goal,
                 e.target, min_reports(c), e.closed_at, e.reason, None, None, None, e.sample_rate, e.sample_key)


# ---- open ----------------------------------------------------------------------------------------
def open_evaluation(c: Coordinator, v: Version, now: float) -> Evaluation:
    """Draw the evaluation of version v (closing any still open: its version is older)."""
    if (old := c.store.open_evaluation()) is not None:
        close(c, old, now, f"version {v.version} was released before it finished")
    d = c.cfg.deploy
    key = sampling.fresh_key()
    cohort = engine.sample_cohort(c.store.device_ids(), d.eval_devices, key)
    secure = c.cfg.privacy.secagg
    with c.store.transaction():
        eval_id = c.store.add_evaluation(v.version, v.rounds_applied, now, now + d.eval_deadline_s,
                                         cohort.sample_rate, key.hex(), cohort.devices, secure)
        if secure:
            c.store.add_secagg_round(secagg_id(eval_id), now + d.eval_deadline_s)
    e = c.store.evaluation(eval_id)
    assert e is not None
    if e.target < min_reports(c):
        _close(c, e, "empty", now, f"the draw sampled {e.target} devices (q = {e.sample_rate:.4g}), below the "
                                   f"{min_reports(c)} an evaluation needs")
    return e


def sampled(c: Coordinator, e: Evaluation, device_id: str) -> bool:
    """Whether the evaluation's draw takes `device_id` (a device registered since the opening is
    drawn now by the same rule, U(key, device) < q, and joins the stored cohort)."""
    if c.store.in_eval_cohort(e.eval_id, device_id):
        return True
    if not sampling.poisson_sample([device_id], e.sample_rate, bytes.fromhex(e.sample_key)):
        return False
    c.store.add_to_eval_cohort(e.eval_id, device_id)
    return True


# ---- check-in and reports ------------------------------------------------------------------------
def checkin(c: Coordinator, device_id: str, now: float) -> Assignment | None:
    """An evaluation task for an eligible device that checks in, if the open evaluation sampled it
    and it has not reported yet (again after a crash); else None (it goes on to training)."""
    e = c.store.open_evaluation() if c.cfg.deploy.eval_every else None
    if e is None or now >= e.deadline:
        return None
    if not operations.is_signable(c, e.version):  # releases frozen below it: its adapter may not go out
        return None
    rid = secagg_id(e.eval_id)
    if c.store.has_eval_report(e.eval_id, device_id) or c.store.has_update(rid, device_id):
        return None
    if e.secure:
        s = c.store.secagg_round(rid)
        if s is None or s.stage != "advertise" or c.store.has_secagg_message(rid, device_id, sw.KEYS):
            return None  # past its key advertising: a device that crashed mid-protocol has dropped out
    if not c.store.is_assigned(rid, device_id):
        if not sampled(c, e, device_id):
            return None
        c.store.assign(rid, device_id, now)
    version = c.store.version(e.version)
    assert version is not None
    return Assignment(rid, e.rounds_applied, 0, e.deadline, version, evaluate=True)


def report(c: Coordinator, round_id: int, device_id: str, sums: fedeval.Sums, now: float) -> None:
    """Record one device's report in the clear (evaluations without secure aggregation)."""
    with c.lock:
        eval_id = eval_id_of(round_id)
        e = c.store.evaluation(eval_id) if eval_id is not None else None
        if e is None:
            raise Refused(UNKNOWN_ROUND, f"evaluation {round_id} does not exist")
        if e.status != "open" or now >= e.deadline:
            raise Refused(ROUND_CLOSED, f"evaluation {round_id} is closed ({e.status if e.status != 'open' else 'deadline'}); "
                                        "its reports are refused")
        if e.secure:
            raise Refused(INVALID_UPDATE, f"evaluation {round_id} runs under secure aggregation: its report is a "
                                          "masked input (the secagg stages), never sent in the clear")
        if not c.store.is_assigned(round_id, device_id):
            raise Refused(NOT_ASSIGNED, f"device {device_id} was not given evaluation {round_id}")
        if c.store.has_eval_report(e.eval_id, device_id):
            raise Refused(DUPLICATE, f"device {device_id} already reported for evaluation {round_id}")
        try:
            fedeval.check(sums, c.cfg.deploy.eval_max_tokens)
        except fedeval.InvalidReport as err:
            raise Refused(INVALID_UPDATE, f"evaluation report: {err}") from None
        with c.store.transaction():
            c.store.add_eval_report(e.eval_id, device_id, sums.as_dict(), now)
        tick(c, now)


# ---- close ---------------------------------------------------------------------------------------
def tick(c: Coordinator, now: float) -> None:
    """Close the open evaluation when every sampled device reported or its deadline passed
    (under secure aggregation: when its stages end)."""
    if not c.cfg.deploy.eval_every:  # off: no query on the request path (every request ticks)
        return
    with c.lock:
        open_if_due(c, now)
        e = c.store.open_evaluation()
        if e is None:
            return
        if not e.secure:
            if len(c.store.eval_reports(e.eval_id)) >= len(c.store.eval_cohort(e.eval_id)) or now >= e.deadline:
                close(c, e, now, "every sampled device reported" if now < e.deadline else "deadline")
            return
        r = as_round(c, secagg_id(e.eval_id))
        assert r is not None
        decision = stages.advance(c, r, now, shape=SECURE_SHAPE)
        if decision.action == "commit":
            close(c, e, now, decision.reason)
        elif decision.action != "wait":
            _close(c, e, "failed", now, decision.reason)


def close(c: Coordinator, e: Evaluation, now: float, reason: str) -> None:
    """Close `e` with the totals of what was reported (the secure sum once its stages are done),
    or as "failed" below the minimum or when the secure sum cannot be unmasked."""
    rid = secagg_id(e.eval_id)
    if e.secure:
        s = c.store.secagg_round(rid)
        if s is None or s.stage != "unmask" or s.survivors is None:
            return _close(c, e, "failed", now, f"{reason}: its secure aggregation had not reached unmasking "
                                               f"(stage {s.stage if s else None!r})")
        r = as_round(c, rid)
        assert r is not None
        try:
            total = fedeval.from_secure_total(stages.secure_sum(c, r), c.cfg.deploy.eval_max_tokens)
        except secagg.SecAggError as err:
            return _close(c, e, "failed", now, str(err))
        return _close(c, e, "done", now, reason, len(s.survivors), total)
    reports = c.store.eval_reports(e.eval_id)
    if len(reports) < min_reports(c):
        return _close(c, e, "failed", now, f"{reason} with {len(reports)} reports, below {min_reports(c)}")
    total = fedeval.ZERO
    for sums in reports.values():  # device-id order
        total = total + fedeval.Sums(**sums)
    _close(c, e, "done", now, reason, len(reports), total)


def _close(c: Coordinator, e: Evaluation, status: str, now: float, reason: str, devices: int = 0,
           total: fedeval.Sums | None = None) -> None:
    rid = secagg_id(e.eval_id)
    with c.store.transaction():
        c.store.close_evaluation(e.eval_id, status, now, reason, devices, total.as_dict() if total is not None else None)
        if e.secure:
            c.store.set_secagg_stage(rid, "done", now)
    from pocketfed.server.lifecycle import drop_uploads  # lifecycle ticks this module

    drop_uploads(c, rid)

