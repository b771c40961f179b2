"""Who trains when: the population split, per-round client sampling, per-device seeds.

Every function takes its randomness as an explicit seed, so a resumed run, a Ray run and a
deployment with the same seed sample and train exactly alike.
"""

from __future__ import annotations

import hashlib

import numpy as np

from pocketfed.errors import UserError


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


def sample_round(pool: list[str], per_round: int, seed: int, round_: int) -> list[str]:
    """The devices of round `round_`: a uniform sample without replacement, from a generator
    seeded by (seed, round) so a resumed run samples exactly as an uninterrupted one."""
    k = len(pool) if per_round == 0 else min(per_round, len(pool))
    rng = np.random.default_rng([seed, round_, 0x5A])
    return sorted(pool[i] for i in rng.choice(len(pool), size=k, replace=False))
