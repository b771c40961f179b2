"""Heterogeneous-rank aggregation (HetLoRA zero-padding) against hand-computed numbers."""

import pytest
import torch

from pocketfed.model import rank as rank_ops
from pocketfed.privacy.pipeline import PrivacyPlan, plain_mean
from pocketfed.server import hetero
from pocketfed.server.round import Contribution, aggregate

A, B = "m.lora_A.weight", "m.lora_B.weight"


def update(r: int, a: float, b: float) -> dict[str, torch.Tensor]:
    """A module with in = out = 1: A [r, 1] filled with a, B [1, r] filled with b."""
    return {A: torch.full((r, 1), a), B: torch.full((1, r), b)}


def padded(r: int, a: float, b: float, tokens: int, rank: int) -> Contribution:
    """What a rank-r device uploads: its update zero-padded to the global rank (TrainTask.upload_rank)."""
    return Contribution(f"d{r}", rank_ops.pad(update(r, a, b), rank), tokens, 0, rank=r)


# ranks 2, 4, 8 with token weights 1, 2, 1; A values 1, 2, 4; B values 10, 20, 40
UPDATES = [padded(2, 1.0, 10.0, 1, 8), padded(4, 2.0, 20.0, 2, 8), padded(8, 4.0, 40.0, 1, 8)]


def test_three_rank_groups_renormalized_per_slot():
    mean = aggregate(UPDATES, PrivacyPlan(), UPDATES[2].update)
    # slots 0-1: all three hold them: (1*1 + 2*2 + 1*4) / 4 = 9/4
    # slots 2-3: ranks 4 and 8:       (2*2 + 1*4) / 3     = 8/3
    # slots 4-7: rank 8 alone:        4
    expect_a = torch.tensor([9 / 4] * 2 + [8 / 3] * 2 + [4.0] * 4)
    torch.testing.assert_close(mean[A][:, 0], expect_a)
    torch.testing.assert_close(mean[B][0, :], 10 * expect_a)


def test_three_rank_groups_plain_zero_padding():
    """Under DP or secure aggregation the slots are not renormalized (HetLoRA's own rule)."""
    mean = plain_mean([c.update for c in UPDATES], [c.num_tokens for c in UPDATES])
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
    ups = [padded(4, 1.0, 1.0, 1, 4), padded(4, 3.0, 3.0, 3, 4)]
    mean = aggregate(ups, PrivacyPlan(), ups[0].update)
    torch.testing.assert_close(mean[A], torch.full((4, 1), 2.5))  # (1 + 9) / 4


def test_rank_zero_means_the_global_rank():
    """The coordinator knows only the ranks devices report below the global one (0 = global)."""
    ups = [padded(2, 1.0, 10.0, 1, 8), padded(4, 2.0, 20.0, 2, 8), padded(8, 4.0, 40.0, 1, 8)]
    ups[2] = Contribution("d8", ups[2].update, 1, 0, rank=0)
    torch.testing.assert_close(aggregate(ups, PrivacyPlan(), ups[2].update), aggregate(UPDATES, PrivacyPlan(), UPDATES[2].update))
