"""Heterogeneous-rank aggregation (HetLoRA zero-padding) against hand-computed numbers."""

import pytest
import torch

from pocketfed.config import PrivacyConfig
from pocketfed.model import rank as rank_ops
from pocketfed.server import hetero
from pocketfed.server.aggregate import aggregate_round

A, B = "m.lora_A.weight", "m.lora_B.weight"


def update(r: int, a: float, b: float) -> dict[str, torch.Tensor]:
    """A module with in = out = 1: A [r, 1] filled with a, B [1, r] filled with b."""
    return {A: torch.full((r, 1), a), B: torch.full((1, r), b)}


def plain_inner(updates):
    return aggregate_round(updates, PrivacyConfig(), clip_norm=1.0, noise_multiplier=0.0,
                           expected_devices=len(updates), round_id=0)


# ranks 2, 4, 8 with token weights 1, 2, 1; A values 1, 2, 4; B values 10, 20, 40
UPDATES = [hetero.RankedUpdate(update(2, 1.0, 10.0), 1.0, 2),
           hetero.RankedUpdate(update(4, 2.0, 20.0), 2.0, 4),
           hetero.RankedUpdate(update(8, 4.0, 40.0), 1.0, 8)]


def test_three_rank_groups_renormalized_per_slot():
    mean = hetero.aggregate(UPDATES, 8, plain_inner, renormalize=True).mean
    # slots 0-1: all three hold them: (1*1 + 2*2 + 1*4) / 4 = 9/4
    # slots 2-3: ranks 4 and 8:       (2*2 + 1*4) / 3     = 8/3
    # slots 4-7: rank 8 alone:        4
    expect_a = torch.tensor([9 / 4] * 2 + [8 / 3] * 2 + [4.0] * 4)
    torch.testing.assert_close(mean[A][:, 0], expect_a)
    torch.testing.assert_close(mean[B][0, :], 10 * expect_a)


def test_three_rank_groups_plain_zero_padding():
    mean = hetero.aggregate(UPDATES, 8, plain_inner, renormalize=False).mean
    # every slot divides by the total weight 4: zeros of the lower ranks count
    expect_a = torch.tensor([9 / 4] * 2 + [8 / 4] * 2 + [4 / 4] * 4)
    torch.testing.assert_close(mean[A][:, 0], expect_a)
    torch.testing.assert_close(mean[B][0, :], 10 * expect_a)


def test_truncate_then_pad_round_trips_and_slots_line_up():
    g = {A: torch.arange(8.0).reshape(8, 1), B: torch.arange(8.0).reshape(1, 8) * 10}
    sent = hetero.for_device(g, 4)
    assert sent[A].shape == (4, 1) and sent[B].shape == (1, 4)
    assert sent[A][:, 0].tolist() == [0, 1, 2, 3] and sent[B][0].tolist() == [0, 10, 20, 30]
    back = rank_ops.pad(sent, 8)
    assert back[A][:, 0].tolist() == [0, 1, 2, 3, 0, 0, 0, 0] and rank_ops.rank_of(back) == 8
    # the product B A of the truncation keeps exactly the first four slots' terms
    assert float(sent[B] @ sent[A]) == sum(10 * j * j for j in range(4))
    with pytest.raises(ValueError):
        rank_ops.pad(g, 4)
    assert rank_ops.alpha_for_rank(16.0, 2, 8) / 2 == 16.0 / 8


def test_equal_ranks_are_plain_fedavg():
    ups = [hetero.RankedUpdate(update(4, 1.0, 1.0), 1.0, 4), hetero.RankedUpdate(update(4, 3.0, 3.0), 3.0, 4)]
    mean = hetero.aggregate(ups, 4, plain_inner).mean
    torch.testing.assert_close(mean[A], torch.full((4, 1), 2.5))  # (1 + 9) / 4
