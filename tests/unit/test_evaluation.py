"""Perplexity and top-k accuracy against hand-computed numbers."""

import math

import torch

from pocketfed.evaluation import score_logits


def test_score_logits_by_hand():
    # Vocabulary of 4; one row of 3 tokens [0, 1, 2]: predictions at positions 0 and 1.
    # Position 0 logits favour token 1 (the truth): top-1 hit.
    # Position 1 logits rank tokens 0 > 1 > 2 > 3 with p(2) = 1/4: top-1 (token 0) misses, top-3 hits.
    # (exp-logits [1.6, 1.2, 1.0, 0.2] sum to 4, so p(2) = 1/4)
    logits = torch.tensor([[[0.0, math.log(3.0), 0.0, 0.0], [math.log(1.6), math.log(1.2), 0.0, math.log(0.2)], [9.0, 9.0, 9.0, 9.0]]])
    ids = torch.tensor([[0, 1, 2]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    tot = score_logits(logits, ids, mask)
    # p(1 | pos 0) = 3 / (3 + 1 + 1 + 1) = 1/2 ; p(2 | pos 1) = 1/4
    assert tot.n == 2
    assert math.isclose(tot.nll, -math.log(0.5) - math.log(0.25), rel_tol=1e-6)
    assert tot.hit1 == 1 and tot.hit3 == 2
    m = tot.metrics()
    assert math.isclose(m.perplexity, math.exp((math.log(2) + math.log(4)) / 2), rel_tol=1e-6)  # sqrt(8)


def test_masked_positions_are_not_scored():
    logits = torch.zeros(1, 3, 4)
    ids = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[True, True, False]])  # only the prediction of token 1 counts
    tot = score_logits(logits, ids, mask)
    assert tot.n == 1 and math.isclose(tot.nll, math.log(4), rel_tol=1e-6)
