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

    vectors, unclipped = [], 0
    for u in updates:
        clipped, norm = dp.clip_update(u.update, clip_norm)  # 1. clip
        unclipped += dp.is_unclipped(norm, clip_norm)
        x = dp.flatten_update(clipped)
        if pcfg.dp is DPMode.distributed:  # 2. each device's share of the noise
            x = dp.add_gaussian_noise(x, dp.distributed_noise_std(noise_multiplier, clip_norm, expected_devices))
        vectors.append(x)

    if pcfg.secagg:  # 3-4. fixed-point, masked, summed mod 2^k; the server learns only the sum
        bound = clip_norm
        if pcfg.dp is DPMode.distributed:
            std = dp.distributed_noise_std(noise_multiplier, clip_norm, expected_devices)
            bound = dp.noised_norm_bound(clip_norm, std, len(vectors[0]))
        outcome = secagg.simulate_round(
            vectors, clip_norm=bound, frac_bits=pcfg.frac_bits, round_id=round_id,
            neighbours=pcfg.secagg_degree or None,
        )
        total, bytes_up = outcome.total, max(outcome.device_bytes_sent.values())
    else:
        payloads = [codec.encode(dp.unflatten_update(x, like), pcfg.codec) for x in vectors]
        total = np.sum([dp.flatten_update(codec.decode(p, like)) for p in payloads], axis=0)
        bytes_up = max(map(len, payloads))

    if pcfg.dp is DPMode.central:  # 5. the server's noise, once, on the sum
        total = dp.add_gaussian_noise(total, dp.central_noise_std(noise_multiplier, clip_norm))
    denominator = expected_devices if pcfg.dp is not DPMode.none else n  # 6.
    mean = dp.unflatten_update(total / denominator, like)
    return Aggregate(mean, bytes_up, unclipped, n)
