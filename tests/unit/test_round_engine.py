"""The round engine's pure steps, with hand-checked numbers (the drivers are tested elsewhere)."""

import pytest
import torch

from pocketfed import codec
from pocketfed.config import Codec, load_config
from pocketfed.privacy.budget import init_privacy
from pocketfed.privacy.pipeline import PrivacyPlan
from pocketfed.server import round as engine
from pocketfed.server import strategies

K = "m.lora_A.weight"
LIKE = {K: torch.zeros(1, 2)}


def test_decide_commits_at_goal_or_deadline_with_quorum():
    assert engine.decide(4, goal=4, quorum=2, deadline=10.0, now=0.0) == engine.Decision("commit", "goal reached")
    assert engine.decide(1, goal=4, quorum=2, deadline=10.0, now=9.9).action == "wait"
    assert engine.decide(2, goal=4, quorum=2, deadline=10.0, now=10.0).action == "commit"
    assert engine.decide(1, goal=4, quorum=2, deadline=10.0, now=10.0).action == "abort"


def test_cohort_target_and_admission():
    assert engine.cohort_target(8, 1.3) == 11  # ceil(10.4)
    assert engine.cohort_target(10, 1.3) == 13  # 13.000000000000002 is 13, not 14
    assert engine.admits(10, 11) and not engine.admits(11, 11)


def test_decode_upload_refuses_another_codec_and_bad_values():
    plan = PrivacyPlan(codec=Codec.float16)
    ok = engine.decode_upload(codec.encode({K: torch.tensor([[0.5, -0.25]])}, Codec.float16), LIKE, plan)
    torch.testing.assert_close(ok[K], torch.tensor([[0.5, -0.25]]))
    with pytest.raises(engine.InvalidUpload, match="codec float16"):
        engine.decode_upload(codec.encode({K: torch.tensor([[0.5, -0.25]])}, Codec.float32), LIKE, plan)
    with pytest.raises(engine.InvalidUpload, match="NaN or Inf"):
        engine.decode_upload(codec.encode({K: torch.tensor([[float("nan"), 0.0]])}, Codec.float16), LIKE, plan)
    with pytest.raises(engine.InvalidUpload):
        engine.decode_upload(b"not safetensors", LIKE, plan)


def test_commit_applies_the_mean_and_reports_what_was_sent():
    cfg = load_config(None, {})
    state = strategies.init({K: torch.tensor([[1.0, 1.0]])}, cfg.server)
    contributions = [engine.Contribution("a", {K: torch.tensor([[1.0, 1.0]])}, 1, 100, train_loss=2.0),
                     engine.Contribution("b", {K: torch.tensor([[3.0, 3.0]])}, 3, 120, train_loss=4.0)]
    mean = engine.aggregate(contributions, PrivacyPlan(), LIKE)
    torch.testing.assert_close(mean[K], torch.tensor([[2.5, 2.5]]))  # (1 * 1 + 3 * 3) / 4
    out = engine.commit(state, None, contributions, mean, cfg)
    torch.testing.assert_close(out.state.params[K], torch.tensor([[3.5, 3.5]]))  # w + 1.0 * Delta (FedAvg)
    assert out.state.round == 1 and out.privacy is None
    assert out.metrics["bytes_up_per_device"] == 120 and out.metrics["tokens"] == 4
    assert out.metrics["train_loss"] == pytest.approx((1 * 2.0 + 3 * 4.0) / 4)  # token-weighted: 3.5
    assert out.metrics["update_norm"] == pytest.approx(2.5 * 2**0.5)


def test_commit_steps_the_accountant_and_the_budget_stops():
    cfg = load_config(None, {"privacy": {"dp": "central", "noise_multiplier": 1.0, "target_epsilon": 20.0,
                                         "clip_norm": 1.0}, "sim": {"rounds": 1000}})
    privacy = init_privacy(cfg, 1.0)
    state = strategies.init({K: torch.zeros(1, 2)}, cfg.server)
    c = [engine.Contribution("a", {K: torch.tensor([[0.3, 0.4]])}, 5, 10, unclipped=True)]
    rounds = 0
    while engine.budget_stop(privacy) is None:
        out = engine.commit(state, privacy, c, {K: torch.zeros(1, 2)}, cfg)
        state, privacy, rounds = out.state, out.privacy, rounds + 1
        assert out.metrics["unclipped"] == 1 and out.metrics["epsilon"] <= 20.0
    assert rounds >= 2 and privacy.ledger.rounds_done == rounds
    reason = engine.stop_reason(rounds, cfg, privacy)
    assert reason is not None and "privacy budget is spent" in reason and "target_epsilon=20" in reason
    assert engine.stop_reason(1000, cfg, None) == "training is finished (1000 rounds)"


def test_aggregate_needs_contributions_and_the_secure_sum_when_updates_are_hidden():
    with pytest.raises(ValueError):
        engine.aggregate([], PrivacyPlan(), LIKE)
    with pytest.raises(ValueError, match="secure sum"):
        engine.aggregate([engine.Contribution("a", None, 1, 1)], PrivacyPlan(secagg=True), LIKE)
