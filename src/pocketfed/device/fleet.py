"""The simulator's devices: each gets a profile, a plan (rank) and, per round, an eligibility
check and an energy/time cap. Pure functions over explicit data; the simulator calls them between
sampling and tasks:

    sample -> filter_round (eligibility) -> prepare (rank truncation, capped steps) -> backend
           -> round_report (energy per device, participation)

What the simulator models of a plan: the rank (the global adapter truncated to it, zero-padded into
the one shared rank-R model, where zero slots stay exactly zero; see pocketfed.model.rank), the
energy and time of the steps at the plan's micro-batch, sequence and checkpointing, and the caps.
What it does not: the reduced-precision base and micro-batching, which change memory, not the
maths (up to rounding); the device task runs those for real (`pocketfed device --profile`), and
`pocketfed.device.fit` measures them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from pocketfed.config import RunConfig
from pocketfed.device import eligibility
from pocketfed.device.energy import RoundCost, affordable_steps, round_cost
from pocketfed.device.planner import ModelShape, Plan, make_plan
from pocketfed.device.profiles import DeviceProfile, assign_profile, load_profiles
from pocketfed.device.task import num_steps
from pocketfed.errors import UserError
from pocketfed.model import rank as rank_ops
from pocketfed.protocol.messages import TrainResult, TrainTask


@dataclass(frozen=True)
class SimDevice:
    profile: DeviceProfile | None  # None: no budgets (device.profiles is empty)
    plan: Plan | None  # None: the profile cannot hold the model (never trains)
    rank: int
    refusal: str = ""


@dataclass(frozen=True)
class Fleet:
    devices: dict[str, SimDevice]
    shape: ModelShape
    global_rank: int


def build(cfg: RunConfig, shape: ModelShape, pool: list[str]) -> Fleet:
    """Assign profiles (uniformly from device.profiles, fixed by seed) and plan each profile once."""
    mix = cfg.device.profiles
    profiles = load_profiles(cfg.device.profiles_file)
    unknown = [p for p in mix if p not in profiles]
    if unknown:
        raise UserError(f"device.profiles names unknown profiles {unknown}; known: {', '.join(profiles)}")
    plans: dict[str, tuple[Plan | None, str]] = {}
    for name in dict.fromkeys(mix):
        try:
            plans[name] = (make_plan(shape, profiles[name], cfg.lora, cfg.train, cfg.data.seq_len, cfg.model.name), "")
        except UserError as e:
            plans[name] = (None, str(e))
    devices = {}
    for d in pool:
        if not mix:
            devices[d] = SimDevice(None, None, cfg.lora.rank)
            continue
        name = assign_profile(d, mix, cfg.sim.seed)
        plan, why = plans[name]
        devices[d] = SimDevice(profiles[name], plan, plan.rank if plan else 0, why)
    return Fleet(devices, shape, cfg.lora.rank)


def _network_bytes(fleet: Fleet, rank: int, targets: list[str], layers: int = 0) -> float:
    return 2.0 * 4 * fleet.shape.lora_params(rank, targets, layers)  # the rank-r adapter down, its update up


def prepare(fleet: Fleet, cfg: RunConfig, round_: int, sampled: list[str], global_params: dict,
            rows: Callable[[str], int], seed_of: Callable[[str], int]) -> tuple[list[TrainTask], dict[str, str]]:
    """Tasks for the eligible devices of a sample, and {left-out device: reason}."""
    eligible, reasons = eligibility.filter_round(sampled, round_, cfg.sim.seed, cfg.device)
    tasks = []
    for d in eligible:
        dev = fleet.devices[d]
        train = cfg.train
        if dev.profile is not None:
            if dev.plan is None:
                reasons[d] = "model does not fit"
                continue
            requested = num_steps(cfg.train, rows(d))
            per_step = (fleet.shape.flops_per_token(dev.plan.checkpointing, dev.plan.layers)
                        * cfg.train.batch_size * dev.plan.seq_len)
            k = affordable_steps(dev.profile, requested, per_step,
                                 _network_bytes(fleet, dev.rank, list(dev.plan.target_modules), dev.plan.layers),
                                 cfg.device.max_round_seconds, cfg.device.max_round_battery_pct)
            if k == 0:
                reasons[d] = "cap below one step"
                continue
            train = dataclasses.replace(cfg.train, steps=k)
        params = global_params
        if dev.rank != fleet.global_rank:  # send the truncation; the shared rank-R model holds it zero-padded
            params = rank_ops.pad(rank_ops.truncate(global_params, dev.rank), fleet.global_rank)
        tasks.append(TrainTask(round_, d, params, train, seed_of(d)))
    return tasks, reasons


def cost_of(fleet: Fleet, cfg: RunConfig, result: TrainResult) -> RoundCost | None:
    """The estimated energy and device time of a result's round (None without a profile)."""
    dev = fleet.devices[result.device_id]
    if dev.profile is None or dev.plan is None:
        return None
    positions = result.metrics["steps"] * cfg.train.batch_size * dev.plan.seq_len
    flops = fleet.shape.flops_per_token(dev.plan.checkpointing, dev.plan.layers) * positions
    return round_cost(dev.profile, flops, _network_bytes(fleet, dev.rank, list(dev.plan.target_modules), dev.plan.layers))


def round_report(fleet: Fleet, cfg: RunConfig, sampled: list[str], reasons: dict[str, str],
                 results: list[Any]) -> dict[str, Any]:
    """Participation, ranks and energy of a round; adds each result's energy to its metrics."""
    done = [x for x in results if isinstance(x, TrainResult)]
    why: dict[str, int] = {}
    for r in reasons.values():
        why[r] = why.get(r, 0) + 1
    ranks: dict[str, int] = {}
    for x in done:
        key = str(fleet.devices[x.device_id].rank)
        ranks[key] = ranks.get(key, 0) + 1
    row: dict[str, Any] = {
        "participation": {"sampled": len(sampled), "eligible": len(sampled) - len(reasons),
                          "trained": len(done), "dropouts": len(results) - len(done), "ineligible": why},
        "ranks": ranks,
    }
    costs = []
    for x in done:
        c = cost_of(fleet, cfg, x)
        if c is not None:
            x.metrics.update({"energy_j": c.joules, "energy_mah": c.mah, "battery_pct": c.battery_pct,
                              "device_seconds": c.device_seconds})
            costs.append((x, c))
    if costs:
        requested = cfg.train.steps or 0
        row["energy"] = {
            "joules_total": round(sum(c.joules for _, c in costs), 4),
            "battery_pct_max": round(max(c.battery_pct for _, c in costs), 6),
            "mah_max": round(max(c.mah for _, c in costs), 6),
            "device_seconds_max": round(max(c.device_seconds for _, c in costs), 3),
            "stopped_early": sum(1 for x, _ in costs if requested and x.metrics["steps"] < requested),
        }
    return row
