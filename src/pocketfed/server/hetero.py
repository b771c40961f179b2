"""Heterogeneous LoRA ranks: devices train the rank they can hold; the server aggregates them.

Zero-padding aggregation, after HetLoRA (Cho et al. 2024, "Heterogeneous LoRA for Federated
Fine-tuning of On-Device Foundation Models", EMNLP): the global adapter has rank R; device k is
sent the truncation of the global adapter to its rank r_k (first r_k rows of A, columns of B; see
pocketfed.model.rank) and returns an update of rank r_k; the server zero-pads every update to R and
averages. With token weights n_k, slot j (row j of A, column j of B) becomes

    plain zero-padding:  Delta_j = sum_{k: r_k > j} n_k Delta_kj / sum_k n_k
    renormalized:        Delta_j = sum_{k: r_k > j} n_k Delta_kj / sum_{k: r_k > j} n_k

A device of rank r has no opinion on slots >= r, so by default (renormalize=True) its padding
zeros do not dilute them: each slot is the token-weighted mean over the devices that hold it.
Under DP or secure aggregation the inner mean has a fixed denominator that the DP sensitivity
relies on, and the per-slot counts would be extra information, so there the plain zero-padded
mean (HetLoRA's own rule, without its sparsity weighting) is kept.

Devices zero-pad their update to R before the privacy pipeline (`TrainTask.upload_rank`), so
clipping and noise see the padded vector; the round engine (`pocketfed.server.round.aggregate`)
calls `renormalize` on the plain mean.
"""

from __future__ import annotations

import torch

from pocketfed.model import rank as rank_ops

AdapterState = dict[str, torch.Tensor]


def for_device(global_params: AdapterState, rank: int) -> AdapterState:
    """What a rank-r device is sent: the global adapter truncated to rank r."""
    return rank_ops.truncate(global_params, rank)


def slot_scale(ranks_weights: list[tuple[int, float]], rank: int) -> torch.Tensor:
    """[rank] factors sum_k n_k / sum_{k: r_k > j} n_k that turn the plain mean into per-slot means."""
    total = sum(w for _, w in ranks_weights)
    held = torch.tensor([sum(w for r, w in ranks_weights if r > j) for j in range(rank)], dtype=torch.float64)
    return torch.where(held > 0, total / held.clamp_min(1e-300), torch.zeros_like(held))


def renormalize(mean: AdapterState, ranks_weights: list[tuple[int, float]], rank: int) -> AdapterState:
    """Rescale each slot of the zero-padded plain mean to the mean over the devices that hold it.
    `ranks_weights`: each device's (rank r_k, token weight n_k)."""
    s = slot_scale(ranks_weights, rank)
    out = {}
    for k, v in mean.items():
        f = s.to(v.dtype)
        out[k] = v * f[:, None] if "lora_A" in k else v * f[None, :]  # A: [R, in]; B: [out, R]
    return out
