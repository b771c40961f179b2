"""The distributed discrete Gaussian inside the privacy pipeline: under distributed DP with secure
aggregation the device rounds to the grid and adds integer noise (no float noise), the secure sum
carries the integer noise of the devices that took part, and the accountant sees the rounding's
larger sensitivity. Numbers hand-checked in the comments."""

import math

import numpy as np
import pytest
import torch

from pocketfed.config import DPMode
from pocketfed.privacy import accountant, budget, discrete, dp, secagg
from pocketfed.privacy.pipeline import PrivacyPlan, device_privatize

K = "m.lora_A.weight"
D = 100


def ddg_plan(**kw) -> PrivacyPlan:
    return PrivacyPlan(**{**dict(dp=DPMode.distributed, clip_norm=1.0, noise_multiplier=1.0, expected_devices=4,
                                 secagg=True, frac_bits=16), **kw})


def test_device_vector_is_on_the_integer_grid_with_integer_noise():
    plan = ddg_plan()
    assert plan.discrete and plan.gamma == 2.0**-16
    update = {K: torch.full((1, D), 0.05)}  # norm 0.5 < C: not clipped
    up = device_privatize(update, plan)
    assert up.vector is not None and up.vector.dtype == np.int64 and up.payload is None
    noise = up.vector - 0.05 * 2**16  # 3276.8 per entry before rounding: rounded to 3276 or 3277
    # the device's share: std z C / sqrt(n) = 0.5, i.e. 0.5 * 2^16 = 32768 grid steps
    assert np.std(noise) == pytest.approx(32768, rel=0.25)
    assert up.unclipped


def test_secure_sum_of_ddg_vectors_holds_the_survivors_noise():
    """4 expected devices, 3 take part: the sum's noise has std sqrt(3) * 0.5 in float units."""
    plan = ddg_plan(noise_multiplier=2.0)  # share std = 2 * 1 / 2 = 1.0 -> sum of 3: sqrt(3)
    dim = 4000
    vectors = [device_privatize({K: torch.zeros(1, dim)}, plan).vector for _ in range(3)]
    total = secagg.run_round(vectors, clip_norm=plan.upload_bound(dim), frac_bits=plan.frac_bits,
                             rng_seed_for_tests=1)
    assert np.std(total) == pytest.approx(math.sqrt(3), rel=0.05)
    assert abs(float(np.mean(total))) < 0.1


def test_sensitivity_and_noise_scale_follow_conditional_rounding():
    plan = ddg_plan()
    c = 2.0**16  # C / gamma
    d2 = min(math.sqrt(c * c + D / 4 + math.sqrt(2 * 0.5) * (c + math.sqrt(D) / 2)), c + math.sqrt(D))
    assert plan.sensitivity(D) == pytest.approx(d2 * 2.0**-16, rel=1e-12)
    assert plan.noise_scale(D) == pytest.approx(1.0 / (d2 * 2.0**-16), rel=1e-12)
    assert plan.noise_scale(D) < 1.0
    assert plan.upload_bound(D) == pytest.approx(dp.noised_norm_bound(1.0, 0.5, D) + 2.0**-16 * 10)
    assert ddg_plan(secagg=False).noise_scale(D) == 1.0  # float noise: C is the sensitivity


def test_accountant_charges_the_rounded_sensitivity():
    plan = ddg_plan()
    ledger = accountant.PrivacyLedgerState(noise_multiplier=1.0, sample_rate=0.5, delta=1e-5, epsilon_budget=100.0)
    run = budget.PrivacyRun(ledger, dp.AdaptiveClipState(1.0))
    after = run.after_round(plan, 4, None, 0.5, dim=D)
    z = 1.0 * plan.noise_scale(D)  # all 4 expected shares arrived: z_eff = z * sqrt(4/4) * scale
    assert after.ledger.epsilon_spent == pytest.approx(accountant.epsilon(z, 0.5, 1, 1e-5), rel=1e-9)
    with pytest.raises(ValueError, match="dim"):
        run.after_round(plan, 4, None, 0.5)


def test_too_little_integer_noise_is_refused():
    plan = ddg_plan(noise_multiplier=1e-6, frac_bits=4)  # std 5e-7 / 2^-4: far below one grid step
    with pytest.raises(ValueError, match="too small"):
        plan.sensitivity(D)


def test_integer_inputs_above_the_modulus_bound_are_refused():
    bits = secagg.modulus_bits(3, 1.0, 4)
    with pytest.raises(secagg.SecAggError, match="exceeds"):
        secagg.encode(np.array([100], dtype=np.int64), 1.0, 4, bits)  # bound floor(1 * 16) + 1 = 17
    assert secagg.decode(secagg.encode(np.array([-17, 5]), 1.0, 4, bits), 4, bits).tolist() == [-17 / 16, 5 / 16]
    assert discrete.DEFAULT_BETA == pytest.approx(math.exp(-0.5))
