"""Rank surgery on adapter states: truncate to rank r, zero-pad to rank R.

A LoRA pair of one module is A: [r, in] and B: [out, r] (PEFT keys "...lora_A.weight",
"...lora_B.weight"); its weight delta is (alpha / r) B A. Slot j is row j of A with column j of B.
    truncate(state, r): A[:r, :], B[:, :r]                  (what a rank-r device is sent)
    pad(state, R):      zero rows of A / columns of B up to R (how a rank-r update joins a rank-R sum)
A zero slot adds nothing to B A, and under AdamW its gradients are exactly zero, so a rank-r
adapter zero-padded into a rank-R model trains exactly like the rank-r adapter (that is how the
simulator, with one shared rank-R model, trains rank-r devices). A real rank-r device keeps the
global scaling alpha / R by using alpha_r = alpha * r / R (`alpha_for_rank`).
"""

from __future__ import annotations

import torch

AdapterState = dict[str, torch.Tensor]


def _kind(key: str) -> str:
    if "lora_A" in key:
        return "A"
    if "lora_B" in key:
        return "B"
    raise KeyError(f"{key!r} is not a LoRA A or B weight")


def rank_of(state: AdapterState) -> int:
    ranks = {v.shape[0] if _kind(k) == "A" else v.shape[1] for k, v in state.items()}
    if len(ranks) != 1:
        raise ValueError(f"adapter has mixed ranks {sorted(ranks)}")
    return ranks.pop()


def truncate(state: AdapterState, r: int) -> AdapterState:
    """The first r slots of every module. A: [R, in] -> [r, in]; B: [out, R] -> [out, r]."""
    return {k: (v[:r, :] if _kind(k) == "A" else v[:, :r]).clone() for k, v in state.items()}


def pad(state: AdapterState, rank: int) -> AdapterState:
    """Zero-pad every module to `rank` slots. A: [r, in] -> [rank, in]; B: [out, r] -> [out, rank]."""
    out = {}
    for k, v in state.items():
        r = v.shape[0] if _kind(k) == "A" else v.shape[1]
        if r > rank:
            raise ValueError(f"cannot pad {k} of rank {r} down to {rank}")
        if _kind(k) == "A":
            out[k] = torch.cat([v, v.new_zeros(rank - r, v.shape[1])], dim=0)
        else:
            out[k] = torch.cat([v, v.new_zeros(v.shape[0], rank - r)], dim=1)
    return out


def alpha_for_rank(alpha: float, r: int, global_rank: int) -> float:
    """LoRA alpha for a rank-r model whose scaling alpha_r / r equals the global alpha / R."""
    return alpha * r / global_rank
