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
                  std z C sqrt(m / n): over-provision n by the expected dropout.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021, "Differentially Private
Learning with Adaptive Clipping"), for a target unclipped quantile gamma and learning rate eta:
    b_i = 1[ ||Delta_i|| <= C ]                         (sent by each device)
    b   = (sum_i b_i + N(0, sigma_b^2)) / m             (noised fraction of unclipped updates)
    C  <- C * exp(-eta * (b - gamma))                   (geometric update)
Spending part of the privacy budget on the count, the update noise multiplier becomes
    z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)            (their Theorem 1)
so that the pair (update, count) has the privacy of a single Gaussian mechanism with z.

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
    learning_rate: eta of the geometric update. count_noise_std: sigma_b, noise on the count.
    """

    clip_norm: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float = 0.0

    def __post_init__(self) -> None:
        if self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be positive, got {self.clip_norm}")
        if not 0.0 <= self.target_quantile <= 1.0:
            raise ValueError(f"target_quantile must be in [0, 1], got {self.target_quantile}")
        if self.learning_rate <= 0 or self.count_noise_std < 0:
            raise ValueError("learning_rate must be positive and count_noise_std non-negative")


def is_unclipped(norm: float, clip_norm: float) -> bool:
    """The device's bit b_i = 1[||Delta_i|| <= C]; the only thing about its norm it sends."""
    return norm <= clip_norm


def adapt_clip(
    state: AdaptiveClipState, num_unclipped: int, num_devices: int, seed: int | None = None
) -> AdaptiveClipState:
    """One geometric step: C <- C exp(-eta (b - gamma)), b = (count + N(0, sigma_b^2)) / m."""
    if num_devices < 1 or not 0 <= num_unclipped <= num_devices:
        raise ValueError(f"need 0 <= num_unclipped <= num_devices >= 1, got "
                         f"{num_unclipped} of {num_devices}")
    noise = float(gaussian(1, state.count_noise_std, seed)[0]) if state.count_noise_std else 0.0
    fraction = (num_unclipped + noise) / num_devices
    new_clip = state.clip_norm * math.exp(-state.learning_rate * (fraction - state.target_quantile))
    return dataclasses.replace(state, clip_norm=new_clip)


def adjusted_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2): the update's share of a total multiplier z."""
    if count_noise_std == 0:
        raise ValueError("count_noise_std must be positive to spend budget on the count")
    rest = noise_multiplier**-2 - (2.0 * count_noise_std) ** -2
    if rest <= 0:
        raise ValueError(f"count_noise_std {count_noise_std} is too small for total noise "
                         f"multiplier {noise_multiplier}: need sigma_b > z / 2")
    return rest**-0.5
