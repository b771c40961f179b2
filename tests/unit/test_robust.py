"""The defenses against malicious devices, with hand-checked numbers: robust aggregators, norm
bounding, token bounds, update validation (each reason) and the non-finite round (`RoundFailed`)."""

import math

import pytest
import torch

from pocketfed import codec
from pocketfed.config import Aggregator, Codec, ServerConfig, TrainConfig, load_config
from pocketfed.errors import UserError
from pocketfed.privacy.pipeline import PrivacyPlan, device_privatize
from pocketfed.protocol.messages import TrainResult
from pocketfed.server import robust, strategies
from pocketfed.server import round as engine

K = "m.lora_A.weight"
LIKE = {K: torch.zeros(1, 3)}


def ups(*rows):
    return [{K: torch.tensor([r], dtype=torch.float32)} for r in rows]


# x1..x5, one [1, 3] tensor each; per coordinate, sorted:
#   c0: 1, 2, 3, 4, 100    c1: -5, 0, 1, 2, 10    c2: -2, -1, 0, 1, 4
FIVE = ups([1, 10, -2], [2, -5, 0], [100, 0, 1], [3, 1, 4], [4, 2, -1])


def test_coordinate_wise_median_odd_and_even():
    assert robust.median(FIVE[:3])[K].tolist() == [[2.0, 0.0, 0.0]]  # c0 1,2,100; c1 -5,0,10; c2 -2,0,1
    # n = 4: the mean of the two middle values: c0 (2+3)/2, c1 (0+1)/2, c2 (0+1)/2
    assert robust.median(FIVE[:4])[K].tolist() == [[2.5, 0.5, 0.5]]
    assert robust.median(FIVE)[K].tolist() == [[3.0, 1.0, 0.0]]


def test_trimmed_mean_cuts_floor_beta_n_at_each_end():
    # beta 0.2, n 5: b = 1, the mean of the three middle values: (2+3+4)/3, (0+1+2)/3, (-1+0+1)/3
    assert robust.trimmed_mean(FIVE, 0.2)[K].tolist() == [[3.0, 1.0, 0.0]]
    # beta 0.1, n 5: b = floor(0.5) = 0, the plain mean: 110/5, 8/5, 2/5
    torch.testing.assert_close(robust.trimmed_mean(FIVE, 0.1)[K], torch.tensor([[22.0, 1.6, 0.4]]))
    # beta 0.25, n 4: b = 1: (2+3)/2, (0+1)/2, (0+1)/2
    assert robust.trimmed_mean(FIVE[:4], 0.25)[K].tolist() == [[2.5, 0.5, 0.5]]
    with pytest.raises(ValueError, match="leaves no value"):
        robust.trimmed_mean(FIVE[:2], 0.5)


POINTS = [{K: torch.tensor([[x, 0.0, 0.0]])} for x in (0.0, 1.0, 2.0, 3.0, 20.0)]


def test_krum_scores_and_choice():
    # n 5, f 1: each scored over its n - f - 2 = 2 nearest: 0 -> 1 + 4, 1 -> 1 + 1, 2 -> 1 + 1, 3 -> 1 + 4,
    # 20 -> 17^2 + 18^2 = 613
    scores, f = robust.krum_scores(POINTS, 1)
    assert f == 1 and scores == pytest.approx([5.0, 2.0, 2.0, 5.0, 613.0])
    mean, chosen, _ = robust.krum(POINTS, 1)  # the lowest score; the tie 1 / 2 goes to the earlier
    assert chosen == [1] and mean[K].tolist() == [[1.0, 0.0, 0.0]]
    # multi-Krum: the m = n - f = 4 lowest (0, 1, 2, 3), averaged: 1.5; the outlier 20 is out
    out, diag = robust.aggregate(POINTS, Aggregator.multi_krum, 0.1, 1)
    assert out[K].tolist() == [[1.5, 0.0, 0.0]] and diag == {"krum_selected": 4.0, "krum_f": 1.0}
    # in two dimensions: distances, not coordinates: (0,0), (3,4), (0,1), (100,100); f 0, n - 2 = 2 nearest
    # (0,0): 1 + 25 = 26; (3,4): 18 + 25 = 43; (0,1): 1 + 18 = 19; (100,100): far
    pts = [{K: torch.tensor([[a, b, 0.0]])} for a, b in ((0.0, 0.0), (3.0, 4.0), (0.0, 1.0), (100.0, 100.0))]
    scores, _ = robust.krum_scores(pts, 0)
    assert scores[:3] == pytest.approx([26.0, 43.0, 19.0])
    assert robust.krum(pts, 0)[1] == [2]


def test_krum_with_a_cohort_too_small_for_f_uses_the_largest_f_it_allows():
    # n 4 needs n > 2f + 2: f 1 does not hold, f' = floor((4 - 3) / 2) = 0, so 2 neighbours are scored
    scores, f = robust.krum_scores(POINTS[:4], 1)
    assert f == 0 and scores == pytest.approx([5.0, 2.0, 2.0, 5.0])
    _, diag = robust.aggregate(POINTS[:4], Aggregator.multi_krum, 0.1, 1)
    assert diag == {"krum_selected": 4.0, "krum_f": 0.0}
    assert robust.krum(POINTS[:1], 3)[1] == [0]  # one update: itself


def test_norm_bound_and_clip():
    norms = [1.0, 2.0, 3.0, 100.0]  # lower median 2 (the smaller middle value)
    assert robust.norm_bound(norms, 0.0, 3.0) == 6.0
    assert robust.norm_bound(norms, 5.0, 3.0) == 5.0  # the smaller of the two
    assert robust.norm_bound([0.1, 1e30], 0.0, 3.0) == pytest.approx(0.3)  # two devices: the attacker cannot raise it
    assert robust.norm_bound(norms, 0.0, 0.0) == math.inf
    assert robust.norm_bound([1.0, 2.0, 4.0], 0.0, 1.0) == 2.0  # odd n: the middle value
    u = {K: torch.tensor([[3.0, 4.0, 0.0]])}  # norm 5
    assert robust.l2_norm(u) == 5.0
    assert robust.clip(u, 5.0, 2.5)[K].tolist() == [[1.5, 2.0, 0.0]]
    assert robust.clip(u, 5.0, 6.0) is u
    huge = {K: torch.full((1, 3), 3e38)}  # float32 squares would overflow; float64 does not
    assert robust.l2_norm(huge) == pytest.approx(3e38 * math.sqrt(3))
    assert torch.isfinite(robust.clip(huge, robust.l2_norm(huge), 1.0)[K]).all()


def test_token_budget():
    assert engine.token_budget(TrainConfig(steps=4, batch_size=4), 128) == 2048  # steps x batch x seq_len
    assert engine.token_budget(TrainConfig(steps=0, epochs=1.0), 128) is None  # epochs: the data fixes it


def contribution(name, update, tokens):
    return engine.Contribution(name, update, tokens, 1)


def test_defend_bounds_tokens_by_the_budget_and_norms_by_the_median():
    server = ServerConfig(median_norm_bound=3.0)
    cs = [contribution("a", {K: torch.tensor([[1.0, 0.0, 0.0]])}, 50),  # norm 1
          contribution("b", {K: torch.tensor([[0.0, 2.0, 0.0]])}, 10**10),  # norm 2, claims 10^10 tokens
          contribution("c", {K: torch.tensor([[0.0, 0.0, 300.0]])}, 80)]  # norm 300
    out = engine.defend(cs, server, PrivacyPlan(), {"a": 100, "b": 100, "c": 100})
    assert [c.num_tokens for c in out.contributions] == [50, 100, 80]  # b cut to its task's budget
    assert out.tokens_bounded == 1 and out.clipped == 1 and out.norm_bound == 6.0  # 3 x median(1, 2, 300)
    assert out.contributions[2].update[K].tolist() == [[0.0, 0.0, 6.0]]
    assert out.contributions[0].update is cs[0].update  # below the bound: untouched
    # the mean the round takes: (50 * a + 100 * b + 80 * c) / 230
    mean = engine.aggregate(out.contributions, PrivacyPlan(), LIKE)
    torch.testing.assert_close(mean[K], torch.tensor([[50 / 230, 200 / 230, 480 / 230]]))
    # epochs (no budget): each claim at most the round's median claim (80)
    assert [c.num_tokens for c in engine.defend(cs, server, PrivacyPlan(), {}).contributions] == [50, 80, 80]
    two = engine.defend(cs[:2], server, PrivacyPlan(), {}).contributions  # lower median of (50, 10^10): 50
    assert [c.num_tokens for c in two] == [50, 50]
    # a fixed bound below k x median wins
    assert engine.defend(cs, ServerConfig(max_update_norm=1.5), PrivacyPlan(), {}).norm_bound == 1.5
    # under DP only the fixed bound (the median bound would read other devices' data): none here
    dp = PrivacyPlan(dp=engine.pipeline.DPMode.central, noise_multiplier=1.0)
    assert engine.defend(cs, server, dp, {}).norm_bound is None
    off = engine.defend(cs, ServerConfig(median_norm_bound=0.0), PrivacyPlan(), {"a": 100, "b": 100, "c": 100})
    assert off.norm_bound is None and off.clipped == 0


def test_aggregate_dispatches_robust_rules_and_refuses_them_under_privacy():
    cs = [contribution(f"d{i}", u, 10 * (i + 1)) for i, u in enumerate(FIVE)]
    med = engine.aggregate(cs, PrivacyPlan(), LIKE, rule=Aggregator.median)
    assert med[K].tolist() == [[3.0, 1.0, 0.0]]  # unweighted, whatever the token claims
    tm = engine.aggregate(cs, PrivacyPlan(), LIKE, rule=Aggregator.trimmed_mean, server=ServerConfig(trim_fraction=0.2))
    assert tm[K].tolist() == [[3.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="cannot run under DP"):
        engine.aggregate(cs, PrivacyPlan(dp=engine.pipeline.DPMode.central, noise_multiplier=1.0), LIKE,
                         rule=Aggregator.krum)


def test_config_refuses_robust_aggregators_where_the_server_sees_only_the_sum():
    with pytest.raises(UserError, match="server.aggregator=median needs every update in the clear.*secagg"):
        load_config(None, {"server": {"aggregator": "median"}, "privacy": {"secagg": True}})
    with pytest.raises(UserError, match="not accounted under privacy.dp=central"):
        load_config(None, {"server": {"aggregator": "krum"}, "privacy": {"dp": "central", "noise_multiplier": 1.0}})
    with pytest.raises(UserError, match="'server.aggregator' must be one of mean, median"):
        load_config(None, {"server": {"aggregator": "bulyan"}})
    with pytest.raises(UserError, match=r"server.trim_fraction must be in \[0, 0.5\), got 0.5"):
        load_config(None, {"server": {"trim_fraction": 0.5}})
    with pytest.raises(UserError, match="server.median_norm_bound must be 0 .* got 0.5"):
        load_config(None, {"server": {"median_norm_bound": 0.5}})
    with pytest.raises(UserError, match="server.max_update_norm"):
        load_config(None, {"server": {"max_update_norm": -1}})
    assert load_config(None, {"server": {"aggregator": "multi_krum", "krum_byzantine": 2}}).server.krum_byzantine == 2


# ---- validation: each reason an upload is refused ---------------------------------------------------
def test_attack_decode_upload_refuses_each_malformed_update():
    f32, i8 = PrivacyPlan(), PrivacyPlan(codec=Codec.int8)
    good = {K: torch.tensor([[0.5, -0.25, 1.0]])}
    assert engine.decode_upload(codec.encode(good, Codec.float32), LIKE, f32)[K].tolist() == [[0.5, -0.25, 1.0]]
    cases = [  # (payload, plan, reason)
        (codec.encode({**good, "x.lora_B.weight": torch.zeros(1)}, Codec.float32), f32, "unexpected"),  # extra name
        (codec.encode({}, Codec.float32), f32, "missing"),
        (codec.encode({K: torch.zeros(3, 1)}, Codec.float32), f32, "has shape"),
        (codec.encode({K: torch.tensor([[math.nan, 0.0, 0.0]])}, Codec.float32), f32, "NaN or Inf"),
        (codec.encode({K: torch.tensor([[math.inf, 0.0, 0.0]])}, Codec.float32), f32, "NaN or Inf"),
        (codec.encode(good, Codec.float16), f32, "do not match the codec float32"),
        (codec.encode(good, Codec.float16), i8, "do not match the codec int8"),
        (codec.encode(good, Codec.int8), f32, "outside the adapter schema under the codec float32"),
        (b"\x00" * 40, f32, "not a valid safetensors"),
    ]
    for payload, plan, reason in cases:
        with pytest.raises(engine.InvalidUpload, match=reason):
            engine.decode_upload(payload, LIKE, plan)


def test_attack_scale_tensors_only_under_int8_audit_finding_5():
    from safetensors.torch import save

    good = {K: torch.tensor([[0.5, -0.25, 1.0]])}
    # a float32 upload carrying an extra "<anything>.__scale" tensor was accepted before
    smuggled = save({K: good[K], "anything.__scale": torch.ones(1000)})
    with pytest.raises(engine.InvalidUpload, match=r"outside the adapter schema under the codec float32.*anything.__scale"):
        engine.decode_upload(smuggled, LIKE, PrivacyPlan())
    own = save({K: good[K], K + codec.SCALE: torch.ones(1)})  # even its own tensor's scale: float32 has none
    with pytest.raises(engine.InvalidUpload, match="outside the adapter schema"):
        engine.decode_upload(own, LIKE, PrivacyPlan())
    i8 = PrivacyPlan(codec=Codec.int8)
    ok = engine.decode_upload(codec.encode(good, Codec.int8), LIKE, i8)  # int8: one scale per tensor is the schema
    torch.testing.assert_close(ok[K], good[K], atol=1 / 127, rtol=0)
    stray = save({K: torch.tensor([[64, -32, 127]], dtype=torch.int8), K + codec.SCALE: torch.ones(1) / 127,
                  "other.__scale": torch.ones(1)})
    with pytest.raises(engine.InvalidUpload, match="other.__scale"):
        engine.decode_upload(stray, LIKE, i8)


def test_collect_in_memory_refuses_an_invalid_upload_and_keeps_the_rest():
    plan = PrivacyPlan()
    honest = {K: torch.tensor([[0.1, 0.2, 0.3]])}
    bad = {K: torch.tensor([[math.nan, 0.0, 0.0]])}
    results = [TrainResult(0, "b", bad, 10, upload=device_privatize(bad, plan)),
               TrainResult(0, "a", honest, 10, upload=device_privatize(honest, plan)),
               TrainResult(0, "c", honest, 0, upload=device_privatize(honest, plan))]
    contributions, total, refused = engine.collect_in_memory(results, plan, LIKE, 0)
    assert [c.device_id for c in contributions] == ["a"] and total is None
    assert [(r.device_id, "NaN or Inf" in r.reason or "num_tokens is 0" in r.reason) for r in refused] == [
        ("b", True), ("c", True)]


# ---- a round whose result is not finite fails -------------------------------------------------------
def test_attack_a_non_finite_round_fails_instead_of_committing():
    cfg = load_config(None, {})
    state = strategies.init({K: torch.ones(1, 3)}, cfg.server)
    c = [contribution("a", {K: torch.zeros(1, 3)}, 1)]
    with pytest.raises(engine.RoundFailed, match=r"mean \(tensor 'm.lora_A.weight'\) is not finite"):
        engine.commit(state, None, c, {K: torch.tensor([[math.inf, 0.0, 0.0]])}, cfg)
    # a finite mean whose step overflows: w + Delta = 3e38 + 3e38 is Inf in float32
    big = strategies.init({K: torch.full((1, 3), 3e38)}, cfg.server)
    with pytest.raises(engine.RoundFailed, match="adapter"):
        engine.commit(big, None, c, {K: torch.full((1, 3), 3e38)}, cfg)
    # FedAdam: Delta^2 of 3e38 overflows the second moment, though the adapter would stay finite
    adam = load_config(None, {"server": {"strategy": "fedadam"}})
    with pytest.raises(engine.RoundFailed, match="second moment"):
        engine.commit(strategies.init({K: torch.zeros(1, 3)}, adam.server), None, c, {K: torch.full((1, 3), 3e38)}, adam)
    out = engine.failed(state, "why")
    assert out.state.round == 1 and out.privacy is None and out.metrics == {"skipped": True, "failed": "why"}
    assert torch.equal(out.state.params[K], state.params[K])
