"""Secure-aggregation cost at SmolLM2-135M's LoRA size (r=8 on q_proj and v_proj: 460,800 floats).

For each cohort it runs one in-process round (`pocketfed.privacy.secagg.simulate_round`) and
reports the mean per-device compute, the mean bytes each device sends over the four protocol
steps, the server's compute, and the same for plain float32 summation. Full graphs up to 100
devices and a SecAgg+ graph of degree 2 ceil(log2 n) (Bell et al., 2020) at 100.

Run alone: `.venv/bin/python bench/bench_secagg.py`; `run()` returns the rows for bench/run.py.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from pocketfed.privacy.dp import clip_vector
from pocketfed.privacy.secagg import error_bound, simulate_round

DIM = 460_800  # SmolLM2-135M: 30 layers x (q_proj 8x576+576x8 + v_proj 8x576+192x8) = 460,800
CLIP = 1.0
FRAC_BITS = 16

# (devices, neighbour degree or None for the full graph, fraction dropping before masking)
CASES: list[tuple[int, int | None, float]] = [
    (10, None, 0.0),
    (50, None, 0.0),
    (100, None, 0.0),
    (100, 2 * math.ceil(math.log2(100)), 0.0),
    (100, 2 * math.ceil(math.log2(100)), 0.1),
]


def _one(devices: int, degree: int | None, dropout: float, vectors: list[np.ndarray]) -> dict[str, Any]:
    dropped = set(range(0, devices, round(1 / dropout))) if dropout else set()
    out = simulate_round(vectors, clip_norm=CLIP, frac_bits=FRAC_BITS, neighbours=degree,
                         dropout_before_masking=dropped, round_id=1)

    start = time.perf_counter()
    plain = np.zeros(DIM, dtype=np.float64)
    for u in sorted(out.included):
        plain += vectors[u]
    plain_seconds = time.perf_counter() - start
    exact = np.sum([clip_vector(vectors[u], CLIP) for u in sorted(out.included)], axis=0)
    return {
        "devices": devices,
        "graph": "full" if degree is None else f"SecAgg+ degree {degree}",
        "dropped_before_masking": len(dropped),
        "dimension": DIM,
        "modulus_bits": out.bits,
        # means over the devices whose input is in the sum (dropped ones stop early)
        "device_compute_s": round(float(np.mean([out.device_seconds[u] for u in out.included])), 4),
        "device_bytes_sent": int(np.mean([out.device_bytes_sent[u] for u in out.included])),
        "plain_bytes_sent": DIM * 4,
        "server_s": round(out.server_seconds, 4),
        "plain_sum_s": round(plain_seconds, 4),
        "max_abs_error": float(np.abs(out.total - exact).max()),
        "error_bound": error_bound(devices, FRAC_BITS),
    }


def run() -> list[dict[str, Any]]:
    """One row per case; about a minute on two CPU cores."""
    rng = np.random.default_rng(0)  # benchmark inputs only; masks come from the CSPRNG
    largest = max(n for n, _, _ in CASES)
    # small updates, a few of them large enough to be clipped
    vectors = [(rng.standard_normal(DIM) * (1e-3 if u % 10 else 5e-3)).astype(np.float32)
               for u in range(largest)]
    return [_one(n, degree, dropout, vectors[:n]) for n, degree, dropout in CASES]


if __name__ == "__main__":
    for row in run():
        print(row)
