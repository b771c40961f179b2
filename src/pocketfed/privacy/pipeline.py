"""The privacy pipeline, one function per side; the simulator and the deployment call the same ones.

Device side, `device_privatize(update, plan)`, in this order:
    1. clip      Delta <- Delta * min(1, C / ||Delta||)                     (DP or secagg)
    2. noise     + N(0, (z C)^2 / n I), this device's share                 (distributed DP)
    3. encode    the codec (float32 / float16 / int8)                        (no secagg)
       or keep the float vector [D] for fixed-point masking (`pocketfed.privacy.secagg`)
Server side:
    4. sum       `server_sum`: each decoded upload clipped again to the bound an honest one holds
                 (C; C plus the noise share's tail under distributed DP), so the sensitivity holds
                 whatever a device sent, and summed; or the secure sum (the server learns only it)
    5. noise     + N(0, (z C)^2 I)                                           (central DP)
    6. mean      `finish`: sum / n_expected under DP (a fixed denominator keeps the sensitivity
                 at C / n), sum / n_received under secure aggregation alone
Without DP or secure aggregation the mean is token-weighted (FedAvg, `plain_mean`): the server
may see per-device weights only when nothing hides them.

A `PrivacyPlan` is what one round asks of each device and of the server: it is built once per
round by the round engine (`plan_for`) and travels in the task, typed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pocketfed import codec
from pocketfed.config import Codec, DPMode, PrivacyConfig
from pocketfed.privacy import dp

if TYPE_CHECKING:  # the accountant pulls in dp-accounting and scipy (~70 MB): no device process loads it
    from pocketfed.privacy.budget import PrivacyRun

AdapterState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PrivacyPlan:
    """One round's privacy: the clip norm C and noise multiplier z in force this round (adaptive
    clipping and the accountant move them between rounds), the expected cohort n, and the mode."""

    dp: DPMode = DPMode.none
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    expected_devices: int = 1
    secagg: bool = False
    codec: Codec = Codec.float32
    frac_bits: int = 16
    secagg_degree: int = 0

    def __post_init__(self) -> None:
        if not self.clip_norm > 0 or not np.isfinite(self.clip_norm):
            raise ValueError(f"clip_norm must be a positive number, not {self.clip_norm}")
        if self.noise_multiplier < 0 or not np.isfinite(self.noise_multiplier):
            raise ValueError(f"noise_multiplier must be >= 0, not {self.noise_multiplier}")
        if self.expected_devices < 1:
            raise ValueError(f"expected_devices must be >= 1, not {self.expected_devices}")

    @property
    def private(self) -> bool:
        """Whether updates are clipped and weigh the same (DP or secure aggregation)."""
        return self.dp is not DPMode.none or self.secagg

    @property
    def device_noise_std(self) -> float:
        """Step 2's std on each device: z C / sqrt(n) under distributed DP, else 0."""
        if self.dp is not DPMode.distributed:
            return 0.0
        return dp.distributed_noise_std(self.noise_multiplier, self.clip_norm, self.expected_devices)

    def upload_bound(self, dim: int) -> float:
        """The L2 bound an honest device's upload of `dim` values holds: C, or under distributed DP
        C plus the tail bound of its noise share (`dp.noised_norm_bound`). The fixed-point encoding of
        secure aggregation is sized for it, and the server clips decoded uploads to it."""
        std = self.device_noise_std
        return dp.noised_norm_bound(self.clip_norm, std, dim) if std else self.clip_norm


def plan_for(pcfg: PrivacyConfig, run: PrivacyRun | None, expected_devices: int) -> PrivacyPlan:
    """The round's plan from the config and the run's privacy state (None without DP)."""
    return PrivacyPlan(
        dp=pcfg.dp, clip_norm=run.clip.clip_norm if run else pcfg.clip_norm,
        noise_multiplier=run.ledger.noise_multiplier if run else 0.0, expected_devices=max(1, expected_devices),
        secagg=pcfg.secagg, codec=pcfg.codec, frac_bits=pcfg.frac_bits, secagg_degree=pcfg.secagg_degree,
    )


@dataclass(frozen=True)
class DeviceUpload:
    """What the device pipeline produces: an encoded payload (no secagg) or the float vector [D]
    that secure aggregation masks next; and the adaptive-clipping bit."""

    payload: bytes | None
    vector: np.ndarray | None
    unclipped: bool


def device_privatize(update: AdapterState, plan: PrivacyPlan) -> DeviceUpload:
    """Device steps 1-3 (see the module docstring)."""
    if not plan.private:
        return DeviceUpload(codec.encode(update, plan.codec), None, True)
    x, unclipped = dp.privatize_update(update, plan.clip_norm, plan.device_noise_std)  # 1, 2
    if plan.secagg:
        return DeviceUpload(None, x, unclipped)
    return DeviceUpload(codec.encode(dp.unflatten_update(x, update), plan.codec), None, unclipped)  # 3


def plain_mean(updates: list[AdapterState], weights: list[float]) -> AdapterState:
    """The token-weighted mean sum_i n_i Delta_i / sum_i n_i, accumulated in float64."""
    total = float(sum(weights))
    if not updates or total <= 0:
        raise ValueError("cannot aggregate: no update with positive weight")
    return {k: (sum(u[k].double() * w for u, w in zip(updates, weights)) / total).to(updates[0][k].dtype)
            for k in updates[0]}


def server_sum(updates: list[AdapterState], plan: PrivacyPlan) -> np.ndarray:
    """Server step 4 on decoded (not secure) uploads: sum_i clip(Delta_i, bound), flat [D] float64."""
    vectors = [dp.flatten_update(u) for u in updates]
    bound = plan.upload_bound(len(vectors[0]))
    return np.sum([dp.clip_vector(x, bound) for x in vectors], axis=0)


def finish(total: np.ndarray, plan: PrivacyPlan, received: int, like: AdapterState) -> AdapterState:
    """Server steps 5-6 on the (plain or secure) sum [D] of `received` devices' vectors."""
    if plan.dp is DPMode.central:  # 5. the server's noise, once, on the sum
        total = dp.add_gaussian_noise(total, dp.central_noise_std(plan.noise_multiplier, plan.clip_norm))
    denominator = plan.expected_devices if plan.dp is not DPMode.none else received
    return dp.unflatten_update(total / denominator, like)  # 6.
