"""What the console's pages show, as JSON: a deployment's state (from the coordinator's store) and
simulation runs (from their run folders). Reading only; the operator's actions are
`pocketfed.server.operations`.

Round accounting, per round (the rounds table):
    sampled   devices the round's Poisson draw took (late registrants drawn at check-in included)
    assigned  sampled devices that checked in eligible and got the task
    accepted  updates the round engine applied (the round's participants)
    dropped   assigned devices whose update never arrived (left, crashed, missed the deadline)
    refused   updates that arrived but were not applied (received - accepted, for a closed round)
Stage timing: a round without secure aggregation has draw -> first task -> last update in ->
close (goal or deadline) and the commit's own compute; one with it has the SecAgg stages
(advertise, share, masked, consistency, unmask), each from its first tick to the next stage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pocketfed.signing import public_hex
from pocketfed.server import lifecycle, operations
from pocketfed.server.service import Coordinator
from pocketfed.server.status import _privacy_status

SECAGG_STAGES = ("advertise", "share", "masked", "consistency", "unmask")
ROUND_METRICS = ("train_loss", "update_norm", "epsilon_recipients", "epsilon_coordinator", "clip_norm",
                 "noise_multiplier", "sample_rate", "commit_seconds", "unclipped_fraction")


def _num(x: Any) -> float | None:
    """A finite number, or None (JSON has no inf or NaN)."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _stages(r: Any, act: dict[str, Any], marks: dict[str, float], now: float) -> list[list[Any]]:
    """[stage, seconds] in order; the running stage counts up to `now`."""
    end = r.closed_at if r.closed_at is not None else now
    if any(s in marks for s in SECAGG_STAGES):
        names = [s for s in SECAGG_STAGES if s in marks]
        starts = [marks[s] for s in names] + [end]
        return [[n, max(0.0, starts[i + 1] - starts[i])] for i, n in enumerate(names)]
    points = [("draw to first task", r.opened_at, act.get("first_assigned")),
              ("training and uploads", act.get("first_assigned"), act.get("last_update")),
              ("wait for goal or deadline", act.get("last_update"), r.closed_at)]
    out = [[name, max(0.0, b - a)] for name, a, b in points if a is not None and b is not None]
    if (commit := _num((r.metrics or {}).get("commit_seconds"))) is not None:
        out.append(["commit (aggregate, apply, write)", commit])
    return out


def deployment(c: Coordinator, now: float) -> dict[str, Any]:
    """Everything the console shows of a running coordinator (operator only; aggregates, device
    names for the devices panel, nothing a device reported on its own)."""
    with c.lock:
        lifecycle.tick(c, now)
        store = c.store
        latest = store.latest_version()
        assert latest is not None
        rounds = store.rounds(limit=500)
        activity = store.round_activity()
        marks = store.stage_times([r.round_id for r in rounds])
        devices = store.device_table()
        versions = [store.version(v) for v in range(max(0, latest.version - 199), latest.version + 1)]
        served = operations.released_version(c)
        evaluations = store.evaluations()  # federated evaluation (`server.evaluations`), oldest first
        actions = store.actions(100)
        open_r = store.open_round()
        controls = c.controls
        stopped = lifecycle.stop_reason(c) or ""
        hold = operations.hold_reason(c) or ""
    recent = max(30.0, 3 * c.cfg.deploy.retry_s)  # a device that checked in this recently counts as "now"
    rows = []
    for r in rounds:
        act = activity.get(r.round_id, {})
        metrics = {k: _num(v) for k, v in (r.metrics or {}).items() if k in ROUND_METRICS}
        accepted = len(r.participants or [])
        assigned, received = act.get("assigned", 0), act.get("updates", 0)
        closed = r.status != "open"
        rows.append({
            "round_id": r.round_id, "idx": r.idx, "status": r.status, "reason": r.reason or "",
            "opened_at": r.opened_at, "closed_at": r.closed_at,
            "duration_s": (r.closed_at if closed and r.closed_at is not None else now) - r.opened_at,
            "goal": r.goal, "quorum": r.quorum, "sampled": act.get("sampled", r.target), "assigned": assigned,
            "received": received, "accepted": accepted if closed else None,
            "dropped": max(0, assigned - received) if closed else None,
            "refused": max(0, received - accepted) if closed and r.status == "committed" else (0 if closed else None),
            "stages": _stages(r, act, marks.get(r.round_id, {}), now),
            "bytes_up": act.get("bytes_up", 0), "bytes_down": act.get("bytes_down", 0),
            "update_bytes": act.get("update_bytes", 0), "new_version": r.new_version, "metrics": metrics,
        })
    p = c.cfg.privacy
    privacy = _privacy_status(c) or {"dp": p.dp.value, "secagg": p.secagg}
    key = public_hex(c.release_key)
    return {
        # changes when anything the panels show changes (a commit, an update in, an evaluation closed, an
        # action, a device), and every 10 s for the "last seen" times: the page redraws only then
        "stamp": f"{latest.version}:{open_r.round_id if open_r else '-'}:{rows[-1]['received'] if rows else 0}:"
                 f"{len(evaluations)}:{sum(e['status'] != 'open' for e in evaluations)}:{len(actions)}:"
                 f"{len(devices)}:{int(now // 10)}",
        "now": now, "model": c.model_id, "strategy": c.cfg.server.strategy.value,
        "version": latest.version, "rounds_applied": latest.rounds_applied, "rounds_planned": c.cfg.sim.rounds,
        "stopped": stopped,
        "controls": {"paused": controls.paused, "goal": operations.next_goal(c), "config_goal": c.cfg.deploy.goal,
                     "quorum": c.cfg.deploy.quorum, "frozen_at": controls.frozen_at, "hold": hold},
        "rounds": rows,
        "evaluations": evaluations,
        "privacy": {**privacy, "clip_norm_config": p.clip_norm, "delta": privacy.get("delta", p.delta)},
        "devices": {
            "registered": len(devices), "revoked": sum(d["revoked_at"] is not None for d in devices),
            "eligible_now": sum(bool(d["eligible"]) and d["revoked_at"] is None and d["checked_in_at"] is not None
                                and now - d["checked_in_at"] <= recent for d in devices),
            "recent_s": recent, "rows": devices,
        },
        "releases": {
            "key": key, "frozen_at": controls.frozen_at, "served": served.version if served else None,
            "versions": [{"version": v.version, "parent": v.parent, "round_id": v.round_id,
                          "rounds_applied": v.rounds_applied, "created_at": v.created_at, "adapter_sha": v.adapter_sha,
                          "served": served is not None and v.version <= served.version}
                         for v in reversed(versions) if v is not None],
        },
        "actions": actions,
    }


# ---- simulation runs --------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a run still writing its last line
                break
    return rows


def run_folders(root: Path) -> list[Path]:
    """The run folders under `root` (each holds metrics.jsonl), or `root` itself when it is one."""
    root = Path(root)
    if (root / "metrics.jsonl").is_file():
        return [root]
    return sorted(p for p in root.iterdir() if (p / "metrics.jsonl").is_file()) if root.is_dir() else []


def run_view(folder: Path) -> dict[str, Any]:
    """One simulation run for the console: its settings (config.yaml), a row per round
    (metrics.jsonl) and the final evaluation (summary.json, absent while the run is going)."""
    import yaml

    cfg: dict[str, Any] = {}
    if (folder / "config.yaml").is_file():
        try:
            cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        except yaml.YAMLError:
            cfg = {}
    summary: dict[str, Any] | None = None
    if (folder / "summary.json").is_file():
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except json.JSONDecodeError:
            summary = None
    rows = []
    for row in _read_jsonl(folder / "metrics.jsonl"):
        heldout, priv = row.get("heldout") or {}, row.get("privacy") or {}
        n = len(row.get("devices") or [])
        rows.append({
            "round": row.get("round"), "devices": n, "tokens": row.get("tokens"),
            "train_loss": _num(row.get("train_loss")), "update_norm": _num(row.get("update_norm")),
            "heldout_perplexity": _num(heldout.get("perplexity")), "heldout_loss": _num(
                math.log(heldout["perplexity"]) if _num(heldout.get("perplexity")) else None),
            "heldout_top3": _num(heldout.get("top3")),
            "epsilon_recipients": _num(priv.get("epsilon_recipients")),
            "epsilon_coordinator": _num(priv.get("epsilon_coordinator")),
            "bytes_up": (row.get("bytes_up_per_device") or 0) * n, "seconds": _num(row.get("seconds")),
        })
    server, privacy = cfg.get("server") or {}, cfg.get("privacy") or {}
    return {
        "name": folder.name, "rows": rows, "summary": summary,
        "settings": {"model": (cfg.get("model") or {}).get("name"), "strategy": server.get("strategy"),
                     "dp": privacy.get("dp"), "secagg": privacy.get("secagg"),
                     "target_epsilon": privacy.get("target_epsilon"), "noise_multiplier": privacy.get("noise_multiplier"),
                     "clip_norm": privacy.get("clip_norm"), "rounds": (cfg.get("sim") or {}).get("rounds")},
    }


def runs(root: Path) -> dict[str, Any]:
    views = [run_view(f) for f in run_folders(root)]
    return {"root": str(root), "runs": views,
            "stamp": ":".join(f"{v['name']}={len(v['rows'])}{'+' if v['summary'] else ''}" for v in views)}
