"""The coordinator's status: the model, the rounds, the privacy spent (GET /v1/status).

For the operator only (the route checks `pocketfed.server.operator`'s bearer token), and even then
aggregates only: counts of devices, assignments and updates, and each round's metrics as the round
engine computed them over its whole cohort; no device names and nothing one device reported.
"""

from __future__ import annotations

from typing import Any

from pocketfed.privacy.budget import coordinator_view
from pocketfed.server import lifecycle
from pocketfed.server.service import Coordinator


def status(c: Coordinator, now: float) -> dict[str, Any]:
    with c.lock:
        lifecycle.tick(c, now)
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
            "done": lifecycle.is_done(c),
            "devices": c.store.count_devices(),
            "stopped": lifecycle.stop_reason(c) or "",
            "privacy": _privacy_status(c),
            "open_round": None if r is None else {
                "round_id": r.round_id, "idx": r.idx, "assigned": len(c.store.assigned(r.round_id)),
                "updates": c.store.count_updates(r.round_id), "goal": r.goal, "target": r.target,
                "quorum": r.quorum, "deadline_in_s": max(0.0, r.deadline - now),
                "stage": (s.stage if (s := c.store.secagg_round(r.round_id)) else ""),
            },
            "evaluations": c.store.evaluations(limit=50),
            "rounds": [
                {"round_id": x.round_id, "idx": x.idx, "status": x.status, "reason": x.reason or "",
                 "devices": len(x.participants or []), "metrics": {k: v for k, v in (x.metrics or {}).items()
                                                                  if isinstance(v, (int, float))}}
                for x in rounds
            ],
        }


def _privacy_status(c: Coordinator) -> dict[str, Any] | None:
    run = c.privacy
    if run is None:
        return None if not c.cfg.privacy.secagg else {"dp": "none", "secagg": True}
    # two epsilons: against the model's recipients (the budget's) and against this coordinator, which
    # knows who took part (None: unbounded); the adaptive clip's count is never shown, only the
    # rounds' noised unclipped_fraction
    p = c.cfg.privacy
    evaluation = ({"evaluation": "totals of loss and top-k released outside the accountant (docs/PRIVACY.md)"}
                  if c.cfg.deploy.eval_every else {})
    return {**evaluation, **run.summary(), "dp": p.dp.value, "secagg": p.secagg, "target_epsilon": p.target_epsilon,
            "coordinator_sees": coordinator_view(p.dp, p.secagg)}
