"""The coordinator's driver of the round engine: each transition in one store transaction.

    open round r (from the last committed version v; idx = rounds applied so far), once at least
    `round.min_cohort` devices are registered: draw its cohort S by Poisson sampling
    (`round.sample_cohort`, a fresh 32-byte key from `secrets`) over the frame (registered devices
    below deploy.max_participations in the window) at q = min(1, ceil(goal * overselect) / |frame|);
    store r with q, the key and S in one transaction
      -> |S| below the quorum (2 at least under secure aggregation), the empty cohort included: the
         round cannot commit and closes at once as "empty": version v+1 with the same adapter,
         the round counts as run, the accountant steps at q (`round.empty_round`)
      -> devices check in (any order, any time before the deadline): a device outside S waits for a
         later round; a device of S that is eligible is assigned its task; one that is not sits
         the round out unless it checks in again eligible (both only lower its rate below q). A
         device that registered after the draw is drawn when it first checks in, by the same rule
         (U(key, device) < q, `sampled`), so it need not wait for the next round to have its chance
      -> each assigned device uploads one update (or, under secure aggregation, runs the stages)
      -> on every tick the engine decides (`round.decide`, `secagg_stages.advance`): commit at
         deploy.goal updates, or at the deadline with the quorum (a cohort smaller than the goal
         commits at the deadline: devices registering meanwhile may still be drawn into it):
             commit: collect the uploads in device-id order -> `round.aggregate` -> `round.commit`
                     at the round's q; blobs first (adapter, state), then one transaction:
                     version v+1, round committed, the accountant's new state
             abort / fail: the round closes without a version; the next draws anew from v
      -> no round opens once `round.stop_reason` gives one (rounds done, privacy budget spent).

Every state change happens under `Coordinator.lock`; time is passed in.
"""

from __future__ import annotations

import json
import logging
import time

from pocketfed.privacy import secagg
from pocketfed.server import checkpoint, evaluations, operations, sampling
from pocketfed.server import round as engine
from pocketfed.server import secagg_stages as stages
from pocketfed.server.service import Coordinator
from pocketfed.server.store import Round, Version

log = logging.getLogger("pocketfed.server")


def stop_reason(c: Coordinator) -> str | None:
    """Why no round opens any more (cached per committed version: the accountant step is not free)."""
    latest = c.store.latest_version()
    assert latest is not None
    if latest.version not in c.stop_cache:
        c.stop_cache.clear()
        c.stop_cache[latest.version] = engine.stop_reason(latest.rounds_applied, c.cfg, c.privacy)
    return c.stop_cache[latest.version]


def is_done(c: Coordinator) -> bool:
    return stop_reason(c) is not None


def tick(c: Coordinator, now: float) -> None:
    """Advance the lifecycle: close a round the engine decides on; open the next, drawing its
    cohort, and close it at once if that cohort is too small to commit."""
    with c.lock:
        operations.flush_traffic(c)  # the bytes devices sent and got since the last tick
        evaluations.tick(c, now)  # federated evaluation runs beside the training rounds
        r = c.store.open_round()
        if r is not None and _too_small(c, r):  # opened, then the process stopped before closing it
            close_empty_round(c, r, now)
        elif r is not None:
            if c.cfg.privacy.secagg:
                decision = stages.advance(c, r, now)
                if (s := c.store.secagg_round(r.round_id)) is not None:  # when each stage began, for the console
                    c.store.mark_stage(r.round_id, s.stage, now)
            else:
                decision = engine.decide(c.store.count_updates(r.round_id), r.goal, r.quorum, r.deadline, now)
            if decision.action == "wait":
                return
            if decision.action == "commit":
                try:
                    commit_round(c, r, now, decision.reason)
                except (secagg.SecAggError, engine.RoundFailed) as e:  # no sum, or a non-finite result: nothing released
                    abort_round(c, r, now, str(e), "failed")
            else:
                abort_round(c, r, now, decision.reason, "failed" if decision.action == "fail" else "aborted")
        # open the next round; one whose cohort is too small closes at once and the next is drawn
        # (each such round is a version, so this ends by sim.rounds or the budget at the latest)
        while not is_done(c) and (r := open_round(c, now)) is not None and _too_small(c, r):
            close_empty_round(c, r, now)


def _min_cohort(c: Coordinator) -> int:
    return engine.min_cohort(c.cfg.deploy.quorum, c.cfg.privacy.secagg)


def _too_small(c: Coordinator, r: Round) -> bool:
    return r.sample_rate is not None and r.target < _min_cohort(c)


def _frame(c: Coordinator, devices: list[str], idx: int) -> list[str]:
    """`devices` less those at deploy.max_participations in training round idx's window."""
    d = c.cfg.deploy
    history = c.store.participants_since(sampling.cap_window(idx, d.participation_window).start) if d.max_participations else {}
    return engine.sampling_frame(devices, history, idx, d.max_participations, d.participation_window)


def open_round(c: Coordinator, now: float) -> Round | None:
    """Open the next round with its Poisson-sampled cohort; None while fewer devices are registered
    than a round needs (their rounds could only close empty), or while the operator holds rounds
    (`operations.hold_reason`: paused, or releases frozen below the latest version). A revoked
    device is outside the frame; the goal is the operator's for the next rounds (`next_goal`)."""
    d = c.cfg.deploy
    if operations.hold_reason(c) is not None:
        return None
    registered = [x for x in c.store.device_ids() if not operations.is_revoked(c, x)]
    if len(registered) < _min_cohort(c):
        return None
    latest = c.store.latest_version()
    assert latest is not None
    idx = latest.rounds_applied
    frame = _frame(c, registered, idx)
    key = sampling.fresh_key()
    goal = operations.next_goal(c)
    cohort = engine.sample_cohort(frame, engine.cohort_target(goal, d.overselect), key)
    with c.store.transaction():
        round_id = c.store.add_round(idx, latest.version, now, now + d.deadline_s, goal, d.quorum,
                                     cohort.sample_rate, key.hex(), cohort.devices)
        c.store.mark_stage(round_id, "open", now)
        if c.cfg.privacy.secagg:
            c.store.add_secagg_round(round_id, now + d.deadline_s)
            c.store.mark_stage(round_id, "advertise", now)
    c.round_goal = goal  # the round's privacy plan uses the goal it opened with
    return c.store.round(round_id)


def sampled(c: Coordinator, r: Round, device_id: str) -> bool:
    """Whether round r's draw takes `device_id`: it is in the cohort drawn at the round's opening,
    or it registered since and U(key, device) < q with its participations below the cap (a device
    that was registered at the opening gets the answer it got then: the key, q and the earlier
    rounds' participants are the same). A late device that is drawn joins the stored cohort."""
    if c.store.in_cohort(r.round_id, device_id):
        return True
    if r.sample_key is None or r.sample_rate is None:  # a round from before Poisson sampling
        return False
    frame = _frame(c, [device_id], r.idx)
    if not sampling.poisson_sample(frame, r.sample_rate, bytes.fromhex(r.sample_key)):
        return False
    c.store.add_to_cohort(r.round_id, device_id)
    return True


def close_empty_round(c: Coordinator, r: Round, now: float) -> Version:
    """Close a round whose sampled cohort is too small to commit: a new version with the same
    adapter (the round counts as run) and the accountant stepped at the round's q."""
    base = c.store.version(r.base_version)
    assert base is not None and r.sample_rate is not None
    state = checkpoint.state_from_bytes(c.store.get_blob(base.state_sha), base.rounds_applied)
    out = engine.empty_round(state, c.privacy, c.plan, r.sample_rate)
    state_sha = c.store.put_blob(checkpoint.state_to_bytes(out.state))
    v = Version(base.version + 1, base.version, r.round_id, out.state.round, base.adapter_sha, state_sha, now)
    reason = (f"the sampled cohort has {r.target} devices (q = {r.sample_rate:.4g}), below the {_min_cohort(c)} "
              f"a round needs: the adapter stays, the round counts as run")
    with c.store.transaction():
        c.store.add_version(v)
        c.store.close_round(r.round_id, "empty", now, reason, [], out.metrics, v.version)
        if out.privacy is not None:  # the accountant steps with the round, in the same transaction
            c.store.set_meta("privacy", json.dumps(out.privacy.to_json()))
        if c.cfg.privacy.secagg:
            c.store.set_secagg_stage(r.round_id, "done", now)
    c.privacy = out.privacy if out.privacy is not None else c.privacy
    return v


def collect(c: Coordinator, r: Round) -> tuple[list[engine.Contribution], object]:
    """The round's uploads as the engine's contributions, in device-id order (as the simulator's
    sorted cohort), and the secure sum under secure aggregation (else None)."""
    plan, ups = c.plan, c.store.updates(r.round_id)
    total = stages.secure_sum(c, r) if plan.secagg else None
    contributions = [engine.Contribution(
        u.device_id, None if plan.secagg else engine.decode_upload(c.store.get_blob(u.blob_sha), c.like, plan),
        u.num_tokens, u.size, None if plan.secagg else u.metrics.get("unclipped"), u.metrics.get("train_loss"),
        _rank(u.metrics.get("lora_rank"), c.global_rank),
    ) for u in ups]
    return contributions, total


def _rank(reported: float | None, global_rank: int) -> int:
    """A device's reported HetLoRA rank, if it is one the adapter has (else the global rank: 0)."""
    if reported is None or not float(reported).is_integer() or not 1 <= reported < global_rank:
        return 0
    return int(reported)


def commit_round(c: Coordinator, r: Round, now: float, reason: str) -> Version:
    t0 = time.perf_counter()
    base = c.store.version(r.base_version)
    assert base is not None
    state = checkpoint.state_from_bytes(c.store.get_blob(base.state_sha), base.rounds_applied)
    contributions, total = collect(c, r)
    # token claims bounded by the task's budget (every task of a deployment carries cfg.train), norms bounded
    budget = engine.token_budget(c.cfg.train, c.cfg.data.seq_len)
    defended = engine.defend(contributions, c.cfg.server, c.plan, {x.device_id: budget for x in contributions})
    contributions = defended.contributions
    mean = engine.aggregate(contributions, c.plan, c.like, total, c.cfg.server.aggregator, c.cfg.server)  # type: ignore[arg-type]
    out = engine.commit(state, c.privacy, contributions, mean, c.cfg, plan=c.plan, secure_total=total,  # type: ignore[arg-type]
                        sample_rate=r.sample_rate)  # the q this round's cohort was drawn at; RoundFailed: not finite
    adapter_sha = c.store.put_blob(checkpoint.adapter_to_bytes(out.state.params))  # blobs before the commit row
    state_sha = c.store.put_blob(checkpoint.state_to_bytes(out.state))
    metrics = {**out.metrics, "commit_seconds": time.perf_counter() - t0,  # collect + aggregate + apply + blobs
               "clipped": defended.clipped, "tokens_bounded": defended.tokens_bounded, "norm_bound": defended.norm_bound}
    v = Version(base.version + 1, base.version, r.round_id, out.state.round, adapter_sha, state_sha, now)
    with c.store.transaction():
        c.store.add_version(v)
        c.store.close_round(r.round_id, "committed", now, reason, [x.device_id for x in contributions], metrics, v.version)
        if out.privacy is not None:  # the accountant steps with the commit, in the same transaction
            c.store.set_meta("privacy", json.dumps(out.privacy.to_json()))
        if c.cfg.privacy.secagg:
            c.store.set_secagg_stage(r.round_id, "done", now)
    c.privacy = out.privacy if out.privacy is not None else c.privacy
    drop_uploads(c, r.round_id)
    evaluations.open_if_due(c, now)  # every deploy.eval_every-th round: sampled devices evaluate v
    return v


def abort_round(c: Coordinator, r: Round, now: float, reason: str, status: str = "aborted") -> None:
    """Close the round without a new version ("aborted" below quorum, "failed" when secagg fails)."""
    with c.store.transaction():
        c.store.close_round(r.round_id, status, now, reason)
        if c.cfg.privacy.secagg:
            c.store.set_secagg_stage(r.round_id, "done", now)
    drop_uploads(c, r.round_id)
    silent = c.store.count_assigned(r.round_id) - c.store.count_updates(r.round_id)
    # the operator is the one who can act: say which keys decide (the devices were told their side)
    log.warning("round %d %s: %s%s", r.round_id, status, reason, "" if silent <= 0 else
                f"; {silent} device(s) took the task and sent nothing (a device whose data is below "
                f"data.min_train_tokens={c.cfg.data.min_train_tokens} training tokens stops with a message saying so): "
                f"the operator can lower data.min_train_tokens or deploy.quorum={c.cfg.deploy.quorum}, or raise "
                f"deploy.deadline_s={c.cfg.deploy.deadline_s:g} (restart `pocketfed server` with --set KEY=VALUE)")


def drop_uploads(c: Coordinator, round_id: int) -> None:
    folder = c.store.upload_path(round_id, "x").parent
    for path in [p for p in c.upload_locks if p.parent == folder]:
        del c.upload_locks[path]
    if folder.is_dir():
        for p in folder.iterdir():
            p.unlink(missing_ok=True)
        folder.rmdir()
