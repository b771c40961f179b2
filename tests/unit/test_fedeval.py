"""Federated evaluation's maths: a device's capped sums, the totals' figures, the report checks,
the secure vector's bound and the error the secure sum adds (hand-checked numbers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pocketfed.evaluation import score_logits
from pocketfed.privacy import secagg
from pocketfed.protocol import fedeval
from pocketfed.protocol.fedeval import Sums


def test_totals_give_the_token_weighted_mean_of_the_devices_losses():
    # device 1: 3 tokens, loss 2.0 each (sum 6.0), 1 top-1 and 2 top-3 hits; device 2: 2 tokens, 0.2 each
    a, b = Sums(6.0, 3, 1, 2), Sums(0.4, 2, 2, 2)
    m = fedeval.metrics(a + b)
    assert m["loss"] == pytest.approx((3 * 2.0 + 2 * 0.2) / 5) == pytest.approx(1.28)
    assert m["perplexity"] == pytest.approx(math.exp(1.28))  # 3.5966...
    assert (m["top1"], m["top3"], m["tokens"]) == (0.6, 0.8, 5)
    assert fedeval.metrics(fedeval.ZERO) == {"loss": None, "perplexity": None, "top1": None, "top3": None, "tokens": 0.0}


@pytest.mark.parametrize("report, says", [
    (Sums(1.0, 4, 3, 2), "top1_hits (3) <= top3_hits (2)"),
    (Sums(1.0, 4, 1, 5), "<= tokens (4)"),
    (Sums(1.0, 9, 1, 1), "at most 8"),
    (Sums(1.0, 2.5, 1, 1), "whole number"),
    (Sums(-0.1, 2, 1, 1), "loss_sum is -0.1"),
    (Sums(float("nan"), 2, 1, 1), "loss_sum is nan"),
    (Sums(60.5, 2, 1, 1), "above 30 nats x 2 tokens"),
])
def test_attack_reports_no_honest_device_sends_are_refused(report, says):
    with pytest.raises(fedeval.InvalidReport, match=r".*" + says.replace("(", r"\(").replace(")", r"\)")):
        fedeval.check(report, max_tokens=8)
    assert fedeval.check(Sums(60.0, 2, 1, 1), 8) == Sums(60.0, 2, 1, 1)  # the cap itself is honest


def test_secure_vector_is_bounded_and_decodes_back():
    worst = Sums(fedeval.NLL_CAP * 512, 512, 512, 512)  # every token at the cap, every one a hit
    v = fedeval.secure_vector(worst, 512)
    np.testing.assert_allclose(v, [30.0, 1.0, 1.0, 1.0])
    assert np.linalg.norm(v) == pytest.approx(fedeval.BOUND) == pytest.approx(math.sqrt(903))
    back = fedeval.from_secure_total(fedeval.secure_vector(Sums(12.5, 7, 2, 5), 512), 512)
    assert back == Sums(12.5, 7, 2, 5)


def test_loss_error_bound_hand_checked():
    # 3 devices, f = 16, T = 512: each coordinate of the total is off by at most 512 * 3 * 2^-17 = 0.01171875
    assert fedeval.coordinate_error(3, 16, 512) == 0.01171875
    # totals L = 100, n = 50 (loss 2): |error| <= 0.01171875 * (1 + 2) / (50 - 0.01171875)
    assert fedeval.loss_error_bound(Sums(100.0, 50, 0, 0), 3, 16, 512) == pytest.approx(0.03515625 / 49.98828125)
    assert fedeval.loss_error_bound(Sums(1.0, 0.01, 0, 0), 3, 16, 512) == math.inf  # too few tokens to say


def test_the_secure_sum_of_reports_is_within_the_bound():
    reports = [Sums(41.5, 40, 9, 17), Sums(3.25, 3, 1, 2), Sums(80.0, 40, 20, 31)]
    cap, f = 40, 16
    vectors = [fedeval.secure_vector(r, cap) for r in reports]
    outcome = secagg.simulate_round(vectors, clip_norm=fedeval.BOUND, frac_bits=f, round_id=(1 << 40) + 1)
    got = fedeval.from_secure_total(np.asarray(outcome.total), cap)
    exact = reports[0] + reports[1] + reports[2]
    e = fedeval.coordinate_error(3, f, cap)
    for k, v in exact.as_dict().items():
        assert abs(got.as_dict()[k] - v) <= e, k
    loss = got.loss_sum / got.tokens
    assert abs(loss - exact.loss_sum / exact.tokens) <= fedeval.loss_error_bound(got, 3, f, cap)


def test_score_logits_caps_each_token_and_keeps_the_first_positions():
    ids = torch.tensor([[0, 1, 2, 0]])  # targets of positions 0..2: 1, 2, 0
    mask = torch.ones_like(ids, dtype=torch.bool)
    logits = torch.zeros(1, 4, 3)
    logits[..., 1] = 5.0  # the model always predicts token 1
    t = score_logits(logits, ids, mask)
    # -log p(1) = log(1 + 2 e^-5) = 0.0133857; -log p(2) = -log p(0) = log(e^5 + 2) = 5.0133857
    assert t.n == 3 and t.hit1 == 1 and t.hit3 == 3
    assert t.nll == pytest.approx(math.log(1 + 2 * math.exp(-5)) + 2 * math.log(math.exp(5) + 2))
    t = score_logits(logits, ids, mask, nll_cap=1.0, max_positions=2)  # positions 0 and 1 only, 5.01 -> 1.0
    assert (t.n, t.hit1, t.hit3) == (2, 1, 2)
    assert t.nll == pytest.approx(math.log(1 + 2 * math.exp(-5)) + 1.0)
