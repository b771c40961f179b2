"""The coordinator's driver of the round engine: each transition in one store transaction.

    open round r (from the last committed version v; idx = rounds applied so far)
      -> devices check in; eligible ones are assigned until target = ceil(goal * overselect)
      -> each assigned device uploads one update (or, under secure aggregation, runs the stages)
      -> on every tick the engine decides (`round.decide`, `secagg_stages.advance`):
             commit: collect the uploads in device-id order -> `round.aggregate` -> `round.commit`;
                     blobs first (adapter, state), then one transaction: version v+1, round
                     committed, the accountant's new state
             abort / fail: the round closes without a version; the next starts again from v
      -> no round opens once `round.stop_reason` gives one (rounds done, privacy budget spent).

Every state change happens under `Coordinator.lock`; time is passed in.
"""

from __future__ import annotations

import json
import time

from pocketfed.privacy import secagg
from pocketfed.server import checkpoint
from pocketfed.server import round as engine
from pocketfed.server import secagg_stages as stages
from pocketfed.server.service import Coordinator
from pocketfed.server.store import Round, Version


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
    """Advance the lifecycle: close a round the engine decides on; open the next."""
    with c.lock:
        r = c.store.open_round()
        if r is not None:
            if c.cfg.privacy.secagg:
                decision = stages.advance(c, r, now)
            else:
                decision = engine.decide(c.store.count_updates(r.round_id), r.goal, r.quorum, r.deadline, now)
            if decision.action == "wait":
                return
            if decision.action == "commit":
                try:
                    commit_round(c, r, now, decision.reason)
                except secagg.SecAggError as e:  # the secure sum cannot be unmasked: nothing is released
                    abort_round(c, r, now, str(e), "failed")
            else:
                abort_round(c, r, now, decision.reason, "failed" if decision.action == "fail" else "aborted")
        if not is_done(c):
            latest = c.store.latest_version()
            assert latest is not None
            d = c.cfg.deploy
            with c.store.transaction():
                round_id = c.store.add_round(latest.rounds_applied, latest.version, now, now + d.deadline_s,
                                             d.goal, engine.cohort_target(d.goal, d.overselect), d.quorum)
                if c.cfg.privacy.secagg:
                    c.store.add_secagg_round(round_id, now + d.deadline_s)


def collect(c: Coordinator, r: Round) -> tuple[list[engine.Contribution], object]:
    """The round's uploads as the engine's contributions, in device-id order (as the simulator's
    sorted cohort), and the secure sum under secure aggregation (else None)."""
    plan, ups = c.plan, c.store.updates(r.round_id)
    total = stages.secure_sum(c, r) if plan.secagg else None
    contributions = [engine.Contribution(
        u.device_id, None if plan.secagg else engine.decode_upload(c.store.get_blob(u.blob_sha), c.like, plan),
        u.num_tokens, u.size, u.metrics.get("unclipped", 0.0) >= 0.5, u.metrics.get("train_loss"),
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
    mean = engine.aggregate(contributions, c.plan, c.like, total)  # type: ignore[arg-type]
    out = engine.commit(state, c.privacy, contributions, mean, c.cfg)
    adapter_sha = c.store.put_blob(checkpoint.adapter_to_bytes(out.state.params))  # blobs before the commit row
    state_sha = c.store.put_blob(checkpoint.state_to_bytes(out.state))
    metrics = {**out.metrics, "commit_seconds": time.perf_counter() - t0}  # collect + aggregate + apply + blobs
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
    return v


def abort_round(c: Coordinator, r: Round, now: float, reason: str, status: str = "aborted") -> None:
    """Close the round without a new version ("aborted" below quorum, "failed" when secagg fails)."""
    with c.store.transaction():
        c.store.close_round(r.round_id, status, now, reason)
        if c.cfg.privacy.secagg:
            c.store.set_secagg_stage(r.round_id, "done", now)
    drop_uploads(c, r.round_id)


def drop_uploads(c: Coordinator, round_id: int) -> None:
    folder = c.store.upload_path(round_id, "x").parent
    for path in [p for p in c.upload_locks if p.parent == folder]:
        del c.upload_locks[path]
    if folder.is_dir():
        for p in folder.iterdir():
            p.unlink(missing_ok=True)
        folder.rmdir()
