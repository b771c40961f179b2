"""Eligibility: a device trains only when it is charging, idle, on an unmetered network, above a
battery floor and below a thermal limit (Bonawitz et al. 2019, "Towards Federated Learning at
Scale: System Design": Gboard devices train when idle, charging and on an unmetered network,
which concentrates participation at night).

`check(state, policy)` is what a real device runs before accepting a task. For the simulator,
`diurnal_state(device, round, seed, cfg)` draws a device's state from the hour of its day:
each device lives at a fixed offset of up to +-3 h from the run's clock (its time zone and habits),
and with night-ness w(hour) = (1 + cos(2 pi (hour - 3) / 24)) / 2 (1 at 03:00, 0 at 15:00)

    P(charging) = 0.10 + 0.80 w      P(idle) = 0.20 + 0.75 w      P(unmetered) = 0.40 + 0.55 w
    battery %   ~ U(50, 100) when charging, else U(5, 90)
    temperature ~ N(30 + 4 (1 - w) + 3 charging, 3) C

so most devices are eligible around 03:00 and few around 15:00. Every draw comes from a generator
seeded by (seed, round, device): a resumed run sees the same states.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from pocketfed.config import Availability, DeviceConfig, EligibilityConfig


@dataclass(frozen=True)
class DeviceState:
    charging: bool
    idle: bool
    unmetered: bool
    battery_pct: float
    temperature_c: float


ALWAYS = DeviceState(charging=True, idle=True, unmetered=True, battery_pct=100.0, temperature_c=25.0)


def check(state: DeviceState, policy: EligibilityConfig) -> str | None:
    """None when the device may train, else the first reason it may not."""
    if policy.require_charging and not state.charging:
        return "not charging"
    if policy.require_idle and not state.idle:
        return "in use"
    if policy.require_unmetered and not state.unmetered:
        return "metered network"
    if state.battery_pct < policy.min_battery_pct:
        return "battery low"
    if state.temperature_c > policy.max_temperature_c:
        return "too hot"
    return None


def _key(device_id: str) -> int:
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "little")


def local_hour(device_id: str, round_: int, seed: int, cfg: DeviceConfig) -> float:
    offset = (_key(f"{seed}/{device_id}") % 601) / 100.0 - 3.0  # [-3, +3] h, fixed per device
    return (cfg.start_hour + round_ * cfg.hours_per_round + offset) % 24.0


def night(hour: float) -> float:
    return (1.0 + math.cos(2.0 * math.pi * (hour - 3.0) / 24.0)) / 2.0


def diurnal_state(device_id: str, round_: int, seed: int, cfg: DeviceConfig) -> DeviceState:
    w = night(local_hour(device_id, round_, seed, cfg))
    rng = np.random.default_rng([seed, round_, _key(device_id), 0xE1])
    u = rng.random(4)
    charging = bool(u[0] < 0.10 + 0.80 * w)
    battery = float(rng.uniform(50, 100) if charging else rng.uniform(5, 90))
    return DeviceState(
        charging=charging,
        idle=bool(u[1] < 0.20 + 0.75 * w),
        unmetered=bool(u[2] < 0.40 + 0.55 * w),
        battery_pct=battery,
        temperature_c=float(rng.normal(30.0 + 4.0 * (1.0 - w) + 3.0 * charging, 3.0)),
    )


def state_of(device_id: str, round_: int, seed: int, cfg: DeviceConfig) -> DeviceState:
    if cfg.availability is Availability.always:
        return ALWAYS
    return diurnal_state(device_id, round_, seed, cfg)


def filter_round(sampled: list[str], round_: int, seed: int, cfg: DeviceConfig) -> tuple[list[str], dict[str, str]]:
    """(eligible devices, {ineligible device: reason}) of a round's sample."""
    eligible, reasons = [], {}
    for d in sampled:
        why = check(state_of(d, round_, seed, cfg), cfg.eligibility)
        if why is None:
            eligible.append(d)
        else:
            reasons[d] = why
    return eligible, reasons
