"""The privacy pipeline, one function per side, against hand-computed numbers."""

import math

import numpy as np
import pytest
import torch

from pocketfed import codec
from pocketfed.config import Codec, DPMode
from pocketfed.privacy.pipeline import (
    PrivacyPlan,
    bit_sum,
    clip_estimate,
    device_privatize,
    finish,
    plain_mean,
    secure_bound,
    secure_length,
    server_sum,
    split_secure,
)

K = "m.lora_A.weight"


def upd(*values: float) -> dict[str, torch.Tensor]:
    return {K: torch.tensor([values], dtype=torch.float32)}


def test_plan_refuses_what_no_round_can_use():
    for bad in (dict(clip_norm=0.0), dict(clip_norm=float("inf")), dict(noise_multiplier=-1.0),
                dict(noise_multiplier=float("nan")), dict(expected_devices=0)):
        with pytest.raises(ValueError):
            PrivacyPlan(**bad)


def test_device_noise_share_and_upload_bound():
    plan = PrivacyPlan(dp=DPMode.distributed, clip_norm=2.0, noise_multiplier=1.0, expected_devices=4)
    assert plan.device_noise_std == pytest.approx(1.0)  # z C / sqrt(n) = 1 * 2 / 2
    # C + s (sqrt(d) + 10) for d = 16: 2 + 1 * (4 + 10)
    assert plan.upload_bound(16) == pytest.approx(16.0)
    central = PrivacyPlan(dp=DPMode.central, clip_norm=2.0, noise_multiplier=1.0, expected_devices=4)
    assert central.device_noise_std == 0.0 and central.upload_bound(16) == 2.0  # the server adds the noise
    assert not PrivacyPlan().private and PrivacyPlan(secagg=True).private


def test_device_side_plain_clipped_and_secure():
    plain = device_privatize(upd(3.0, 4.0), PrivacyPlan(codec=Codec.float32))
    assert plain.vector is None and plain.unclipped
    torch.testing.assert_close(codec.decode(plain.payload, upd(0, 0))[K], torch.tensor([[3.0, 4.0]]))

    # ||(3, 4)|| = 5 > C = 1: scaled by 1/5 to (0.6, 0.8), and the adaptive-clipping bit says clipped
    clipped = device_privatize(upd(3.0, 4.0), PrivacyPlan(dp=DPMode.central, clip_norm=1.0))
    assert not clipped.unclipped
    torch.testing.assert_close(codec.decode(clipped.payload, upd(0, 0))[K], torch.tensor([[0.6, 0.8]]))

    secure = device_privatize(upd(0.3, 0.4), PrivacyPlan(secagg=True, clip_norm=1.0))
    assert secure.payload is None and secure.unclipped  # 0.5 <= 1: left as it is, to be masked next
    np.testing.assert_allclose(secure.vector, [0.3, 0.4], rtol=1e-6)


def test_server_side_clips_again_sums_and_divides():
    central = PrivacyPlan(dp=DPMode.central, clip_norm=1.0, noise_multiplier=0.0, expected_devices=4)
    # a device that skipped its clipping: (3, 4) -> (0.6, 0.8); an honest one (0.3, 0.4) stays
    total = server_sum([upd(3.0, 4.0), upd(0.3, 0.4)], central)
    np.testing.assert_allclose(total, [0.9, 1.2])
    # under DP the denominator is the expected cohort (4), not the 2 received
    torch.testing.assert_close(finish(total, central, 2, upd(0, 0))[K], torch.tensor([[0.225, 0.3]]))
    # secure aggregation alone: the mean over the received
    secure = PrivacyPlan(secagg=True)
    torch.testing.assert_close(finish(np.array([0.9, 1.2]), secure, 2, upd(0, 0))[K], torch.tensor([[0.45, 0.6]]))


def test_central_noise_has_std_z_times_c():
    plan = PrivacyPlan(dp=DPMode.central, clip_norm=0.5, noise_multiplier=2.0, expected_devices=1)
    like = {K: torch.zeros(1, 20_000)}
    noised = finish(np.zeros(20_000), plan, 1, like)[K]
    assert float(noised.std()) == pytest.approx(1.0, rel=0.03)  # z C = 2 * 0.5


def test_plain_mean_weighs_by_tokens():
    mean = plain_mean([upd(1.0, 1.0), upd(3.0, 3.0)], [1.0, 3.0])
    torch.testing.assert_close(mean[K], torch.tensor([[2.5, 2.5]]))  # (1 * 1 + 3 * 3) / 4
    with pytest.raises(ValueError):
        plain_mean([upd(1.0)], [0.0])
    assert math.isclose(float(plain_mean([upd(2.0)], [5.0])[K]), 2.0)


def test_adaptive_bit_noise_share_and_secure_vector_bounds():
    plan = PrivacyPlan(dp=DPMode.distributed, clip_norm=2.0, noise_multiplier=1.0, expected_devices=4, secagg=True,
                       adaptive_clip=True, count_noise_std=2.0)
    assert plan.device_count_noise_std == pytest.approx(1.0)  # sigma_b / sqrt(n) = 2 / 2
    assert plan.bit_bound == pytest.approx(11.5)  # 1/2 + 1 * (sqrt(1) + 10)
    assert secure_length(plan, 16) == 17  # the centred bit rides as one more coordinate
    # hypot(C + s (sqrt(16) + 10) + 2^-16 sqrt(16), 11.5): the discrete Gaussian's rounding may add
    # 2^-16 per coordinate; hypot(16, 11.5) = sqrt(388.25) = 19.70406... without it
    assert secure_bound(plan, 16) == pytest.approx(math.hypot(16 + 4 * 2.0**-16, 11.5), rel=1e-12)
    central = PrivacyPlan(dp=DPMode.central, clip_norm=2.0, noise_multiplier=1.0, expected_devices=4,
                          adaptive_clip=True, count_noise_std=2.0)
    assert central.device_count_noise_std == 0.0 and central.bit_bound == 0.5  # the server adds sigma_b
    assert secure_length(central, 16) == 16 and secure_bound(central, 16) == 2.0  # no secagg: the bit is a metric
    plain = PrivacyPlan(dp=DPMode.distributed, clip_norm=2.0, noise_multiplier=1.0, expected_devices=4, secagg=True)
    assert secure_length(plain, 16) == 16 and secure_bound(plain, 16) == pytest.approx(16.0 + 4 * 2.0**-16)
    with pytest.raises(ValueError, match="count_noise_std"):
        PrivacyPlan(count_noise_std=-1.0)


def test_device_releases_only_the_centred_bit():
    # central DP, no secagg: the exact centred bit as the metric (the server adds the count's noise)
    central = PrivacyPlan(dp=DPMode.central, clip_norm=1.0, adaptive_clip=True, count_noise_std=2.0)
    up = device_privatize(upd(3.0, 4.0), central)
    assert up.clip_bit == -0.5 and not up.unclipped and up.vector is None
    assert device_privatize(upd(0.3, 0.4), central).clip_bit == 0.5
    # secure aggregation: the bit is the vector's last coordinate and nothing travels in the clear
    secure = PrivacyPlan(dp=DPMode.central, clip_norm=1.0, secagg=True, adaptive_clip=True, count_noise_std=2.0)
    up = device_privatize(upd(0.3, 0.4), secure)
    assert up.clip_bit is None
    np.testing.assert_allclose(up.vector, [0.3, 0.4, 0.5], rtol=1e-6)
    # distributed: the bit carries this device's share N(0, sigma_b^2 / n) of the count's noise
    dist = PrivacyPlan(dp=DPMode.distributed, clip_norm=1.0, noise_multiplier=1.0, expected_devices=4, secagg=True,
                       adaptive_clip=True, count_noise_std=2.0)
    # (under secagg the vector is on the integer grid 2^-16 of the distributed discrete Gaussian)
    bits = np.array([device_privatize(upd(0.3, 0.4), dist).vector[-1] for _ in range(400)]) * 2.0**-16
    assert bits.mean() == pytest.approx(0.5, abs=4 * 1.0 / 20)  # 4 standard errors of 1 / sqrt(400)
    assert bits.std() == pytest.approx(1.0, rel=0.15)
    # without adaptive clipping nothing about the norm leaves the device
    assert device_privatize(upd(3.0, 4.0), PrivacyPlan(dp=DPMode.central, clip_norm=1.0)).clip_bit is None


def test_server_count_split_clamped_and_estimated():
    secure = PrivacyPlan(dp=DPMode.distributed, clip_norm=1.0, noise_multiplier=1.0, expected_devices=8, secagg=True,
                         adaptive_clip=True, count_noise_std=2.0)
    updates, bits = split_secure(np.array([0.9, 1.2, 1.25]), secure)
    np.testing.assert_array_equal(updates, [0.9, 1.2])
    assert bits == 1.25
    assert split_secure(np.array([0.9, 1.2]), PrivacyPlan(secagg=True)) == (pytest.approx([0.9, 1.2]), None)
    # (1.25 + 0) / 8 + 1/2: distributed DP adds no server noise
    assert clip_estimate(1.25, secure) == pytest.approx(0.65625, abs=1e-15)
    central = PrivacyPlan(dp=DPMode.central, clip_norm=1.0, noise_multiplier=1.0, expected_devices=8,
                          adaptive_clip=True, count_noise_std=2.0)
    # a device claiming 100 counts as 1/2; a missing or non-finite bit as 0
    assert bit_sum([100.0, -0.5, None, float("nan"), 0.5], central) == pytest.approx(0.5)
    estimates = np.array([clip_estimate(0.0, central) for _ in range(400)])  # + N(0, 2^2) / 8 around 1/2
    assert estimates.std() == pytest.approx(0.25, rel=0.15) and abs(estimates.mean() - 0.5) < 4 * 0.25 / 20
