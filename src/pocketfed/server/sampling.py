"""Who trains when: the population split, Poisson sampling of each round's cohort, the
participation cap, per-device seeds.

Cohorts are Poisson samples: every device of the round's sampling frame is taken independently
with probability q. That is the sampling the accountant's amplification assumes (the sampled
Gaussian mechanism: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016; Mironov,
Talwar, Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530,
2019; in federated form, McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018, Algorithm 1: each user independently with probability q). A cohort of
the first devices to check in is another mechanism: a device that always checks in first is in
every round, q = 1 for it, whatever q the ledger assumes.

    q = min(1, expected / |frame|)                the frame: devices that may be sampled this round
    d in cohort  <=>  U(key, d) < q               U uniform on (0, 1), independent per device

U is a pseudo-random function of (key, device name): the first 64 bits of HMAC-SHA256(key, name)
(Bellare, Canetti, Krawczyk, "Keying Hash Functions for Message Authentication", CRYPTO 1996;
RFC 2104) mapped to ((w >> 11) + 1/2) / 2^53, so P(U < q) = q to within 2^-53. A device's draw
depends on the key and its name only, not on who else is in the frame or in what order.
The key is 32 bytes from `secrets` in a deployment, fresh for every round (no one, the operator
included, can predict or steer a draw), and derived from (sim.seed, round) in a simulation, so a
resumed or replayed simulation samples exactly alike.

Participation cap: a device that took part in `cap` of the rounds of the current window (the
`window` rounds up to and including this one; window 0 = the whole run) is left out of the frame.
Being left out only lowers that device's inclusion probability (to 0), so every device's
probability stays at most the round's q that the accountant is given. Over R rounds a device then
takes part in at most min(R, cap * ceil(R / window)) rounds (`max_participations`): any R
consecutive rounds split into ceil(R / window) blocks of at most `window` rounds, each within one
window.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections import Counter
from typing import Iterable

import numpy as np

from pocketfed.errors import UserError

KEY_BYTES = 32


def device_seed(seed: int, round_: int, device_id: str) -> int:
    """A device's seed for a round, derived from the run seed: independent of sampling order."""
    digest = hashlib.sha256(f"{seed}/{round_}/{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def split_population(device_ids: list[str], n_train: int, n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """(training population, held-out devices), disjoint, drawn under `seed`."""
    need = n_heldout + (n_train or 1)
    if len(device_ids) < need:
        raise UserError(
            f"the dataset has {len(device_ids)} usable devices but sim.devices={n_train} and "
            f"sim.heldout={n_heldout} need {need}"
        )
    order = np.random.default_rng(seed).permutation(len(device_ids))
    ids = [device_ids[i] for i in order]
    heldout = sorted(ids[:n_heldout])
    pool = ids[n_heldout:] if n_train == 0 else ids[n_heldout : n_heldout + n_train]
    return sorted(pool), heldout


# ---- Poisson sampling ------------------------------------------------------------------------------
def sample_rate(expected: float, frame: int) -> float:
    """q = min(1, expected / frame): the rate that samples `expected` devices on average from a
    frame of `frame` devices (all of them when there are fewer); 0 for an empty frame."""
    if expected < 0 or frame < 0:
        raise ValueError(f"expected ({expected}) and frame ({frame}) must not be negative")
    return 0.0 if frame == 0 else min(1.0, expected / frame)


def fresh_key() -> bytes:
    """A deployment round's sampling key: 32 bytes from the operating system's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def simulation_key(seed: int, round_: int) -> bytes:
    """A simulated round's sampling key, derived from (sim.seed, round): reproducible, and a
    different key (hence independent draws) for every round."""
    return hashlib.sha256(f"pocketfed/sampling/v1/{seed}/{round_}".encode()).digest()


def uniform(key: bytes, device_id: str) -> float:
    """U(key, device) on the open interval (0, 1): ((w >> 11) + 1/2) / 2^53, w the first 64 bits
    (little-endian) of HMAC-SHA256(key, device)."""
    w = int.from_bytes(hmac.new(key, device_id.encode(), hashlib.sha256).digest()[:8], "little")
    return ((w >> 11) + 0.5) * 2.0**-53


def poisson_sample(frame: Iterable[str], rate: float, key: bytes) -> list[str]:
    """The devices d of `frame` with U(key, d) < rate, sorted: each independently with
    probability `rate` (an empty cohort is a possible outcome)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"sample rate must be in [0, 1], got {rate}")
    if len(key) < 16:
        raise ValueError(f"a sampling key needs at least 16 bytes, got {len(key)}")
    return sorted(d for d in set(frame) if uniform(key, d) < rate)


# ---- participation cap -----------------------------------------------------------------------------
def cap_window(round_: int, window: int) -> range:
    """The earlier rounds whose participations count against a device's cap in round `round_`:
    the window - 1 rounds before it (window 0: every earlier round)."""
    return range(0 if window == 0 else max(0, round_ - window + 1), round_)


def below_cap(devices: Iterable[str], recent: Iterable[Iterable[str]], cap: int) -> list[str]:
    """The devices (sorted) that took part in fewer than `cap` of the `recent` rounds' cohorts
    (each given as its participants); cap 0 = no cap."""
    if cap == 0:
        return sorted(set(devices))
    counts = Counter(d for participants in recent for d in set(participants))
    return sorted(d for d in set(devices) if counts[d] < cap)


def max_participations(rounds: int, cap: int, window: int) -> int | None:
    """The most rounds one device takes part in over `rounds` rounds under a cap of `cap` per
    `window` rounds: min(rounds, cap * ceil(rounds / window)) (window 0 = the whole run); None
    without a cap (cap 0): every round."""
    if cap == 0:
        return None
    return min(rounds, cap * math.ceil(rounds / (window or rounds)))
