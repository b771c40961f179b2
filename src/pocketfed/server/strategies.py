"""Server strategies over LoRA adapter deltas, as `init` + `apply` over an explicit state.

With device updates Delta_i = w_i - w (trained minus global) and weights n_i (training tokens):

    Delta = sum_i n_i * Delta_i / sum_i n_i                      (token-weighted mean)

FedAvg (McMahan et al. 2017):      w <- w + eta * Delta               (eta = 1: plain FedAvg)
FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2), Delta as pseudo-gradient:
    m <- beta1 * m + (1 - beta1) * Delta
    FedAdam: v <- beta2 * v + (1 - beta2) * Delta^2
    FedYogi: v <- v - (1 - beta2) * Delta^2 * sign(v - Delta^2)
    w <- w + eta * m / (sqrt(v) + tau)
(no bias correction, as in the paper; v starts at tau^2, m at 0).

`apply(state, updates) -> (state, diagnostics)` keeps nothing between rounds outside `state`,
so a checkpoint is just the state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pocketfed.config import ServerConfig, Strategy

AdapterState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ServerState:
    params: AdapterState  # the global adapter
    m: AdapterState | None  # FedOpt first moment
    v: AdapterState | None  # FedOpt second moment
    round: int  # rounds applied so far


@dataclass(frozen=True)
class WeightedUpdate:
    update: AdapterState
    weight: float  # training tokens


def init(params: AdapterState, cfg: ServerConfig) -> ServerState:
    params = {k: v.clone() for k, v in params.items()}
    if cfg.strategy is Strategy.fedavg:
        return ServerState(params, None, None, 0)
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v = {k: torch.full_like(x, cfg.tau**2) for k, x in params.items()}
    return ServerState(params, m, v, 0)


def weighted_mean(updates: list[WeightedUpdate]) -> AdapterState:
    total = sum(u.weight for u in updates)
    if not updates or total <= 0:
        raise ValueError("cannot aggregate: no update with positive weight")
    keys = updates[0].update.keys()
    # Accumulate in float64 so the order of devices does not change the bits beyond float32 rounding.
    return {
        k: (sum(u.update[k].double() * u.weight for u in updates) / total).to(updates[0].update[k].dtype)
        for k in keys
    }


def apply(state: ServerState, updates: list[WeightedUpdate], cfg: ServerConfig) -> tuple[ServerState, dict[str, float]]:
    delta = weighted_mean(updates)
    return apply_mean(state, delta, cfg)


def apply_mean(state: ServerState, delta: AdapterState, cfg: ServerConfig) -> tuple[ServerState, dict[str, float]]:
    """Apply an already-aggregated mean update (e.g. from secure aggregation)."""
    diag = {"update_norm": float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())))}
    if cfg.strategy is Strategy.fedavg:
        params = {k: w + cfg.lr * delta[k] for k, w in state.params.items()}
        return replace(state, params=params, round=state.round + 1), diag
    assert state.m is not None and state.v is not None
    m = {k: cfg.beta1 * state.m[k] + (1 - cfg.beta1) * delta[k] for k in delta}
    sq = {k: delta[k] ** 2 for k in delta}
    if cfg.strategy is Strategy.fedadam:
        v = {k: cfg.beta2 * state.v[k] + (1 - cfg.beta2) * sq[k] for k in delta}
    else:  # fedyogi
        v = {k: state.v[k] - (1 - cfg.beta2) * sq[k] * torch.sign(state.v[k] - sq[k]) for k in delta}
    params = {k: w + cfg.lr * m[k] / (torch.sqrt(v[k]) + cfg.tau) for k, w in state.params.items()}
    return ServerState(params, m, v, state.round + 1), diag
