"""The round engine's pure steps, with hand-checked numbers (the drivers are tested elsewhere)."""

import pytest
import torch

from pocketfed import codec
from pocketfed.config import Codec, load_config
from pocketfed.privacy.budget import init_privacy
from pocketfed.privacy.pipeline import PrivacyPlan
from pocketfed.server import round as engine
from pocketfed.server import sampling, strategies

K = "m.lora_A.weight"
LIKE = {K: torch.zeros(1, 2)}


def test_decide_commits_at_goal_or_deadline_with_quorum():
    assert engine.decide(4, goal=4, quorum=2, deadline=10.0, now=0.0) == engine.Decision("commit", "goal reached")
    assert engine.decide(1, goal=4, quorum=2, deadline=10.0, now=9.9).action == "wait"
    assert engine.decide(2, goal=4, quorum=2, deadline=10.0, now=10.0).action == "commit"
    assert engine.decide(1, goal=4, quorum=2, deadline=10.0, now=10.0).action == "abort"


# ---- cohort: Poisson sampling, the rate, the cap --------------------------------------------------
def test_cohort_target_and_sample_rate():
    assert engine.cohort_target(8, 1.3) == 11  # ceil(10.4)
    assert engine.cohort_target(10, 1.3) == 13  # 13.000000000000002 is 13, not 14
    assert sampling.sample_rate(11, 100) == pytest.approx(0.11)  # q = expected / frame
    assert sampling.sample_rate(11, 5) == 1.0 and sampling.sample_rate(11, 0) == 0.0  # capped at 1; empty frame
    assert engine.planned_sample_rate(11, 110) == pytest.approx(0.1) and engine.planned_sample_rate(11, 0) == 1.0
    assert engine.min_cohort(4, secure=False) == 4 and engine.min_cohort(1, secure=True) == 2
    with pytest.raises(ValueError, match="must not be negative"):
        sampling.sample_rate(-1, 3)


def test_uniform_is_hmac_sha256_mapped_to_the_open_interval():
    import hashlib
    import hmac

    key = bytes(32)
    w = int.from_bytes(hmac.new(key, b"d0", hashlib.sha256).digest()[:8], "little")
    assert sampling.uniform(key, "d0") == ((w >> 11) + 0.5) / 2**53 == pytest.approx(0.8608077694741789)
    # d0 0.861, d1 0.222, d2 0.079, d3 0.072: at q = 1/2 the draw is d1, d2, d3 whatever the order
    assert sampling.poisson_sample(["d3", "d0", "d2", "d1"], 0.5, key) == ["d1", "d2", "d3"]
    assert sampling.poisson_sample(["d0", "d1", "d2", "d3"], 0.0722, key) == ["d3"]  # U(d3) = 0.07199 < q


def test_poisson_sample_empty_cohort_and_q_one():
    key = sampling.simulation_key(0, 0)
    frame = [f"d{i}" for i in range(50)]
    assert engine.sample_cohort(frame, 50, key) == engine.Cohort(sorted(frame), 1.0, 50)  # q = 1: everyone
    assert engine.sample_cohort(frame, 500, key).devices == sorted(frame)  # q capped at 1
    assert engine.sample_cohort([], 8, key) == engine.Cohort([], 0.0, 0)  # empty frame: q = 0
    assert sampling.poisson_sample(frame, 0.0, key) == []  # q = 0: nobody
    # an empty cohort is a possible outcome at 0 < q < 1: 3 devices at q = 1e-3 draw nobody here
    assert engine.sample_cohort(frame[:3], 0.003, key) == engine.Cohort([], pytest.approx(0.001), 3)
    with pytest.raises(ValueError, match=r"sample rate must be in \[0, 1\]"):
        sampling.poisson_sample(frame, 1.5, key)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        sampling.poisson_sample(frame, 0.5, b"short")


def test_simulation_draws_are_reproducible_per_seed_and_round():
    import hashlib

    assert sampling.simulation_key(3, 4) == hashlib.sha256(b"pocketfed/sampling/v1/3/4").digest()
    frame = [f"d{i}" for i in range(40)]
    a = engine.sample_cohort(frame, 10, sampling.simulation_key(3, 4))
    assert a == engine.sample_cohort(list(reversed(frame)), 10, sampling.simulation_key(3, 4))  # order plays no part
    assert a.devices != engine.sample_cohort(frame, 10, sampling.simulation_key(3, 5)).devices  # another round
    assert a.devices != engine.sample_cohort(frame, 10, sampling.simulation_key(4, 4)).devices  # another seed
    # a device's draw does not depend on who else is in the frame
    assert [d for d in a.devices if d != "d0"] == engine.sample_cohort(frame[1:], 39 * 10 / 40,
                                                                       sampling.simulation_key(3, 4)).devices
    # deployment keys are 32 fresh bytes each round
    assert len(sampling.fresh_key()) == 32 and sampling.fresh_key() != sampling.fresh_key()


def test_participation_cap_and_its_bound():
    assert sampling.cap_window(5, 3) == range(3, 5)  # rounds 3, 4 and this one (5) make the window
    assert sampling.cap_window(1, 3) == range(0, 1) and sampling.cap_window(5, 0) == range(0, 5)
    assert sampling.below_cap(["c", "a", "b"], [["a", "b"], ["a"]], 2) == ["b", "c"]  # a took part twice
    assert sampling.below_cap(["a", "b"], [["a", "b"], ["a"]], 0) == ["a", "b"]  # cap 0: no cap
    history = {0: ["a", "b"], 1: ["a"], 2: ["c"]}
    assert engine.sampling_frame(["a", "b", "c", "d"], history, 3, 1, 2) == ["a", "b", "d"]  # window: round 2
    assert engine.sampling_frame(["a", "b", "c", "d"], history, 3, 1, 0) == ["d"]  # the whole run
    assert engine.sampling_frame(["a", "b", "c", "d"], history, 3, 2, 0) == ["b", "c", "d"]
    # min(R, cap * ceil(R / W)): 2 per 10 of 100 rounds -> 20; 2 per 30 -> 2 * 4 = 8; 3 per 2 of 5 -> 5 (all)
    assert sampling.max_participations(100, 2, 10) == 20 and sampling.max_participations(100, 2, 30) == 8
    assert sampling.max_participations(5, 3, 2) == 5 and sampling.max_participations(10, 1, 0) == 1
    assert sampling.max_participations(10, 0, 0) is None
    cfg = load_config(None, {"sim": {"rounds": 100}, "deploy": {"max_participations": 2, "participation_window": 30}})
    assert engine.participation_bound(cfg) == 8 and engine.participation_bound(load_config()) is None


def test_cap_holds_in_every_window_of_a_sampled_run():
    """Rounds sampled at q = 1 under a cap of 2 per 3 rounds: no device takes part more than twice
    in any 3 consecutive rounds, and the frame shrinks as devices reach the cap."""
    devices, history = ["a", "b", "c", "d"], {}
    for r in range(12):
        frame = engine.sampling_frame(devices, history, r, 2, 3)
        history[r] = engine.sample_cohort(frame, 4, sampling.simulation_key(0, r)).devices
    for r in range(10):
        counts = [sum(d in history[i] for i in range(r, r + 3)) for d in devices]
        assert max(counts) <= 2
    assert history[0] == history[1] == devices and history[2] == []  # everyone at the cap in round 2


def test_empty_round_keeps_the_adapter_and_counts_for_the_accountant():
    from pocketfed.privacy import accountant

    cfg = load_config(None, {"privacy": {"dp": "central", "noise_multiplier": 1.0, "delta": 1e-5}})
    privacy = init_privacy(cfg, 0.1)
    state = strategies.init({K: torch.ones(1, 2)}, cfg.server)
    plan = engine.round_plan(cfg, privacy, 4)
    out = engine.empty_round(state, privacy, plan, 0.2)
    assert out.state.round == state.round + 1 and torch.equal(out.state.params[K], state.params[K])
    assert out.privacy is not None and out.privacy.ledger.rounds_done == 1
    # one round at the round's q = 0.2 (not the ledger's 0.1), the nominal z
    assert out.metrics["epsilon_recipients"] == pytest.approx(accountant.epsilon(1.0, 0.2, 1, 1e-5))
    assert out.metrics["sample_rate"] == 0.2 and out.metrics["skipped"]
    nobody = engine.empty_round(state, privacy, plan, 0.0)  # an empty frame: no device could be in it
    assert nobody.privacy is None and nobody.state.round == state.round + 1


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
    plan = engine.round_plan(cfg, privacy, 1)
    state = strategies.init({K: torch.zeros(1, 2)}, cfg.server)
    c = [engine.Contribution("a", {K: torch.tensor([[0.3, 0.4]])}, 5, 10)]
    rounds = 0
    while engine.budget_stop(privacy) is None:
        out = engine.commit(state, privacy, c, {K: torch.zeros(1, 2)}, cfg, plan=plan)
        state, privacy, rounds = out.state, out.privacy, rounds + 1
        assert out.metrics["epsilon_recipients"] <= 20.0 and out.metrics["unclipped_fraction"] is None
        assert out.metrics["epsilon_coordinator"] is None  # central DP: the coordinator sees each update
    assert rounds >= 2 and privacy.ledger.rounds_done == rounds
    reason = engine.stop_reason(rounds, cfg, privacy)
    assert reason is not None and "privacy budget is spent" in reason and "target_epsilon=20" in reason
    assert engine.stop_reason(1000, cfg, None) == "training is finished (1000 rounds)"
    with pytest.raises(ValueError, match="plan"):  # under DP the round's plan says what noise was added
        engine.commit(state, privacy, c, {K: torch.zeros(1, 2)}, cfg)


def test_aggregate_needs_contributions_and_the_secure_sum_when_updates_are_hidden():
    with pytest.raises(ValueError):
        engine.aggregate([], PrivacyPlan(), LIKE)
    with pytest.raises(ValueError, match="secure sum"):
        engine.aggregate([engine.Contribution("a", None, 1, 1)], PrivacyPlan(secagg=True), LIKE)
