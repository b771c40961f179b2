"""Defenses against malicious devices: norm bounding and Byzantine-robust aggregation. Pure maths
over decoded updates; the round engine (`pocketfed.server.round`) applies them in both drivers.

Norm bounding (Sun, Kairouz, Suresh, McMahan 2019, "Can You Really Backdoor Federated Learning?"):
each update is clipped on the server, Delta_i <- Delta_i * min(1, M / ||Delta_i||_2), with M the
smaller of a fixed bound (`server.max_update_norm`) and a multiple k of the round's (lower) median norm
(`server.median_norm_bound`; FLAME, Nguyen et al., USENIX Security 2022, clips at k = 1). A boosted
update then weighs at most M / ||honest|| honest ones, whatever it claimed.

Aggregators over n updates x_1..x_n (flattened, [n, D]), all unweighted: a robust rule cannot trust
a device's own claim of how much it trained.
    median        coordinate-wise: for each j, the median of x_1j..x_nj (the mean of the two middle
                  values when n is even) (Yin, Chen, Ramchandran, Bartlett, ICML 2018, "Byzantine-
                  Robust Distributed Learning: Towards Optimal Statistical Rates")
    trimmed_mean  coordinate-wise: sort x_1j..x_nj, drop the b = floor(beta n) smallest and largest,
                  average the n - 2b left (Yin et al. 2018, same paper)
    krum          score(i) = sum of ||x_i - x_k||^2 over the n - f - 2 nearest other updates k;
                  the update with the lowest score (Blanchard, El Mhamdi, Guerraoui, Stainer,
                  NeurIPS 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent")
    multi_krum    the mean of the m = n - f updates with the lowest scores (same paper)
Krum's guarantee needs n > 2f + 2; a smaller cohort (its size is random under Poisson sampling) is
scored with the largest f it allows, f' = max(0, floor((n - 3) / 2)), and the diagnostics say so.
"""

from __future__ import annotations

import math

import torch

from pocketfed.config import Aggregator

AdapterState = dict[str, torch.Tensor]


def l2_norm(update: AdapterState) -> float:
    """||Delta||_2 over every tensor, in float64 (float32 squares of 3e38 would overflow)."""
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in update.values()))


def norm_bound(norms: list[float], max_norm: float, median_factor: float) -> float:
    """M = min(max_norm, median_factor * the lower median of norms), either term left out when 0; inf
    when both are. The lower median (the smaller middle value when n is even) is an honest norm or
    below one whenever fewer than half the devices attack: with two devices, one cannot raise it."""
    bounds = [max_norm] if max_norm > 0 else []
    if median_factor > 0 and norms:
        bounds.append(median_factor * sorted(norms)[(len(norms) - 1) // 2])
    return min(bounds) if bounds else math.inf


def clip(update: AdapterState, norm: float, bound: float) -> AdapterState:
    """Delta * min(1, bound / ||Delta||) given ||Delta|| = norm (scaled in float64, returned as float32)."""
    if norm <= bound:
        return update
    scale = bound / norm
    return {k: (t.double() * scale).to(t.dtype) for k, t in update.items()}


def _stack(updates: list[AdapterState]) -> torch.Tensor:
    """[n, D] float64, each row one update flattened in the first update's key order."""
    keys = list(updates[0])
    return torch.stack([torch.cat([u[k].double().reshape(-1) for k in keys]) for u in updates])


def _unstack(flat: torch.Tensor, like: AdapterState) -> AdapterState:
    out, pos = {}, 0
    for k, t in like.items():
        out[k] = flat[pos:pos + t.numel()].reshape(t.shape).to(t.dtype)
        pos += t.numel()
    return out


def median(updates: list[AdapterState]) -> AdapterState:
    x = _stack(updates)  # [n, D]
    s = x.sort(dim=0).values
    n, mid = len(updates), len(updates) // 2
    med = s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2  # [D]
    return _unstack(med, updates[0])


def trimmed_mean(updates: list[AdapterState], beta: float) -> AdapterState:
    n = len(updates)
    b = math.floor(beta * n)
    if n - 2 * b < 1:  # beta < 1/2 keeps one value at least; kept for a direct caller's beta
        raise ValueError(f"trim fraction {beta} leaves no value of {n}")
    s = _stack(updates).sort(dim=0).values  # [n, D]
    return _unstack(s[b:n - b].mean(dim=0), updates[0])


def krum_scores(updates: list[AdapterState], f: int) -> tuple[list[float], int]:
    """Each update's Krum score and the f it was computed with (f' when n <= 2f + 2)."""
    n = len(updates)
    f = min(f, max(0, (n - 3) // 2))
    k = max(1, n - f - 2)  # neighbours scored; at n <= 2 each one's only neighbour
    x = _stack(updates)
    d2 = torch.cdist(x, x).pow(2)  # [n, n] squared distances
    scores = []
    for i in range(n):
        others = torch.cat([d2[i, :i], d2[i, i + 1:]])
        scores.append(float(others.sort().values[:k].sum()) if len(others) else 0.0)
    return scores, f


def krum(updates: list[AdapterState], f: int, m: int = 1) -> tuple[AdapterState, list[int], int]:
    """The mean of the m updates with the lowest Krum scores (m = 1: Krum). -> (mean, chosen indices, f used).
    Ties go to the earlier update (updates come in device-id order)."""
    scores, f_used = krum_scores(updates, f)
    chosen = sorted(sorted(range(len(updates)), key=lambda i: (scores[i], i))[:m])
    return _unstack(_stack([updates[i] for i in chosen]).mean(dim=0), updates[0]), chosen, f_used


def aggregate(updates: list[AdapterState], rule: Aggregator, trim_fraction: float,
              byzantine: int) -> tuple[AdapterState, dict[str, float]]:
    """The robust aggregate of `updates` (not `Aggregator.mean`: the engine's own path) and diagnostics."""
    if not updates:
        raise ValueError("cannot aggregate a round without updates")
    if rule is Aggregator.median:
        return median(updates), {}
    if rule is Aggregator.trimmed_mean:
        return trimmed_mean(updates, trim_fraction), {"trimmed_per_side": float(math.floor(trim_fraction * len(updates)))}
    if rule in (Aggregator.krum, Aggregator.multi_krum):
        f = min(byzantine, max(0, (len(updates) - 3) // 2))
        m = 1 if rule is Aggregator.krum else len(updates) - f
        mean, chosen, f_used = krum(updates, byzantine, m)
        return mean, {"krum_selected": float(len(chosen)), "krum_f": float(f_used)}
    raise ValueError(f"{rule.value} is not a robust aggregator")
