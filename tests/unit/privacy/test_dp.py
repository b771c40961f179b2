"""DP primitives: clipping, CSPRNG Gaussian noise, distributed noise, adaptive clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from pocketfed.privacy import dp


def test_clip_vector_hand_checked() -> None:
    clipped = dp.clip_vector(np.array([3.0, 4.0]), 1.0)  # norm 5 -> 1, same direction
    np.testing.assert_allclose(clipped, [0.6, 0.8], rtol=0, atol=1e-15)
    assert dp.l2_norm(clipped) == pytest.approx(1.0, abs=1e-15)
    small = np.array([0.3, 0.4])  # norm 0.5 < 1: unchanged
    np.testing.assert_array_equal(dp.clip_vector(small, 1.0), small)
    np.testing.assert_array_equal(dp.clip_vector(np.zeros(3), 1.0), np.zeros(3))
    with pytest.raises(ValueError, match="clip_norm"):
        dp.clip_vector(small, 0.0)


def test_clip_update_flattens_in_sorted_key_order() -> None:
    update = {"b.lora_B": torch.tensor([3.0]), "a.lora_A": torch.tensor([[0.0, 4.0]])}
    np.testing.assert_array_equal(dp.flatten_update(update), [0.0, 4.0, 3.0])  # a before b
    clipped, norm = dp.clip_update(update, 1.0)
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(clipped["a.lora_A"], torch.tensor([[0.0, 0.8]]))
    torch.testing.assert_close(clipped["b.lora_B"], torch.tensor([0.6]))
    assert clipped["a.lora_A"].dtype == torch.float32
    same, norm = dp.clip_update({"w": torch.tensor([0.3, 0.4])}, 1.0)
    assert norm == pytest.approx(0.5) and dp.is_unclipped(norm, 1.0)
    torch.testing.assert_close(same["w"], torch.tensor([0.3, 0.4]))
    back = dp.unflatten_update(dp.flatten_update(update), update)
    assert all(torch.equal(back[k], update[k]) for k in update)


def test_gaussian_noise_moments_and_shape() -> None:
    samples = dp.gaussian((400, 500), std=2.0, seed=1)
    assert samples.shape == (400, 500)
    n = samples.size
    assert abs(samples.mean()) < 4 * 2.0 / math.sqrt(n)  # 4 standard errors
    assert samples.std() == pytest.approx(2.0, rel=0.01)  # se of std ~ 0.16%
    assert kstest(samples.ravel()[:20_000] / 2.0, "norm").pvalue > 1e-3


def test_distributed_noise_sums_to_central_std() -> None:
    z, clip, n = 1.5, 2.0, 16
    per_device = dp.distributed_noise_std(z, clip, n)
    assert per_device == pytest.approx(1.5 * 2.0 / 4)  # z C / sqrt(n) = 0.75
    assert dp.central_noise_std(z, clip) == pytest.approx(3.0)
    total = np.sum([dp.gaussian(50_000, per_device, seed=100 + i) for i in range(n)], axis=0)
    assert total.std() == pytest.approx(3.0, rel=0.02)


def test_noise_is_csprng_not_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("numpy.random used for DP noise")

    for name in ("default_rng", "normal", "standard_normal", "random", "RandomState"):
        monkeypatch.setattr(np.random, name, forbidden)
    a, b = dp.gaussian(1000, 1.0), dp.gaussian(1000, 1.0)
    assert not np.array_equal(a, b)  # unseeded: fresh key from `secrets` each call
    np.testing.assert_array_equal(dp.gaussian(1000, 1.0, seed=7), dp.gaussian(1000, 1.0, seed=7))
    assert not np.array_equal(dp.gaussian(1000, 1.0, seed=7), dp.gaussian(1000, 1.0, seed=8))
    u = dp.uniform_open01(10_000, seed=3)
    assert 0.0 < u.min() and u.max() < 1.0
    x = np.ones(5)
    assert not np.array_equal(dp.add_gaussian_noise(x, 0.1), x)


def test_centred_bits_and_estimate_hand_checked() -> None:
    # Andrew et al. 2021: b_i - 1/2, so adding or removing one device moves the sum by 1/2
    assert dp.centred_bit(True) == 0.5 and dp.centred_bit(False) == -0.5
    # 4 of 8 expected devices reached the sum, 3 unclipped, 1 clipped: sum = 3 * 0.5 - 0.5 = 1.0,
    # b~ = 1.0 / 8 + 1/2 = 0.625 (the uncentred count over n would give 3 / 8 = 0.375)
    centred = sum(dp.centred_bit(b) for b in (True, True, True, False))
    assert dp.unclipped_estimate(centred, 8) == pytest.approx(0.625, abs=1e-15)
    assert dp.unclipped_estimate(5.0, 10) == pytest.approx(1.0)  # all 10 unclipped
    assert dp.unclipped_estimate(-5.0, 10) == pytest.approx(0.0)  # none
    with pytest.raises(ValueError, match="expected_devices"):
        dp.unclipped_estimate(0.0, 0)


def test_adaptive_clip_geometric_update_hand_checked() -> None:
    state = dp.AdaptiveClipState(clip_norm=1.0, target_quantile=0.5, learning_rate=0.2)
    # b~ = 1: C <- exp(-0.2 * (1 - 0.5)) = exp(-0.1)
    shrunk = dp.adapt_clip(state, 1.0)
    assert shrunk.clip_norm == pytest.approx(0.9048374180359595, rel=1e-12)
    # b~ = 0: C <- exp(+0.1)
    assert dp.adapt_clip(state, 0.0).clip_norm == pytest.approx(1.1051709180756477, rel=1e-12)
    # at the target quantile the clip stays put
    assert dp.adapt_clip(state, 0.5).clip_norm == pytest.approx(1.0)
    # twice b~ = 1: exp(-0.2); the estimate 0.625 above: exp(-0.2 * 0.125) = 0.9753099120283326
    assert dp.adapt_clip(shrunk, 1.0).clip_norm == pytest.approx(math.exp(-0.2), rel=1e-12)
    assert dp.adapt_clip(state, 0.625).clip_norm == pytest.approx(0.9753099120283326, rel=1e-12)
    with pytest.raises(ValueError, match="finite"):
        dp.adapt_clip(state, float("nan"))


def test_theorem_1_update_noise_multiplier_hand_checked() -> None:
    # (1^-2 - (2 * 1)^-2)^-1/2 = (0.75)^-1/2; (1 - 1/25)^-1/2 = 0.96^-1/2 for sigma_b = 2.5
    assert dp.adjusted_noise_multiplier(1.0, 1.0) == pytest.approx(1.1547005383792517, rel=1e-12)
    z_delta = dp.adjusted_noise_multiplier(1.0, 2.5)
    assert z_delta == pytest.approx(1.0206207261596576, rel=1e-12)
    # the pair is one Gaussian with the total z: z_Delta^-2 + (2 sigma_b)^-2 = z^-2
    assert z_delta**-2 + (2 * 2.5) ** -2 == pytest.approx(1.0, rel=1e-12)
    for bad in (0.4, 0.5, 0.0):  # sigma_b must be above z / 2 = 0.5
        with pytest.raises(ValueError, match="privacy.count_noise_std must be above"):
            dp.adjusted_noise_multiplier(1.0, bad)


def test_noised_bound_hand_checked() -> None:
    assert dp.noised_norm_bound(1.0, 0.5, 100) == pytest.approx(1.0 + 0.5 * (10 + 10))
    x = dp.add_gaussian_noise(dp.clip_vector(np.full(400, 1.0), 1.0), 0.5, seed=2)
    assert dp.l2_norm(x) <= dp.noised_norm_bound(1.0, 0.5, 400)
