"""Attack: a device that always checks in first must not take part more often than q.

First-come cohorts put such a device in every round (its real epsilon is that of q = 1 while the
ledger reports q); with Poisson sampling it is in a round with probability q like every other
device, and a round's cohort size is Binomial(frame, q). Each test is a chi-square test at
p = 1e-6 (so a correct sampler fails it once in a million runs); the critical values are
scipy.stats.chi2.isf(1e-6, df).
"""

from __future__ import annotations

import math
from collections import Counter

from pocketfed.config import load_config
from pocketfed.server import coordinator as co
from pocketfed.server import round as engine
from pocketfed.server import sampling
from tests.unit.deploy.http_fixtures import init_params

CHI2_CRIT = {1: 23.928, 7: 40.522, 8: 42.701}  # chi2.isf(1e-6, df)
ROUNDS = 1000
OK = co.Eligibility(charging=True, idle=True, unmetered=True, free_memory_mb=4096)


def chi2_rate(hits: int, n: int, q: float) -> float:
    """Pearson's statistic of `hits` in `n` Bernoulli(q) trials (two cells, one degree of freedom)."""
    return (hits - n * q) ** 2 / (n * q) + ((n - hits) - n * (1 - q)) ** 2 / (n * (1 - q))


def test_chi2_rate_hand_checked():
    # 30 hits of 100 at q = 0.25: (30 - 25)^2 / 25 + (70 - 75)^2 / 75 = 1 + 1/3
    assert math.isclose(chi2_rate(30, 100, 0.25), 4 / 3)


def test_attack_first_to_check_in_takes_part_at_rate_q_in_the_coordinator(tmp_path):
    """8 registered devices, expected cohort 2: q = 2 / 8 = 0.25. Every round, dev0 checks in first,
    then dev1..dev7, all eligible; nobody uploads, so each round aborts at its deadline (time is
    passed in) and the next is drawn. First come, first served gave dev0 (and dev1) every round."""
    cfg = load_config(None, {"sim": {"rounds": 10**6, "seed": 0},
                             "deploy": {"goal": 2, "overselect": 1.0, "quorum": 1, "deadline_s": 10.0,
                                        "retry_s": 1.0, "open_registration": True}})
    c = co.open_coordinator(tmp_path, cfg, "synthetic", init_params)
    names = [f"dev{i}" for i in range(8)]
    now = 1000.0
    for name in names:
        co.register(c, name, f"key-{name}", now)
    taken: dict[str, set[int]] = {name: set() for name in names}
    while sum(r.status != "open" for r in c.store.rounds(limit=10 * ROUNDS)) < ROUNDS:
        for name in names:  # the same order every round: dev0 is always first
            out = co.checkin(c, name, OK, now)
            if isinstance(out, co.Assignment):
                taken[name].add(out.round_id)
        now += 11.0  # past the deadline: the round aborts (no update, quorum 1) and the next opens
        co.tick(c, now)
    closed = {r.round_id for r in c.store.rounds(limit=10 * ROUNDS) if r.status != "open"}
    n, q = len(closed), 0.25
    counts = {name: len(taken[name] & closed) for name in names}
    assert chi2_rate(counts["dev0"], n, q) < CHI2_CRIT[1], (counts, n)
    # every device alike: sum of 8 (nearly independent) squared standardized counts, about chi2(8)
    stat = sum((x - n * q) ** 2 / (n * q * (1 - q)) for x in counts.values())
    assert stat < CHI2_CRIT[8], (counts, n)


def test_attack_first_in_the_frame_takes_part_at_rate_q_in_the_simulator():
    """The simulator's sampler over 1,000 rounds of a frame of 16 at q = 4 / 16: dev0, first in
    the frame's order, is sampled at rate q, and a round's size is Binomial(16, q), not a fixed
    4 (the old sampler drew exactly 4 without replacement)."""
    frame = [f"dev{i}" for i in range(16)]
    q = 0.25
    cohorts = [engine.sample_cohort(frame, 4, sampling.simulation_key(7, r)) for r in range(ROUNDS)]
    assert all(x.sample_rate == q and x.frame == 16 for x in cohorts)
    hits = sum("dev0" in x.devices for x in cohorts)
    assert chi2_rate(hits, ROUNDS, q) < CHI2_CRIT[1], hits
    # cohort sizes against Binomial(16, 1/4), the tails pooled so each cell expects >= 5 rounds:
    # cells {0,1}, 2, 3, 4, 5, 6, 7, {8..16}: 8 cells, 7 degrees of freedom
    pmf = [math.comb(16, k) * q**k * (1 - q) ** (16 - k) for k in range(17)]
    cells = [range(0, 2), range(2, 3), range(3, 4), range(4, 5), range(5, 6), range(6, 7), range(7, 8), range(8, 17)]
    sizes = Counter(len(x.devices) for x in cohorts)
    expected = [ROUNDS * sum(pmf[k] for k in cell) for cell in cells]
    observed = [sum(sizes[k] for k in cell) for cell in cells]
    assert min(expected) >= 5
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    assert stat < CHI2_CRIT[7], (observed, expected)
