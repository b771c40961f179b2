"""Attacks on the privacy accounting (issue 13, findings 2 and 3), each checked against dp-accounting
called directly: the epsilon reported must be the one of the noise that was actually added.

- Distributed DP with dropouts: each device adds z C / sqrt(n); with 4 of 8 surviving the sum holds
  z sqrt(4 / 8) C. The old ledger accounted z and under-reported epsilon.
- Adaptive clipping (Andrew et al., NeurIPS 2021, Theorem 1): the update's z_Delta and the count's
  sigma_b together are one Gaussian with the total z; the old ledger accounted z_Delta > z, never
  counted the count, and published the exact unclipped count.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from pocketfed.config import load_config
from pocketfed.errors import UserError
from pocketfed.privacy import accountant, pipeline
from pocketfed.privacy.budget import init_privacy
from pocketfed.protocol.messages import TrainResult
from pocketfed.server import round as engine
from pocketfed.server import strategies

K = "m.lora_A.weight"
LIKE = {K: torch.zeros(1, 2)}


def _direct_rdp(rounds: list[tuple[float, float]], delta: float) -> float:
    """dp-accounting's epsilon for rounds given as (q, z), composed one by one."""
    acct = RdpAccountant()
    for q, z in rounds:
        acct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    return float(acct.get_epsilon(delta))


def _cfg(**privacy: object):
    return load_config(None, {"privacy": {"clip_norm": 1.0, "delta": 1e-6, **privacy}, "sim": {"rounds": 1000}})


def _commit_rounds(cfg, survivors: list[int], expected: int, q: float, bits: list[float] | None = None):
    """Commit one round per entry of `survivors` through `round.commit`, as a driver does after a
    secure sum of that many devices' vectors. -> (the last outcome, the run)."""
    privacy = init_privacy(cfg, q)
    state = strategies.init({K: torch.zeros(1, 2)}, cfg.server)
    out = None
    for m in survivors:
        plan = engine.round_plan(cfg, privacy, expected)
        contributions = [engine.Contribution(f"d{i}", None if plan.secagg else {K: torch.zeros(1, 2)}, 1, 1,
                                             None if plan.secagg or bits is None else bits[i]) for i in range(m)]
        total = np.zeros(pipeline.secure_length(plan, 2)) if plan.secagg else None
        out = engine.commit(state, privacy, contributions, {K: torch.zeros(1, 2)}, cfg, plan=plan, secure_total=total)
        state, privacy = out.state, out.privacy
    return out, privacy


def test_attack_distributed_dropouts_report_the_noise_that_reached_the_sum() -> None:
    # 20 rounds at q = 0.05, z = 1, 4 of the 8 expected devices surviving each: z_eff = sqrt(1/2)
    cfg = _cfg(dp="distributed", secagg=True, noise_multiplier=1.0)
    out, privacy = _commit_rounds(cfg, [4] * 20, 8, 0.05)
    truth = _direct_rdp([(0.05, math.sqrt(0.5))] * 20, 1e-6)
    nominal = _direct_rdp([(0.05, 1.0)] * 20, 1e-6)  # what the old ledger reported
    assert out.metrics["epsilon_recipients"] == pytest.approx(truth, rel=0.01)
    assert privacy.ledger.epsilon_spent == pytest.approx(truth, rel=0.01)
    assert out.metrics["epsilon_recipients"] > 1.5 * nominal  # 6.54 against 2.97: the old report is far off


def test_attack_mixed_dropouts_compose_heterogeneously() -> None:
    # full rounds and half rounds alternate: dp-accounting's composition of both kinds
    cfg = _cfg(dp="distributed", secagg=True, noise_multiplier=1.0)
    survivors = [8, 4, 8, 6, 4, 8]
    out, privacy = _commit_rounds(cfg, survivors, 8, 0.1)
    truth = _direct_rdp([(0.1, math.sqrt(m / 8)) for m in survivors], 1e-6)
    assert out.metrics["epsilon_recipients"] == pytest.approx(truth, rel=0.01)
    assert len(privacy.ledger.rounds) == 3  # grouped by (q, z_eff): 8, 4 and 6 survivors
    # the coordinator sees the noised secure sums, unamplified: the same rounds at q = 1
    coordinator = _direct_rdp([(1.0, math.sqrt(m / 8)) for m in survivors], 1e-6)
    assert out.metrics["epsilon_coordinator"] == pytest.approx(coordinator, rel=0.01)
    # the budget stop previews the next round at the nominal z; the rounds were accounted with the
    # discrete Gaussian's rounded sensitivity (secagg + distributed DP), a factor 1 - 7.6e-6 here
    scale = engine.round_plan(cfg, privacy, 8).noise_scale(2)
    assert 1 - 1e-5 < scale < 1
    assert accountant.preview(privacy.ledger) == pytest.approx(
        _direct_rdp([(0.1, scale * math.sqrt(m / 8)) for m in survivors] + [(0.1, 1.0)], 1e-6), rel=1e-6)


def test_attack_adaptive_clipping_reports_theorem_1_epsilon() -> None:
    # z = 1 in total, sigma_b = 2.5: the update gets z_Delta = (1 - 1/25)^-1/2 = 1.0206, and the pair
    # is accounted as one Gaussian with z = 1 (the old ledger accounted z_Delta alone: less epsilon)
    cfg = _cfg(dp="central", noise_multiplier=1.0, adaptive_clip=True, count_noise_std=2.5)
    privacy = init_privacy(cfg, 0.05)
    assert engine.round_plan(cfg, privacy, 4).noise_multiplier == pytest.approx(1.0206207261596576, rel=1e-12)
    out, privacy = _commit_rounds(cfg, [4] * 10, 4, 0.05, bits=[0.5, 0.5, 0.5, -0.5])
    truth = _direct_rdp([(0.05, 1.0)] * 10, 1e-6)
    assert out.metrics["epsilon_recipients"] == pytest.approx(truth, rel=1e-6)
    assert out.metrics["epsilon_recipients"] > _direct_rdp([(0.05, 1.0206207261596576)] * 10, 1e-6) * 1.01
    assert out.metrics["epsilon_coordinator"] is None  # central DP: the coordinator sees each update


def test_attack_the_exact_unclipped_count_is_never_published() -> None:
    cfg = _cfg(dp="central", noise_multiplier=1.0, adaptive_clip=True, count_noise_std=2.5)
    estimates = []
    for _ in range(5):
        out, _ = _commit_rounds(cfg, [4], 4, 0.05, bits=[0.5, 0.5, 0.5, -0.5])
        assert "unclipped" not in out.metrics
        estimates.append(out.metrics["unclipped_fraction"])
    # 3 of 4 unclipped is 0.75 exactly; the published b~ carries N(0, 2.5^2) / 4: never exactly it
    assert all(e != 0.75 for e in estimates) and len(set(estimates)) == 5


@pytest.mark.parametrize("std, z", [(0.0, 1.0), (0.5, 1.0), (0.3, 0.8)])
def test_attack_adaptive_clipping_without_enough_count_noise_is_refused(std: float, z: float) -> None:
    with pytest.raises(UserError, match=r"privacy.count_noise_std must be above privacy.noise_multiplier / 2"):
        _cfg(dp="central", noise_multiplier=z, adaptive_clip=True, count_noise_std=std)
    # a calibrated z is checked once known: epsilon 8 over 1000 rounds at q = 0.05 needs z ~ 1.2
    calibrated = _cfg(dp="central", target_epsilon=8.0, adaptive_clip=True, count_noise_std=0.1)
    with pytest.raises(UserError, match="privacy.count_noise_std must be above half the noise multiplier"):
        init_privacy(calibrated, 0.05)


def test_secure_vector_carries_the_centred_bit_and_the_mean_ignores_it() -> None:
    # central DP with secure aggregation: each device's vector is [D + 1], the bits sum in secret
    cfg = _cfg(dp="central", secagg=True, noise_multiplier=1.0, adaptive_clip=True, count_noise_std=2.5)
    privacy = init_privacy(cfg, 0.05)
    plan = engine.round_plan(cfg, privacy, 4)
    ups = [{K: torch.tensor([[0.3, 0.4]])}, {K: torch.tensor([[3.0, 4.0]])}, {K: torch.tensor([[0.0, 0.5]])}]
    results = [TrainResult(0, f"d{i}", u, 1, upload=pipeline.device_privatize(u, plan)) for i, u in enumerate(ups)]
    assert all(r.upload.vector.shape == (3,) and r.upload.clip_bit is None for r in results)
    contributions, total, _ = engine.collect_in_memory(results, plan, LIKE, 0)
    update_sum, bits = pipeline.split_secure(total, plan)
    assert bits == pytest.approx(0.5 - 0.5 + 0.5, abs=3 * 2.0**-17)  # 2 unclipped, 1 clipped (norm 5 > 1)
    np.testing.assert_allclose(update_sum, [0.3 + 0.6 + 0.0, 0.4 + 0.8 + 0.5], atol=3 * 2.0**-17)
    with torch.no_grad():
        mean = engine.aggregate(contributions, pipeline.PrivacyPlan(**{**plan.__dict__, "noise_multiplier": 0.0}),
                                LIKE, total)
    torch.testing.assert_close(mean[K], torch.tensor([[0.9 / 4, 1.7 / 4]]), atol=1e-4, rtol=0)
    out = engine.commit(strategies.init(LIKE, cfg.server), privacy, contributions, mean, cfg, plan=plan,
                        secure_total=total)
    assert out.metrics["unclipped_fraction"] != pytest.approx(0.5 / 4 + 0.5, abs=1e-9)  # noised by sigma_b
    assert out.privacy.clip.clip_norm != privacy.clip.clip_norm
