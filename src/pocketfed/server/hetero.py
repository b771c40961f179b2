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

`aggregate(updates, rank, inner, renormalize)` wraps any aggregation function `inner`
(e.g. pocketfed.server.aggregate.aggregate_round with its privacy pipeline) by composition.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from pocketfed.model import rank as rank_ops
from pocketfed.server.aggregate import Aggregate
from pocketfed.server.strategies import WeightedUpdate

AdapterState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RankedUpdate:
    update: AdapterState  # rank `rank`
    weight: float  # training tokens
    rank: int


def for_device(global_params: AdapterState, rank: int) -> AdapterState:
    """What a rank-r device is sent: the global adapter truncated to rank r."""
    return rank_ops.truncate(global_params, rank)


def slot_scale(updates: list[RankedUpdate], rank: int) -> torch.Tensor:
    """[rank] factors sum_k n_k / sum_{k: r_k > j} n_k that turn the plain mean into per-slot means."""
    total = sum(u.weight for u in updates)
    held = torch.tensor([sum(u.weight for u in updates if u.rank > j) for j in range(rank)], dtype=torch.float64)
    return torch.where(held > 0, total / held.clamp_min(1e-300), torch.zeros_like(held))


def aggregate(updates: list[RankedUpdate], rank: int, inner: Callable[[list[WeightedUpdate]], Aggregate],
              renormalize: bool = True) -> Aggregate:
    """Zero-pad every update to `rank`, aggregate with `inner`, then (renormalize) rescale each slot."""
    agg = inner([WeightedUpdate(rank_ops.pad(u.update, rank), u.weight) for u in updates])
    if not renormalize or all(u.rank == rank for u in updates):
        return agg
    s = slot_scale(updates, rank)
    mean = {}
    for k, v in agg.mean.items():
        f = s.to(v.dtype)
        mean[k] = v * f[:, None] if "lora_A" in k else v * f[None, :]  # A: [R, in]; B: [out, R]
    return dataclasses.replace(agg, mean=mean)
