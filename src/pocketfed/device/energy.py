"""Energy and time of a local round, estimated from the device profile, and the caps that stop it.

    E = FLOPs x joules_per_flop + bytes x joules_per_byte               (joules)
    mAh = E / (3.6 x battery_volts)          % battery = 100 x E / battery_joules
    t = FLOPs / flops_per_second + bytes / bytes_per_second             (device seconds)

FLOPs of a round = flops_per_token (pocketfed.device.planner.ModelShape) x the token positions it
processes (padding included: the device computes on it); with LoRA on the top L layers only, the
backward pass (and its recompute under checkpointing) covers those layers and the head, not the
frozen layers below (`ModelShape.flops_per_token(checkpointing, layers)`, sparse back-propagation). A capped device runs only the whole
steps that fit its cap (`affordable_steps`) and reports what it did; the token-weighted mean then
weighs its partial work by the tokens it really trained on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pocketfed.device.profiles import DeviceProfile


@dataclass(frozen=True)
class RoundCost:
    joules: float
    mah: float
    battery_pct: float
    device_seconds: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(f"{v:.6g}") for k, v in asdict(self).items()}


def round_cost(profile: DeviceProfile, flops: float, network_bytes: float) -> RoundCost:
    joules = flops * profile.joules_per_flop + network_bytes * profile.joules_per_byte
    return RoundCost(
        joules=joules,
        mah=joules / (3.6 * profile.battery_volts),
        battery_pct=100.0 * joules / profile.battery_joules,
        device_seconds=flops / profile.flops_per_second + network_bytes / profile.bytes_per_second,
    )


def affordable_steps(profile: DeviceProfile, requested: int, flops_per_step: float, network_bytes: float,
                     max_seconds: float, max_battery_pct: float) -> int:
    """How many of `requested` steps fit both caps (0 = no cap), after paying for the network.

    Solves round_cost(profile, k * flops_per_step, network_bytes) <= caps for the largest whole k."""
    k = requested
    fixed = round_cost(profile, 0.0, network_bytes)
    step = round_cost(profile, flops_per_step, 0.0)
    if max_seconds > 0:
        k = min(k, math.floor((max_seconds - fixed.device_seconds) / step.device_seconds))
    if max_battery_pct > 0:
        k = min(k, math.floor((max_battery_pct - fixed.battery_pct) / step.battery_pct))
    return max(0, k)
