"""Typed, versioned wire messages between the server loop and devices.

Only adapter tensors and scalar metrics cross; a device's data never does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pocketfed.config import TrainConfig
from pocketfed.privacy.pipeline import DeviceUpload, PrivacyPlan

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
    privacy: PrivacyPlan = PrivacyPlan()  # what the device's pipeline does to the update before it leaves
    upload_rank: int = 0  # zero-pad the update to this LoRA rank before the pipeline (HetLoRA); 0 = as trained
    version: int = WIRE_VERSION


@dataclass(frozen=True)
class TrainResult:
    """Device -> server: what the device's privacy pipeline let out (`upload`), its weight, scalar
    metrics; `update` (trained - global, before the pipeline) stays on the device: a simulation
    keeps it only for tests and diagnostics."""

    round: int
    device_id: str
    update: AdapterState
    num_tokens: int
    metrics: dict[str, float] = field(default_factory=dict)
    upload: DeviceUpload | None = None
    version: int = WIRE_VERSION


@dataclass(frozen=True)
class Dropout:
    """A sampled device that returned no result (failed, out of budget, went offline)."""

    round: int
    device_id: str
    reason: str
