"""Secure-aggregation cost at SmolLM2-135M's LoRA size (r=8 on q_proj and v_proj: 460,800 floats),
with the defences against an active server (signed keys, the devices' checks, the consistency round).

For each cohort it runs one in-process round (`pocketfed.privacy.secagg.simulate_round`) and
reports per device (means over the devices in the sum) the compute and the bytes sent over the
five protocol steps, the part of each spent on the active-adversary defences (`auth`: signing and
verifying the adverts, the key-directory check, the consistency round), the bytes received, the
server's compute, and the plain float32 upload of the same dimension. `round_compute_s` is a
device's compute plus the server's (devices run in parallel; no network); `unsigned_round_s` is the
same without the defences' share, i.e. the honest-but-curious protocol. Full graphs and SecAgg+
(configured degree 4, a minimum: the code picks 2 ceil(log2 n)).

Run alone: `.venv/bin/python bench/bench_secagg.py [--quick]`; `run()` returns the rows for bench/run.py.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from pocketfed.privacy.dp import clip_vector
from pocketfed.privacy.secagg import error_bound, simulate_round

DIM = 460_800  # SmolLM2-135M: 30 layers x (q_proj 8x576+576x8 + v_proj 8x576+192x8) = 460,800
CLIP = 1.0
FRAC_BITS = 16

# (devices, configured secagg_degree (0: full graph), fraction dropping before masking)
CASES: list[tuple[int, int, float]] = [
    (10, 0, 0.0),
    (100, 0, 0.0),
    (100, 4, 0.0),
    (100, 4, 0.1),
]
QUICK: list[tuple[int, int, float]] = [(100, 0, 0.0), (100, 4, 0.1)]


def _one(devices: int, degree: int, dropout: float, vectors: list[np.ndarray]) -> dict[str, Any]:
    dropped = set(range(0, devices, round(1 / dropout))) if dropout else set()
    out = simulate_round(vectors, clip_norm=CLIP, frac_bits=FRAC_BITS, neighbours=degree,
                         dropout_before_masking=dropped, round_id=1)

    start = time.perf_counter()
    plain = np.zeros(DIM, dtype=np.float64)
    for u in sorted(out.included):
        plain += vectors[u]
    plain_seconds = time.perf_counter() - start
    exact = np.sum([clip_vector(vectors[u], CLIP) for u in sorted(out.included)], axis=0)

    def mean(values: Any) -> float:
        return float(np.mean([values[u] for u in out.included]))

    device_s, auth_s = mean(out.device_seconds), mean(out.device_auth_seconds)
    sent, auth_sent = mean(out.device_bytes_sent), mean(out.device_auth_bytes_sent)
    round_s = device_s + out.server_seconds
    unsigned_s = round_s - auth_s - out.server_auth_seconds
    return {
        "devices": devices,
        "graph": "full" if out.degree == 0 else f"SecAgg+ degree {out.degree}",
        "threshold": out.threshold,
        "dropped_before_masking": len(dropped),
        "modulus_bits": out.bits,
        "device_compute_s": round(device_s, 4),
        "device_auth_s": round(auth_s, 4),
        "server_s": round(out.server_seconds, 4),
        "server_auth_s": round(out.server_auth_seconds, 4),
        "round_compute_s": round(round_s, 4),
        "unsigned_round_s": round(unsigned_s, 4),
        "round_time_vs_unsigned": round(round_s / unsigned_s, 4),
        "device_bytes_sent": int(sent),
        "auth_bytes_sent": int(auth_sent),
        "plain_bytes_sent": DIM * 4,
        "bytes_vs_plain": round(sent / (DIM * 4), 4),
        "device_bytes_received": int(mean(out.device_bytes_received)),
        "plain_sum_s": round(plain_seconds, 4),
        "max_abs_error": float(np.abs(out.total - exact).max()),
        "error_bound": error_bound(devices, FRAC_BITS),
    }


def run(quick: bool = False) -> list[dict[str, Any]]:
    """One row per case; a few minutes on two CPU cores (`quick`: the two 100-device rows that
    matter for the issue-13 targets)."""
    cases = QUICK if quick else CASES
    rng = np.random.default_rng(0)  # benchmark inputs only; masks come from the CSPRNG
    largest = max(n for n, _, _ in cases)
    # small updates, a few of them large enough to be clipped
    vectors = [(rng.standard_normal(DIM) * (1e-3 if u % 10 else 5e-3)).astype(np.float32)
               for u in range(largest)]
    return [_one(n, degree, dropout, vectors[:n]) for n, degree, dropout in cases]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv[1:]):
        print(row, flush=True)
