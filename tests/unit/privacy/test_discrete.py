"""Distributed discrete Gaussian: sampler, conditional rounding, encoding, modulus, accounting."""

from __future__ import annotations

import math
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from pocketfed.privacy import discrete

# --------------------------------------------------------------------------- discrete Gaussian


def test_discrete_gaussian_pmf_matches_exp_over_z_by_chi_square() -> None:
    sigma_sq, n = 1.5, 200_000
    # Z = sum_k exp(-k^2 / 3), summed directly; Poisson summation says it is sqrt(2 pi 1.5) = 3.0699801
    # up to 2 exp(-2 pi^2 1.5) ~ 3e-13 (relative).
    z = sum(math.exp(-k * k / (2 * sigma_sq)) for k in range(-60, 61))
    assert z == pytest.approx(3.0699801238, abs=1e-9)
    pmf = {k: math.exp(-k * k / (2 * sigma_sq)) / z for k in range(-6, 7)}
    assert pmf[0] == pytest.approx(1 / 3.0699801238, abs=1e-10)  # 0.325735...
    y = discrete.discrete_gaussian(n, sigma_sq, seed=11)
    clipped = np.clip(y, -6, 6)  # the two edge bins take the tails (expected mass ~1e-7)
    observed = np.array([np.sum(clipped == k) for k in range(-6, 7)])
    expected = np.array([pmf[k] for k in range(-6, 7)]) * n
    expected[0] += n * (1 - sum(pmf.values())) / 2
    expected[-1] += n * (1 - sum(pmf.values())) / 2
    chi_square = float(np.sum((observed - expected) ** 2 / expected))
    assert chi_square < 32.9  # chi-square, 12 degrees of freedom, p = 0.001
    # Symmetry: P[Y > 0] = P[Y < 0]; |#pos - #neg| has std sqrt(n (1 - pmf(0))) ~ 367.
    assert abs(int(np.sum(y > 0)) - int(np.sum(y < 0))) < 5 * math.sqrt(n)
    assert y.dtype == np.int64


def test_discrete_gaussian_mean_zero_variance_sigma_sq_at_large_sigma() -> None:
    sigma_sq, n = 1e8, 200_000  # sigma = 1e4, the regime of real updates
    y = discrete.discrete_gaussian(n, sigma_sq, seed=5)
    # mean: std sigma / sqrt(n) = 22.4; variance: relative std sqrt(2 / n) = 0.32 %
    assert abs(y.mean()) < 5 * 1e4 / math.sqrt(n)
    assert y.var() / sigma_sq == pytest.approx(1.0, abs=5 * math.sqrt(2 / n))
    assert abs(np.mean(y > 0) - np.mean(y < 0)) < 0.01


def test_discrete_gaussian_edge_cases_and_errors() -> None:
    np.testing.assert_array_equal(discrete.discrete_gaussian(4, 0.0), np.zeros(4, dtype=np.int64))
    assert discrete.discrete_gaussian(0, 9.0).shape == (0,)
    with pytest.raises(ValueError, match="sigma_sq"):
        discrete.discrete_gaussian(3, -1.0)
    with pytest.raises(ValueError, match="sigma_sq"):
        discrete.discrete_gaussian(3, float("nan"))
    with pytest.raises(ValueError, match="count"):
        discrete.discrete_gaussian(-1, 1.0)


def test_seeded_calls_reproduce_and_unseeded_calls_do_not() -> None:
    a = discrete.discrete_gaussian(1000, 100.0, seed=7)
    np.testing.assert_array_equal(a, discrete.discrete_gaussian(1000, 100.0, seed=7))
    assert not np.array_equal(a, discrete.discrete_gaussian(1000, 100.0, seed=8))
    assert not np.array_equal(discrete.discrete_gaussian(1000, 100.0), discrete.discrete_gaussian(1000, 100.0))
    x = np.linspace(-0.3, 0.3, 200)
    r = discrete.conditional_stochastic_round(x, 0.01, 10.0, seed=3)
    np.testing.assert_array_equal(r, discrete.conditional_stochastic_round(x, 0.01, 10.0, seed=3))
    assert not np.array_equal(discrete.conditional_stochastic_round(x, 0.01, 10.0),
                              discrete.conditional_stochastic_round(x, 0.01, 10.0))
    w = discrete.encode(x, 1.0, 0.01, 25.0, 20, seed=9)
    np.testing.assert_array_equal(w, discrete.encode(x, 1.0, 0.01, 25.0, 20, seed=9))
    assert not np.array_equal(discrete.encode(x, 1.0, 0.01, 25.0, 20), discrete.encode(x, 1.0, 0.01, 25.0, 20))


# --------------------------------------------------------------------------- conditional rounding


def test_rounded_l2_bound_hand_checked() -> None:
    # c = 3, d = 4, beta = exp(-1/2): sqrt(2 ln(1/beta)) = 1, so D2^2 = 9 + 4/4 + 1 * (3 + 2/2) = 14,
    # below the deterministic (3 + 2)^2 = 25.
    assert discrete.rounded_l2_bound(3.0, 4) == pytest.approx(math.sqrt(14), abs=1e-12)
    assert discrete.rounded_l2_bound(3.0, 4, beta=0.0) == 5.0  # deterministic c + sqrt(d)
    # beta = 1e-300: sqrt(2 ln 1e300) = 37.17, D2^2 = 1 + 1/4 + 37.17 * 1.5 = 57 > (1 + 1)^2: the min is 2.
    assert discrete.rounded_l2_bound(1.0, 1, beta=1e-300) == 2.0
    # D1 = D2 min(sqrt(d), D2): sqrt(14) * 2 for d = 4; 1.5 * 1.5 for d = 100.
    assert discrete.rounded_l1_bound(math.sqrt(14), 4) == pytest.approx(2 * math.sqrt(14))
    assert discrete.rounded_l1_bound(1.5, 100) == pytest.approx(2.25)
    with pytest.raises(ValueError, match="beta"):
        discrete.rounded_l2_bound(3.0, 4, beta=1.0)
    with pytest.raises(ValueError, match="dim"):
        discrete.rounded_l2_bound(3.0, 0)


def test_stochastic_rounding_is_unbiased() -> None:
    gamma = 0.1
    v = np.array([0.25, -0.6, 1.3, 0.0, 0.5, -2.75])  # x / gamma
    bound = gamma * (np.linalg.norm(v) + math.sqrt(v.size))  # deterministic bound: never conditions
    draws = np.array([discrete.conditional_stochastic_round(v * gamma, gamma, bound, seed=i) for i in range(4000)])
    # Each coordinate is floor(v) + Bernoulli(frac): std of the mean <= 0.5 / sqrt(4000) = 0.0079.
    np.testing.assert_allclose(draws.mean(axis=0), v, atol=0.035)
    assert set(np.unique(draws[:, 0])) == {0, 1} and set(np.unique(draws[:, 3])) == {0}
    assert set(np.unique(draws[:, 5])) == {-3, -2}


def test_conditional_rounding_never_exceeds_the_bound() -> None:
    # v_i = 0.5 on d = 100: ||x~||^2 = #ups ~ Bin(100, 1/2), mean 50, std 5. beta = 0.9 gives
    # D2^2 = 25 + 25 + sqrt(2 ln(1/0.9)) (5 + 5) = 54.59, so ~18 % of first draws are redrawn.
    gamma, d, beta = 0.01, 100, 0.9
    x = np.full(d, 0.5 * gamma)
    d2 = discrete.rounded_l2_bound(0.5 * math.sqrt(d), d, beta)
    assert d2**2 == pytest.approx(50 + 10 * math.sqrt(2 * math.log(1 / 0.9)), abs=1e-9)
    sq_norms = [int(np.sum(discrete.conditional_stochastic_round(x, gamma, gamma * d2, seed=i) ** 2))
                for i in range(500)]
    assert max(sq_norms) <= 54 < d2**2
    assert np.mean(np.array(sq_norms) == 54) > 0.03  # the bound is reached, so it is binding
    # A bound rounding cannot meet raises after the retry budget, naming the bound.
    with pytest.raises(ValueError, match="norm bound"):
        discrete.conditional_stochastic_round(np.full(4, 1.5), 1.0, 1.0, seed=0)
    with pytest.raises(ValueError, match="gamma"):
        discrete.conditional_stochastic_round(x, 0.0, 1.0)


def test_quantize_clips_then_rounds_within_the_accounted_bound() -> None:
    x = np.array([30.0, 40.0])  # norm 50, clipped to C = 1 -> (0.6, 0.8), /gamma = (6, 8): exact
    np.testing.assert_array_equal(discrete.quantize(x, 1.0, 0.1), [6, 8])
    rng = np.random.default_rng(0)  # test data only
    for i in range(50):
        q = discrete.quantize(rng.normal(size=300), 1.0, 1 / 64, seed=i)
        assert np.linalg.norm(q) <= discrete.rounded_l2_bound(64.0, 300)


# --------------------------------------------------------------------------- encoding and modulus


def test_modulus_bits_hand_checked() -> None:
    # n = 5, C = 1, gamma = 2^-8, d = 50, beta = exp(-1/2): D2^2 = 256^2 + 12.5 + (256 + 3.54) = 65808.0,
    # D2 = 256.53 -> 5 * 256 = 1280, bit_length 11, k = 12.
    assert discrete.modulus_bits(5, 1.0, 2**-8, 50, 0.0) == 12
    # sigma^2 = 4: T = sqrt(2 * 5 * 4 * ln(2 * 50 / 1e-15)) = sqrt(40 * 39.14) = 39.6 -> 1280 + 40 < 2^11.
    assert discrete.noise_tail(5, 4.0, 50, 1e-15) == pytest.approx(math.sqrt(40 * math.log(1e17)), rel=1e-12)
    assert discrete.modulus_bits(5, 1.0, 2**-8, 50, 4.0) == 12
    # sigma^2 = 1e4: T = sqrt(1e5 * 39.14) = 1978.5 -> 1280 + 1979 = 3259 needs 12 bits, k = 13.
    assert discrete.modulus_bits(5, 1.0, 2**-8, 50, 1e4) == 13
    with pytest.raises(ValueError, match="64"):
        discrete.modulus_bits(1000, 1.0, 2**-60, 10, 1.0)
    with pytest.raises(ValueError, match="n "):
        discrete.modulus_bits(0, 1.0, 0.1, 10, 1.0)


def test_sum_of_encoded_devices_without_noise_decodes_to_the_sum_of_rounded_inputs() -> None:
    n, d, clip, gamma = 7, 50, 1.0, 2**-8
    bits = discrete.modulus_bits(n, clip, gamma, d, 0.0)
    rng = np.random.default_rng(1)  # test data only
    xs = [rng.normal(size=d) * s for s in (0.01, 0.1, 1.0, 3.0, 0.5, 2.0, 0.05)]
    words = [discrete.encode(x, clip, gamma, 0.0, bits, seed=u) for u, x in enumerate(xs)]
    assert words[0].dtype == np.uint32
    total = np.zeros(d, dtype=np.uint64)
    for w in words:
        total = (total + w.astype(np.uint64)) & np.uint64(2**bits - 1)
    rounded = sum(discrete.quantize(x, clip, gamma, seed=u) for u, x in enumerate(xs))
    np.testing.assert_array_equal(discrete.decode_int(total, bits), rounded)
    np.testing.assert_array_equal(discrete.decode(total, gamma, bits), rounded * gamma)
    # and the decoded sum is within n gamma per coordinate of the exact sum of clipped inputs
    exact = sum(x * min(1.0, clip / np.linalg.norm(x)) for x in xs)
    assert np.max(np.abs(discrete.decode(total, gamma, bits) - exact)) < n * gamma


def test_decode_int_centres_residues_hand_checked() -> None:
    # k = 4: residues 0..7 are themselves, 8..15 are -8..-1.
    np.testing.assert_array_equal(discrete.decode_int(np.array([0, 7, 8, 15], dtype=np.uint32), 4), [0, 7, -8, -1])
    top = np.array([2**63, 2**64 - 1, 5], dtype=np.uint64)
    np.testing.assert_array_equal(discrete.decode_int(top, 64), [-(2**63), -1, 5])
    w = discrete.encode(np.array([-0.5, 0.25]), 1.0, 0.25, 0.0, 40)  # (-2, 1) on the grid, exact
    assert w.dtype == np.uint64
    np.testing.assert_array_equal(discrete.decode_int(w, 40), [-2, 1])
    with pytest.raises(ValueError, match="bits"):
        discrete.encode(np.zeros(2), 1.0, 0.25, 0.0, 65)


def test_modulus_bits_never_wraps_on_worst_case_inputs_and_one_bit_less_does() -> None:
    # Every device puts its whole norm C on coordinate 0, same sign: the largest possible |sum|.
    n, d, clip, gamma, sigma_sq = 20, 16, 1.0, 1 / 16, 9.0
    bits = discrete.modulus_bits(n, clip, gamma, d, sigma_sq)
    assert bits == 10  # D2 = sqrt(256 + 4 + 18) = 16.67; 20 * 16 + ceil(T = 117.0) = 437 -> 9 bits + sign
    worst_seen = 0
    for trial in range(150):
        sign = 1.0 if trial % 2 else -1.0
        x = np.zeros(d)
        x[0] = sign * clip
        words = [discrete.encode(x, clip, gamma, sigma_sq, bits, seed=1000 * trial + u) for u in range(n)]
        total = np.zeros(d, dtype=np.uint64)
        for w in words:
            total = (total + w.astype(np.uint64)) & np.uint64(2**bits - 1)
        truth = sum(discrete.decode_int(w, bits) for w in words)  # each device alone is far from 2^(k-1)
        np.testing.assert_array_equal(discrete.decode_int(total, bits), truth)
        worst_seen = max(worst_seen, int(np.max(np.abs(truth))))
        # One bit fewer would wrap the signal 20 * 16 = 320 > 2^8: the check above can fail.
        short = total & np.uint64(2 ** (bits - 1) - 1)
        assert not np.array_equal(discrete.decode_int(short, bits - 1), truth)
    assert 2 ** (bits - 3) < worst_seen < 2 ** (bits - 1)  # k is not wastefully large either


# --------------------------------------------------------------------------- accounting


def test_tau_hand_checked() -> None:
    # n = 3, sigma^2 = 1: tau = 10 (exp(-2 pi^2 / 2) + exp(-2 pi^2 2/3)) = 10 (5.1723e-5 + 1.9276e-6).
    assert discrete.tau(3, 1.0) == pytest.approx(10 * (math.exp(-(math.pi**2)) + math.exp(-4 * math.pi**2 / 3)), rel=1e-14)
    assert discrete.tau(3, 1.0) == pytest.approx(5.365033e-4, rel=1e-6)
    assert discrete.tau(1, 1.0) == 0.0  # one discrete Gaussian is exactly discrete Gaussian
    # sigma^2 = 25: the k = 1 term 10 exp(-pi^2 25) = 10 exp(-246.7) = 7e-107 dominates; real settings are far beyond.
    assert discrete.tau(100, 25.0) == pytest.approx(10 * math.exp(-25 * math.pi**2), rel=1e-9)
    with pytest.raises(ValueError, match="sigma_int_sq"):
        discrete.tau(3, 0.5)
    with pytest.raises(ValueError, match="num_devices"):
        discrete.tau(0, 4.0)


def test_rdp_curve_hand_checked_each_term_can_win() -> None:
    # n = 2, sigma^2 = 1, D2 = D1 = 2, d = 3: s = sqrt(2), D2/s = sqrt(2), D1/s = sqrt(2),
    # tau = 10 exp(-pi^2) = 5.1723e-4.
    t = 10 * math.exp(-(math.pi**2))
    curve = discrete.rdp_curve([2, 10], num_devices=2, sigma_int_sq=1.0, l2_sens=2.0, l1_sens=2.0, dim=3)
    # alpha = 2: terms 2 + 3 tau = 2.0015517, (2 + 2 sqrt(2) tau + 3 tau^2) = 2.0014638,
    # (sqrt(2) + sqrt(3) tau)^2 = 2.0025347: the second (L1) term wins.
    assert curve[0] == pytest.approx(2 + 2 * math.sqrt(2) * t + 3 * t**2, rel=1e-14)
    assert curve[0] == pytest.approx(2.0014638, abs=1e-7)
    # alpha = 10: 10 + 3 tau = 10.0015517 beats 5 * 2.0014638 and 5 * 2.0025347: the first term wins.
    assert curve[1] == pytest.approx(10 + 3 * t, rel=1e-14)
    with pytest.raises(ValueError, match="orders"):
        discrete.rdp_curve([1.0], num_devices=2, sigma_int_sq=1.0, l2_sens=2.0, l1_sens=2.0, dim=3)


def test_epsilon_equals_the_gaussian_when_tau_vanishes() -> None:
    # n = 4, sigma^2 = 25 (tau ~ 1e-107), C = 9, gamma = 1, d = 1, beta = 0: D2 = 9 + 1 = 10,
    # so the RDP is alpha * 100 / (2 * 100) = alpha / 2, the Gaussian's with z = sqrt(4 * 25) / 10 = 1.
    kwargs: dict[str, Any] = dict(num_devices=4, sigma_int_sq=25.0, clip_norm=9.0, gamma=1.0, dim=1, beta=0.0)
    eps = discrete.epsilon(rounds=1, delta=1e-5, **kwargs)
    assert discrete.effective_noise_multiplier(4, 25.0, 10.0) == 1.0
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.0))
    assert eps == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    # By hand: min over alpha of alpha/2 + ln(1 - 1/alpha) - ln(delta alpha)/(alpha - 1) ~ 4.7284 (optimum
    # near alpha = 5.6), below the classical rho + 2 sqrt(rho ln(1/delta)) = 0.5 + 4.7985 = 5.2985.
    a = np.linspace(1.01, 50, 200_000)
    assert eps == pytest.approx(float(np.min(a / 2 + np.log1p(-1 / a) - np.log(1e-5 * a) / (a - 1))), abs=2e-4)
    assert eps == pytest.approx(4.7285, abs=1e-4) and eps < 0.5 + 2 * math.sqrt(0.5 * math.log(1e5))
    assert discrete.epsilon(rounds=0, delta=1e-5, **kwargs) == 0.0
    assert discrete.tau_is_negligible(4, 25.0, 1, rounds=1000)
    assert not discrete.tau_is_negligible(3, 1.0, 1000, rounds=1)  # 1000 * 5.4e-4 = 0.54


def test_subsampled_rdp_hand_checked_and_between_the_tight_gaussian_and_unsampled() -> None:
    def gaussian(alpha: int) -> float:
        return alpha / 2.0  # z = 1

    # alpha = 2: (1 - q)(1 + q) + q^2 e^{eps(2)} = 1 + q^2 (e - 1): ln(1.0171828) = 0.0170369 at q = 0.1,
    # which is also the exact subsampled Gaussian at order 2.
    assert discrete.subsampled_rdp(2, 0.1, gaussian) == pytest.approx(math.log1p(0.01 * (math.e - 1)), rel=1e-12)
    assert discrete.subsampled_rdp(2, 0.1, gaussian) == pytest.approx(0.0170369, abs=1e-7)
    assert discrete.subsampled_rdp(5, 1.0, gaussian) == 2.5
    kwargs: dict[str, Any] = dict(num_devices=4, sigma_int_sq=25.0, clip_norm=9.0, gamma=1.0, dim=1, beta=0.0)
    sampled = discrete.epsilon(rounds=100, delta=1e-5, sampling_rate=0.1, **kwargs)
    unsampled = discrete.epsilon(rounds=100, delta=1e-5, **kwargs)
    accountant = RdpAccountant(orders=list(discrete.SUBSAMPLED_ORDERS))
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 100))
    tight = accountant.get_epsilon(1e-5)
    assert tight < sampled < unsampled  # 7.90 < 9.82 < 96.1
    assert sampled == pytest.approx(9.8234, abs=1e-3)
    with pytest.raises(ValueError, match="sampling_rate"):
        discrete.epsilon(rounds=1, delta=1e-5, sampling_rate=0.0, **kwargs)
    with pytest.raises(ValueError, match="integer orders"):
        discrete.subsampled_rdp(2.5, 0.1, gaussian)  # type: ignore[arg-type]
