"""Typed, versioned wire messages between the server loop and devices.

Only adapter tensors and scalar metrics cross; a device's data never does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pocketfed.config import TrainConfig

WIRE_VERSION = 1
AdapterState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainTask:
    """Server -> device: train on your data from this global adapter."""

    round: int
    device_id: str
    global_adapter: AdapterState
    train: TrainConfig
    seed: int  # the device's data order (and dropout) for this round
    version: int = WIRE_VERSION


@dataclass(frozen=True)
class TrainResult:
    """Device -> server: the adapter update (trained - global), its weight, scalar metrics."""

    round: int
    device_id: str
    update: AdapterState
    num_tokens: int
    metrics: dict[str, float] = field(default_factory=dict)
    version: int = WIRE_VERSION


@dataclass(frozen=True)
class Dropout:
    """A sampled device that returned no result (failed, out of budget, went offline)."""

    round: int
    device_id: str
    reason: str
