"""The privacy pipeline, one function per side; the simulator and the deployment call the same ones.

Device side, `device_privatize(update, plan)`, in this order:
    1. clip      Delta <- Delta * min(1, C / ||Delta||)                     (DP or secagg)
    2. noise     + N(0, (z C)^2 / n I), this device's share                 (distributed DP)
    3. encode    the codec (float32 / float16 / int8)                        (no secagg)
       or keep the float vector [D] for fixed-point masking (`pocketfed.privacy.secagg`)
   Under distributed DP with secure aggregation, steps 2-3 are the distributed discrete Gaussian
   (Kairouz, Liu, Steinke, ICML 2021; `pocketfed.privacy.discrete`): the clipped vector is rounded
   at random to the grid 2^-f (conditional stochastic rounding, unbiased, L2 norm <= D2) and gets
   integer noise N_Z(0, (z C / sqrt(n) / 2^-f)^2) there, so no float noise is rounded afterwards
   (a float sampler leaks through its low bits; the sum of integers is exact). The accountant sees
   the rounding's larger sensitivity D2 2^-f instead of C (`PrivacyPlan.sensitivity`).
   With adaptive clipping the device also releases its centred bit b_i - 1/2 (+ N(0, sigma_b^2 / n)
   under distributed DP): under secure aggregation as one extra coordinate of the vector [D + 1]
   (`secure_length`), so the server learns only the sum; otherwise as the upload's "unclipped" metric.
Server side:
    4. sum       `server_sum`: each decoded upload clipped again to the bound an honest one holds
                 (C; C plus the noise share's tail under distributed DP), so the sensitivity holds
                 whatever a device sent, and summed; or the secure sum (the server learns only it)
    5. noise     + N(0, (z C)^2 I)                                           (central DP)
    6. mean      `finish`: sum / n_expected under DP (a fixed denominator keeps the sensitivity
                 at C / n), sum / n_received under secure aggregation alone
    7. count     `clip_estimate`: b~ = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / n_expected + 1/2, the
                 noise added here under central DP (Andrew et al., NeurIPS 2021; `pocketfed.privacy.dp`)
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
    """One round's privacy: the clip norm C and the update's noise multiplier in force this round
    (z, or z_Delta of Theorem 1 under adaptive clipping; adaptive clipping moves C between rounds),
    the expected cohort n, the mode, and the adaptive-clipping count's noise sigma_b."""

    dp: DPMode = DPMode.none
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    expected_devices: int = 1
    secagg: bool = False
    codec: Codec = Codec.float32
    frac_bits: int = 16
    secagg_degree: int = 0
    adaptive_clip: bool = False  # devices release their centred bit (only under DP)
    count_noise_std: float = 0.0  # sigma_b: the count's total noise std

    def __post_init__(self) -> None:
        if not self.clip_norm > 0 or not np.isfinite(self.clip_norm):
            raise ValueError(f"clip_norm must be a positive number, not {self.clip_norm}")
        if self.noise_multiplier < 0 or not np.isfinite(self.noise_multiplier):
            raise ValueError(f"noise_multiplier must be >= 0, not {self.noise_multiplier}")
        if self.expected_devices < 1:
            raise ValueError(f"expected_devices must be >= 1, not {self.expected_devices}")
        if self.count_noise_std < 0 or not np.isfinite(self.count_noise_std):
            raise ValueError(f"count_noise_std must be >= 0, not {self.count_noise_std}")

    @property
    def discrete(self) -> bool:
        """Whether the device noise is the distributed discrete Gaussian (distributed DP under secagg)."""
        return self.secagg and self.dp is DPMode.distributed

    @property
    def gamma(self) -> float:
        """The fixed-point grid step 2^-f of secure aggregation."""
        return 2.0 ** -self.frac_bits

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

    @property
    def device_count_noise_std(self) -> float:
        """The std each device adds to its centred bit: sigma_b / sqrt(n) under distributed DP, else 0."""
        if self.dp is not DPMode.distributed or not self.adaptive_clip:
            return 0.0
        return self.count_noise_std / np.sqrt(self.expected_devices)

    @property
    def bit_bound(self) -> float:
        """The bound |b_i - 1/2 + noise share| an honest device's released bit holds: 1/2, plus the
        tail bound of its noise share under distributed DP (`dp.noised_norm_bound` in one dimension)."""
        std = self.device_count_noise_std
        return dp.noised_norm_bound(0.5, std, 1) if std else 0.5

    def upload_bound(self, dim: int) -> float:
        """The L2 bound an honest device's upload of `dim` values holds: C, or under distributed DP
        C plus the tail bound of its noise share (`dp.noised_norm_bound`). The fixed-point encoding of
        secure aggregation is sized for it, and the server clips decoded uploads to it."""
        std = self.device_noise_std
        bound = dp.noised_norm_bound(self.clip_norm, std, dim) if std else self.clip_norm
        # conditional rounding may lengthen the vector to D2 <= C + gamma sqrt(d) (Kairouz et al. 2021);
        # the discrete Gaussian is sub-Gaussian with the same std, so the tail term holds for it
        return bound + self.gamma * float(np.sqrt(dim)) if self.discrete else bound

    def noise_scale(self, dim: int) -> float:
        """How much less protection the round's noise gives than its nominal multiplier says:
        C / sensitivity(dim), and under adaptive clipping also the centred bit's 1/2 over its rounded
        bound 1/2 + 2^-f (both parts of Theorem 1's pair shrink by at least this factor). 1 unless
        the noise is the distributed discrete Gaussian."""
        if not self.discrete:
            return 1.0
        scale = self.clip_norm / self.sensitivity(dim)
        return min(scale, 0.5 / (0.5 + self.gamma)) if self.adaptive_clip else scale

    def sensitivity(self, dim: int) -> float:
        """The L2 sensitivity the accountant uses for one device's update of `dim` values: C, or
        under the distributed discrete Gaussian the bound D2 2^-f that conditional rounding keeps
        (`discrete.rounded_l2_bound`), so the round's noise multiplier is std / (D2 2^-f). Raises
        ValueError when the integer noise is so small that the sum of the devices' discrete
        Gaussians is not accounted as a Gaussian (Kairouz et al. 2021's tau d above 1e-10)."""
        if not self.discrete or not self.noise_multiplier:
            return self.clip_norm
        from pocketfed.privacy import discrete

        sigma_int_sq = (self.device_noise_std / self.gamma) ** 2
        if sigma_int_sq < 1 or not discrete.tau_is_negligible(self.expected_devices, sigma_int_sq, dim, rounds=1):
            raise ValueError(f"the discrete Gaussian's noise per device ({sigma_int_sq ** 0.5:.3g} grid steps) is too small "
                             f"to account its sum as a Gaussian: raise privacy.noise_multiplier or privacy.frac_bits")
        return discrete.rounded_l2_bound(self.clip_norm / self.gamma, dim) * self.gamma


def secure_length(plan: PrivacyPlan, dim: int) -> int:
    """The secure vector's length for an adapter of `dim` values: dim, or dim + 1 when the centred
    adaptive-clipping bit travels in it."""
    return dim + 1 if plan.secagg and plan.adaptive_clip else dim


def secure_bound(plan: PrivacyPlan, dim: int) -> float:
    """The L2 bound of an honest device's secure vector (the fixed-point encoding is sized for it):
    `upload_bound(dim)`, or with the bit sqrt(upload_bound(dim)^2 + bit_bound^2)."""
    bound = plan.upload_bound(dim)
    return float(np.hypot(bound, plan.bit_bound)) if secure_length(plan, dim) > dim else bound


def plan_for(pcfg: PrivacyConfig, run: PrivacyRun | None, expected_devices: int) -> PrivacyPlan:
    """The round's plan from the config and the run's privacy state (None without DP). Under
    adaptive clipping the update gets z_Delta of Theorem 1 and the count the rest of z."""
    adaptive = run is not None and pcfg.adaptive_clip
    z = run.ledger.noise_multiplier if run else 0.0
    return PrivacyPlan(
        dp=pcfg.dp, clip_norm=run.clip.clip_norm if run else pcfg.clip_norm,
        noise_multiplier=dp.adjusted_noise_multiplier(z, pcfg.count_noise_std) if adaptive else z,
        expected_devices=max(1, expected_devices), secagg=pcfg.secagg, codec=pcfg.codec, frac_bits=pcfg.frac_bits,
        secagg_degree=pcfg.secagg_degree, adaptive_clip=adaptive, count_noise_std=pcfg.count_noise_std if adaptive else 0.0,
    )


@dataclass(frozen=True)
class DeviceUpload:
    """What the device pipeline produces: an encoded payload (no secagg) or the float vector that
    secure aggregation masks next ([D], or [D + 1] ending in the centred bit); `unclipped`, the
    exact bit, which stays on the device; and `clip_bit`, what it releases of it outside the secure
    vector (centred, noised under distributed DP; None when it is in the vector or not asked for)."""

    payload: bytes | None
    vector: np.ndarray | None
    unclipped: bool
    clip_bit: float | None = None


def device_privatize(update: AdapterState, plan: PrivacyPlan) -> DeviceUpload:
    """Device steps 1-3 (see the module docstring)."""
    if not plan.private:
        return DeviceUpload(codec.encode(update, plan.codec), None, True)
    if plan.discrete:
        return _discrete_privatize(update, plan)
    x, unclipped = dp.privatize_update(update, plan.clip_norm, plan.device_noise_std)  # 1, 2
    bit = None
    if plan.adaptive_clip:  # b_i - 1/2, plus this device's share of the count's noise
        bit = dp.centred_bit(unclipped)
        if plan.device_count_noise_std:
            bit += float(dp.gaussian(1, plan.device_count_noise_std)[0])
    if plan.secagg:
        return DeviceUpload(None, x if bit is None else np.append(x, bit), unclipped)  # [D] or [D + 1]
    return DeviceUpload(codec.encode(dp.unflatten_update(x, update), plan.codec), None, unclipped, bit)  # 3


def _discrete_privatize(update: AdapterState, plan: PrivacyPlan) -> DeviceUpload:
    """Steps 1-3 under the distributed discrete Gaussian: clip, round at random to the grid, add
    integer noise; the centred bit likewise. An int64 vector [D] or [D + 1] in grid units, which
    `secagg.encode` only reduces mod 2^k."""
    from pocketfed.privacy import discrete

    x, unclipped = dp.privatize_update(update, plan.clip_norm, 0.0)  # 1. clip
    gamma = plan.gamma
    q = discrete.quantize(x, plan.clip_norm, gamma)  # 2. conditional stochastic rounding
    if plan.device_noise_std:  # 3. integer noise
        q = q + discrete.discrete_gaussian(q.size, (plan.device_noise_std / gamma) ** 2)
    if plan.adaptive_clip:
        bit = discrete.conditional_stochastic_round(np.array([dp.centred_bit(unclipped)]), gamma, 0.5 + gamma)
        if plan.device_count_noise_std:
            bit = bit + discrete.discrete_gaussian(1, (plan.device_count_noise_std / gamma) ** 2)
        q = np.append(q, bit)
    return DeviceUpload(None, q, unclipped)


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


def split_secure(total: np.ndarray, plan: PrivacyPlan) -> tuple[np.ndarray, float | None]:
    """The secure sum [D] or [D + 1] -> (the updates' sum [D], the centred bits' sum or None)."""
    if plan.secagg and plan.adaptive_clip:  # the last coordinate is the bits' sum (`secure_length`)
        return total[:-1], float(total[-1])
    return total, None


def bit_sum(bits: list[float | None], plan: PrivacyPlan) -> float:
    """Server step 7's sum of the released centred bits, each clamped to the bound an honest one
    holds (`PrivacyPlan.bit_bound`) so the count's sensitivity holds whatever a device sent; a
    missing bit counts 0 (neither clipped nor unclipped)."""
    bound = plan.bit_bound
    return float(sum(min(bound, max(-bound, b)) for b in bits if b is not None and np.isfinite(b)))


def clip_estimate(centred_sum: float, plan: PrivacyPlan) -> float:
    """Server step 7: b~ = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / n + 1/2; the server adds the
    noise under central DP, the devices have under distributed DP. Only b~ is ever published."""
    if plan.dp is DPMode.central and plan.count_noise_std:
        centred_sum += float(dp.gaussian(1, plan.count_noise_std)[0])
    return dp.unclipped_estimate(centred_sum, plan.expected_devices)
