"""Differential-privacy primitives: L2 clipping, Gaussian noise, adaptive clipping.

The device-side order is clip -> noise -> quantize -> mask (see `pocketfed.privacy.secagg`).
Everything here is a pure function; the only state is `AdaptiveClipState`, passed in and out.

Clipping (per device, Abadi et al., CCS 2016; McMahan et al., ICLR 2018 "DP-FedAvg"):
    clip(x, C) = x * min(1, C / ||x||_2)
An adapter update (dict name -> tensor) is flattened in sorted key order, so its L2 norm is
the norm of the concatenation of all tensors.

Gaussian mechanism with noise multiplier z and clip norm C:
    central:      the server adds N(0, (z C)^2 I) once to the sum of clipped updates;
    distributed:  each of n devices adds N(0, (z C)^2 / n I), so the sum of the n noises is
                  N(0, (z C)^2 I) (variances add). If only m < n devices survive, the sum has
                  std z C sqrt(m / n), and the accountant charges the round z sqrt(m / n)
                  (`pocketfed.privacy.accountant.effective_noise_multiplier`).

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021, "Differentially Private
Learning with Adaptive Clipping", Algorithm 1 and Theorem 1), for a target unclipped quantile gamma,
learning rate eta and the expected cohort n:
    b_i = 1[ ||Delta_i|| <= C ] - 1/2                   (centred bit: sensitivity 1/2, not 1)
    b~  = (sum_i b_i + N(0, sigma_b^2)) / n + 1/2       (noised fraction of unclipped updates)
    C  <- C * exp(-eta * (b~ - gamma))                  (geometric update)
Centring makes the count's sensitivity 1/2 under add-or-remove (a device adds +-1/2), so the count is
a Gaussian mechanism with multiplier 2 sigma_b. With the update's multiplier
    z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)            (Theorem 1; needs sigma_b > z / 2)
the pair (update, count) has exactly the privacy of one Gaussian mechanism with multiplier z
(the Renyi divergences of the two add: z^-2 = z_Delta^-2 + (2 sigma_b)^-2), which is what the
accountant composes. Under distributed DP each device adds N(0, sigma_b^2 / n) to its centred bit.

Noise source: AES-256-CTR keystream (a cryptographically secure PRG) keyed from
`secrets.token_bytes(32)`, turned into uniforms on (0, 1) with 53-bit resolution and then into
normals by Box-Muller (Box & Muller, 1958). `numpy.random` is never used. An explicit `seed`
exists for tests only. Caveat: floating-point Gaussian samplers leak through their low-order bits
(Mironov, CCS 2012, for Laplace; Holohan & Braghin, 2021, for Gaussian); a discrete Gaussian
(Canonne, Kamath, Steinke, 2020) would close that gap and is left for later.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
from collections.abc import Mapping

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# --------------------------------------------------------------------------- clipping


def l2_norm(x: np.ndarray) -> float:
    """L2 norm of a flat vector, accumulated in float64."""
    return float(np.linalg.norm(np.asarray(x, dtype=np.float64).ravel()))


def clip_vector(x: np.ndarray, clip_norm: float) -> np.ndarray:
    """Return x * min(1, clip_norm / ||x||) as float64 (same shape); a zero vector is unchanged."""
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    x64 = np.asarray(x, dtype=np.float64)
    norm = l2_norm(x64)
    return x64 * (clip_norm / norm) if norm > clip_norm else x64.copy()


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of an adapter update: the norm of all tensors concatenated (sorted key order)."""
    return math.sqrt(sum(float(update[k].double().pow(2).sum()) for k in sorted(update)))


def clip_update(
    update: Mapping[str, torch.Tensor], clip_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """Clip an adapter update to L2 norm `clip_norm` as one flat vector.

    Returns (clipped update with the input dtypes, norm before clipping). The norm is what the
    device needs for the adaptive-clipping bit `norm <= clip_norm`; it must not be sent.
    """
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    norm = update_norm(update)
    scale = clip_norm / norm if norm > clip_norm else 1.0
    clipped = {k: (v.double() * scale).to(v.dtype) for k, v in sorted(update.items())}
    return clipped, norm


def flatten_update(update: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Concatenate an update's tensors in sorted key order into one float64 vector [D]."""
    parts = [update[k].detach().cpu().double().reshape(-1).numpy() for k in sorted(update)]
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten_update(
    flat: np.ndarray, like: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Inverse of `flatten_update`: split [D] back into tensors shaped and typed like `like`."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = torch.from_numpy(np.array(flat[offset : offset + n])).reshape(like[k].shape)
        out[k] = out[k].to(like[k].dtype)
        offset += n
    if offset != len(flat):
        raise ValueError(f"flat vector has {len(flat)} values, the update shape needs {offset}")
    return out


def privatize_update(update: Mapping[str, torch.Tensor], clip_norm: float, noise_std: float
                     ) -> tuple[np.ndarray, bool]:
    """Device steps 1-2 of the pipeline: clip to C, flatten [D], add this device's N(0, noise_std^2 I).

    noise_std is 0 unless DP is distributed (then `distributed_noise_std`). Returns the vector and
    the adaptive-clipping bit `is_unclipped(norm, C)`. The simulator and the real device call this.
    """
    clipped, norm = clip_update(update, clip_norm)
    x = flatten_update(clipped)
    if noise_std:
        x = add_gaussian_noise(x, noise_std)
    return x, is_unclipped(norm, clip_norm)


def noised_norm_bound(clip_norm: float, noise_std: float, dim: int, tail: float = 10.0) -> float:
    """An L2 bound that a clipped-then-noised vector exceeds with probability <= exp(-tail^2/2).

    ||x + g|| <= C + ||g|| and, g ~ N(0, s^2 I_d) being s-Lipschitz in ||.||,
    P(||g|| >= s (sqrt(d) + t)) <= exp(-t^2 / 2) (Gaussian concentration, e.g. Vershynin,
    High-Dimensional Probability, 2018, Thm 5.2.2 with E||g|| <= s sqrt(d)). Use it as the
    secure-aggregation clip bound when devices add distributed noise before masking.
    """
    return clip_norm + noise_std * (math.sqrt(dim) + tail)


# --------------------------------------------------------------------------- noise


def _keystream(nbytes: int, seed: int | None) -> bytes:
    """AES-256-CTR keystream; the key comes from `secrets` unless a test seed is given."""
    if seed is None:
        key = secrets.token_bytes(32)
    else:
        key = hashlib.sha256(b"pocketfed/dp/test-seed/" + str(seed).encode()).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return encryptor.update(bytes(nbytes)) + encryptor.finalize()


def uniform_open01(count: int, seed: int | None = None) -> np.ndarray:
    """`count` uniforms on the open interval (0, 1): (w >> 11 + 1/2) / 2^53 for CSPRNG words w."""
    words = np.frombuffer(_keystream(8 * count, seed), dtype=np.uint64)
    return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def gaussian(shape: tuple[int, ...] | int, std: float, seed: int | None = None) -> np.ndarray:
    """Samples of N(0, std^2) with the given shape, from the CSPRNG by Box-Muller.

    z0 = sqrt(-2 ln u1) cos(2 pi u2),  z1 = sqrt(-2 ln u1) sin(2 pi u2)  for u1, u2 ~ U(0, 1).
    Without `seed` every call draws a fresh key from `secrets`; `seed` is for tests only.
    """
    if std < 0:
        raise ValueError(f"std must be non-negative, got {std}")
    count = int(np.prod(shape))
    pairs = (count + 1) // 2
    u = uniform_open01(2 * pairs, seed)
    radius = np.sqrt(-2.0 * np.log(u[:pairs]))
    angle = 2.0 * math.pi * u[pairs:]
    z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]
    return (std * z).reshape(shape)


def central_noise_std(noise_multiplier: float, clip_norm: float) -> float:
    """Std of the noise the server adds once to the sum: z * C."""
    return noise_multiplier * clip_norm


def distributed_noise_std(noise_multiplier: float, clip_norm: float, num_devices: int) -> float:
    """Std each of n devices adds so that the sum of n noises has std z * C: z * C / sqrt(n)."""
    if num_devices < 1:
        raise ValueError(f"num_devices must be at least 1, got {num_devices}")
    return noise_multiplier * clip_norm / math.sqrt(num_devices)


def add_gaussian_noise(x: np.ndarray, std: float, seed: int | None = None) -> np.ndarray:
    """x + N(0, std^2 I) in float64 (same shape)."""
    return np.asarray(x, dtype=np.float64) + gaussian(np.shape(x), std, seed)


# --------------------------------------------------------------------------- adaptive clipping


@dataclasses.dataclass(frozen=True)
class AdaptiveClipState:
    """Adaptive clipping state (Andrew et al., 2021): the clip norm and how it moves.

    clip_norm: current C. target_quantile: gamma, the fraction of updates to leave unclipped.
    learning_rate: eta of the geometric update. count_noise_std: sigma_b, the noise on the
    centred count (the pipeline adds it: `pocketfed.privacy.pipeline.clip_estimate`).
    """

    clip_norm: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float = 0.0

    def __post_init__(self) -> None:
        if not self.clip_norm > 0 or not math.isfinite(self.clip_norm):
            raise ValueError(f"clip_norm must be a positive number, got {self.clip_norm}")
        if not 0.0 <= self.target_quantile <= 1.0:
            raise ValueError(f"target_quantile must be in [0, 1], got {self.target_quantile}")
        if self.learning_rate <= 0 or self.count_noise_std < 0:
            raise ValueError("learning_rate must be positive and count_noise_std non-negative")


def is_unclipped(norm: float, clip_norm: float) -> bool:
    """The device's bit 1[||Delta_i|| <= C]; it leaves the device only centred and noised."""
    return norm <= clip_norm


def centred_bit(unclipped: bool) -> float:
    """b_i - 1/2 in {-1/2, +1/2}: adding or removing a device moves the sum by at most 1/2."""
    return 0.5 if unclipped else -0.5


def unclipped_estimate(noised_centred_sum: float, expected_devices: int) -> float:
    """b~ = (sum_i (b_i - 1/2) + noise) / n + 1/2 over the expected cohort n (Andrew et al. 2021,
    Algorithm 1): a fixed denominator keeps the sensitivity; with m < n devices it is biased
    towards 1/2 by (n - m) / (2 n), the price of not publishing m."""
    if expected_devices < 1:
        raise ValueError(f"expected_devices must be at least 1, got {expected_devices}")
    return noised_centred_sum / expected_devices + 0.5


def adapt_clip(state: AdaptiveClipState, estimate: float) -> AdaptiveClipState:
    """One geometric step C <- C exp(-eta (b~ - gamma)) from the noised estimate b~."""
    if not math.isfinite(estimate):
        raise ValueError(f"the unclipped estimate must be a finite number, got {estimate}")
    new_clip = state.clip_norm * math.exp(-state.learning_rate * (estimate - state.target_quantile))
    return dataclasses.replace(state, clip_norm=new_clip)


def adjusted_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2): the update's share of a total multiplier z
    (Andrew et al., NeurIPS 2021, Theorem 1)."""
    if not noise_multiplier > 0:
        raise ValueError(f"the total noise multiplier must be positive, got {noise_multiplier}")
    if not (count_noise_std > 0 and count_noise_std > noise_multiplier / 2):
        raise ValueError(f"privacy.count_noise_std must be above privacy.noise_multiplier / 2 = "
                         f"{noise_multiplier / 2:g} for the count to fit in the total noise "
                         f"multiplier {noise_multiplier:g}, got {count_noise_std:g}")
    return (noise_multiplier**-2 - (2.0 * count_noise_std) ** -2) ** -0.5
