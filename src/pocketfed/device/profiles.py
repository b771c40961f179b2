"""Device profiles as data: what a device can spend on one round of training.

A profile holds the memory the training job may use, the cores, the battery, the energy cost of
computing and of moving bytes, the network and the largest LoRA rank the device trains. Built-ins
are `watch`, `phone` and `car`; more come from a YAML file (`device.profiles_file`), e.g.

    glasses:
      train_memory_mb: 384
      cores: 2
      battery_mah: 150
      ...every field of DeviceProfile...

`train_memory_mb` is the peak RSS of the whole device process (VmHWM, as `pocketfed device --profile`
and `pocketfed.device.fit` measure it): the interpreter, torch and the device's own code (~225-260 MB
resident once imported), the frozen base, the
adapter and its optimizer state, activations, logits and the allocator's slack. It is what the OS
counts against a background job, so the runtime is inside the budget, not on top of it; this is why
the device trains with `pocketfed.device.leanmodel` (torch only) rather than transformers + PEFT,
which would add ~155 MB of imports.

Where the built-in numbers come from (orders of magnitude, not measurements of one product):
- Memory: a watch has 1-2 GB RAM (Apple Watch S9: 1 GB; Wear OS W5: 2 GB), of which a background job
  may take about a quarter: 512 MB. A phone has 6-12 GB; Android's low-memory killer reclaims
  background jobs beyond a few GB, so 1.5 GB. A car head unit (Snapdragon SA8155P: 8-12 GB) runs
  navigation and media first: 4 GB.
- Battery: watch 308 mAh (Apple Watch S9 45 mm), phone 4,000 mAh (2023 flagships: 3,900-5,000),
  both at a 3.85 V nominal Li-ion cell; car: the 12 V starter battery, 60 Ah (training while
  parked draws on it; while driving the alternator covers it).
- Compute: sustained fp32 throughput of the CPU at its power: watch ~2 GFLOP/s at ~0.5 W
  (2.5e-10 J/FLOP); phone ~20 GFLOP/s on big cores at ~3 W (1.5e-10 J/FLOP); car SoC ~40 GFLOP/s
  at ~6 W (1.5e-10 J/FLOP).
- Network (Huang et al., MobiSys 2012, "A close examination of performance and power
  characteristics of 4G LTE networks"): Wi-Fi uplink ~1 W at ~20 Mbit/s = 4e-7 J/byte; LTE
  uplink ~2.5 W at ~5 Mbit/s = 4e-6 J/byte. A watch relays over Bluetooth/Wi-Fi through its
  phone at ~1 Mbit/s and ~0.25 W: 2e-6 J/byte.
- Rank: LoRA state at rank 8 on SmolLM2-135M (q, v) is ~7 MB with AdamW, so memory rarely caps
  rank; upload bytes, energy and local compute do. HetLoRA (Cho et al. 2024) assigns ranks by
  device capability the same way: watch 2, phone 4, car 8.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from pocketfed.config import read_yaml_mapping
from pocketfed.errors import UserError


class Network(str, enum.Enum):
    wifi = "wifi"
    cellular = "cellular"
    bluetooth = "bluetooth"  # relayed through a paired phone


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    train_memory_mb: float  # peak RSS of the whole training process, runtime included
    cores: int
    battery_mah: float
    battery_volts: float
    joules_per_flop: float
    joules_per_byte: float  # radio energy per byte sent or received
    flops_per_second: float  # sustained training throughput
    bytes_per_second: float  # sustained uplink
    network: Network
    max_rank: int  # the largest LoRA rank this device trains

    @property
    def battery_joules(self) -> float:
        return self.battery_mah * 3.6 * self.battery_volts  # 1 mAh at V volts = 3.6 V joules


BUILTIN: dict[str, DeviceProfile] = {
    "watch": DeviceProfile("watch", train_memory_mb=512, cores=2, battery_mah=308, battery_volts=3.85,
                           joules_per_flop=2.5e-10, joules_per_byte=2e-6, flops_per_second=2e9,
                           bytes_per_second=125e3, network=Network.bluetooth, max_rank=2),
    "phone": DeviceProfile("phone", train_memory_mb=1536, cores=8, battery_mah=4000, battery_volts=3.85,
                           joules_per_flop=1.5e-10, joules_per_byte=4e-7, flops_per_second=20e9,
                           bytes_per_second=2.5e6, network=Network.wifi, max_rank=4),
    "car": DeviceProfile("car", train_memory_mb=4096, cores=8, battery_mah=60000, battery_volts=12.0,
                         joules_per_flop=1.5e-10, joules_per_byte=4e-6, flops_per_second=40e9,
                         bytes_per_second=625e3, network=Network.cellular, max_rank=8),
}


def _from_mapping(name: str, data: Any, source: str) -> DeviceProfile:
    fields = {f.name: f for f in dataclasses.fields(DeviceProfile) if f.name != "name"}
    if not isinstance(data, dict):
        raise UserError(f"{source}: profile {name!r} must be a mapping of {', '.join(fields)}")
    unknown = sorted(set(data) - set(fields))
    missing = sorted(set(fields) - set(data))
    if unknown or missing:
        raise UserError(f"{source}: profile {name!r} has unknown keys {unknown} and lacks {missing}; "
                        f"a profile needs exactly {', '.join(fields)}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        try:
            if key == "network":
                values[key] = Network(value)
            elif key in ("cores", "max_rank"):
                values[key] = int(value)
            else:
                values[key] = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{source}: profile {name!r} key {key!r} has a bad value {value!r}"
                            + (f" (networks: {', '.join(n.value for n in Network)})" if key == "network" else "")) from None
        if key != "network" and values[key] <= 0:
            raise UserError(f"{source}: profile {name!r} key {key!r} must be positive, got {value!r}")
    return DeviceProfile(name=name, **values)


def load_profiles(path: str | Path = "") -> dict[str, DeviceProfile]:
    """The built-in profiles plus those of the YAML file at `path` ("" = built-ins only)."""
    out = dict(BUILTIN)
    if not path:
        return out
    data = read_yaml_mapping(path, "profiles file", "profile names to their fields")
    for name, fields in data.items():
        out[str(name)] = _from_mapping(str(name), fields, str(Path(path).expanduser()))
    return out


def get_profile(name: str, path: str | Path = "") -> DeviceProfile:
    profiles = load_profiles(path)
    if name not in profiles:
        raise UserError(f"unknown device profile {name!r}; known profiles: {', '.join(profiles)}"
                        + ("" if path else " (user-defined ones come from a YAML file)"))
    return profiles[name]


def assign_profile(device_id: str, mix: list[str], seed: int) -> str:
    """The profile of a simulated device: a uniform pick from `mix`, fixed by (seed, device id)."""
    digest = hashlib.sha256(f"profile/{seed}/{device_id}".encode()).digest()
    return mix[int.from_bytes(digest[:8], "little") % len(mix)]
