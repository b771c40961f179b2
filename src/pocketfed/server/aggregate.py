"""One round's aggregation with the privacy pipeline made visible.

Device side, in this order, for each result (pure calls; the same ones a real device makes):
    1. clip      Delta_i <- Delta_i * min(1, C / ||Delta_i||)                 (DP or secagg)
    2. noise     + N(0, (z C)^2 / n)                                         (distributed DP)
    3. quantize + mask   fixed-point, masked mod 2^k                          (secagg)
       or encode         the codec (float32 / float16 / int8)                 (no secagg)
Server side:
    4. sum       secure sum (learns only the sum) or plain decoded sum
    5. noise     + N(0, (z C)^2)                                             (central DP)
    6. mean      sum / n_expected under DP (a fixed denominator keeps the sensitivity at C / n),
                 otherwise the token-weighted mean (FedAvg)

Without DP or secure aggregation the update is weighted by tokens; with either, every device
weighs the same (the server cannot see, or must not depend on, per-device weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pocketfed import codec
from pocketfed.config import DPMode, PrivacyConfig
from pocketfed.privacy import dp, secagg
from pocketfed.server.strategies import WeightedUpdate, weighted_mean

AdapterState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Aggregate:
    mean: AdapterState
    bytes_up_per_device: int
    unclipped: int  # devices whose update was not clipped (for adaptive clipping)
    devices: int


def aggregate_round(
    updates: list[WeightedUpdate],
    pcfg: PrivacyConfig,
    clip_norm: float,
    noise_multiplier: float,
    expected_devices: int,
    round_id: int,
) -> Aggregate:
    like = updates[0].update
    n = len(updates)
    private = pcfg.dp is not DPMode.none or pcfg.secagg
    if not private:
        # 3. encode -> the wire -> 4. decode (checked against the schema) and a token-weighted mean
        payloads = [codec.encode(u.update, pcfg.codec) for u in updates]
        decoded = [WeightedUpdate(codec.decode(p, like), u.weight) for p, u in zip(payloads, updates)]
        return Aggregate(weighted_mean(decoded), max(map(len, payloads)), n, n)

    std = device_noise_std(pcfg, clip_norm, noise_multiplier, expected_devices)
    vectors, unclipped = [], 0
    for u in updates:
        x, is_unclipped = dp.privatize_update(u.update, clip_norm, std)  # 1. clip, 2. the device's noise share
        unclipped += is_unclipped
        vectors.append(x)

    if pcfg.secagg:  # 3-4. fixed-point, masked, summed mod 2^k; the server learns only the sum
        outcome = secagg.simulate_round(
            vectors, clip_norm=secagg_bound(clip_norm, std, len(vectors[0])), frac_bits=pcfg.frac_bits,
            round_id=round_id, neighbours=pcfg.secagg_degree or None,
        )
        total, bytes_up = outcome.total, max(outcome.device_bytes_sent.values())
    else:
        payloads = [codec.encode(dp.unflatten_update(x, like), pcfg.codec) for x in vectors]
        total = np.sum([dp.flatten_update(codec.decode(p, like)) for p in payloads], axis=0)
        bytes_up = max(map(len, payloads))
    mean = private_mean(total, pcfg, clip_norm, noise_multiplier, expected_devices if pcfg.dp is not DPMode.none else n, like)
    return Aggregate(mean, bytes_up, unclipped, n)


def device_noise_std(pcfg: PrivacyConfig, clip_norm: float, noise_multiplier: float, expected_devices: int) -> float:
    """Step 2's std on each device: z C / sqrt(n_expected) under distributed DP, else 0."""
    if pcfg.dp is not DPMode.distributed:
        return 0.0
    return dp.distributed_noise_std(noise_multiplier, clip_norm, expected_devices)


def secagg_bound(clip_norm: float, noise_std: float, dim: int) -> float:
    """The L2 bound the fixed-point encoding must hold: C, or C plus the noise's tail bound."""
    return dp.noised_norm_bound(clip_norm, noise_std, dim) if noise_std else clip_norm


def private_mean(total: np.ndarray, pcfg: PrivacyConfig, clip_norm: float, noise_multiplier: float,
                 denominator: int, like: AdapterState) -> AdapterState:
    """Server steps 5-6 on the (secure or plain) sum [D]: central noise N(0, (z C)^2 I), then / n."""
    if pcfg.dp is DPMode.central:  # 5. the server's noise, once, on the sum
        total = dp.add_gaussian_noise(total, dp.central_noise_std(noise_multiplier, clip_norm))
    return dp.unflatten_update(total / denominator, like)  # 6.
