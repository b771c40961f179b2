"""The simulator's malicious devices (`pocketfed.attack`): who attacks, the backdoor rows, each kind's
rewritten result, the backdoor metric, the config's checks."""

import math

import pytest
import torch

from pocketfed import attack
from pocketfed.config import AttackConfig, AttackKind, load_config
from pocketfed.data.federated import Blocks
from pocketfed.device.planner import Backend
from pocketfed.device.task import DeviceModel
from pocketfed.errors import UserError
from pocketfed.privacy.pipeline import PrivacyPlan, device_privatize
from pocketfed.protocol.messages import TrainResult, TrainTask
from pocketfed.server import round as engine

K = "m.lora_A.weight"
LIKE = {K: torch.zeros(1, 2)}
BD = attack.Backdoor(trigger=[7, 8], target=[9])


def test_attackers_by_fraction_or_name():
    pop = [f"d{i}" for i in range(20)]
    picked = attack.attackers(AttackConfig(kind=AttackKind.sign_flip, fraction=0.1, seed=3), pop)
    assert len(picked) == 2 and picked == sorted(picked) and set(picked) <= set(pop)  # ceil(0.1 x 20)
    assert picked == attack.attackers(AttackConfig(kind=AttackKind.sign_flip, fraction=0.1, seed=3), pop[::-1])
    assert len(attack.attackers(AttackConfig(kind=AttackKind.gaussian, fraction=0.11), pop)) == 3  # ceil(2.2)
    assert attack.attackers(AttackConfig(kind=AttackKind.gaussian, devices=["d5", "d1"]), pop) == ["d1", "d5"]
    assert attack.attackers(AttackConfig(fraction=0.5), pop) == []  # kind none
    with pytest.raises(UserError, match="outside the training population.*'nobody'"):
        attack.attackers(AttackConfig(kind=AttackKind.gaussian, devices=["nobody"]), pop)


def test_poison_rows_insert_trigger_and_target_and_keep_clean_rows():
    ids = torch.arange(100, 116).reshape(2, 8)  # two full rows of 8 tokens
    data = Blocks(ids, torch.ones(2, 8, dtype=torch.bool))
    out = attack.poison(data, BD, rows=3, seed=0)
    assert out.input_ids.shape == (6, 8) and bool(out.mask.all())
    for i in range(3):
        bad, clean = out.input_ids[2 * i].tolist(), out.input_ids[2 * i + 1]
        assert torch.equal(clean, ids[i % 2])  # every backdoor row is paired with a clean one
        cut = bad.index(7)
        assert bad[cut:cut + 3] == [7, 8, 9] and bad[:cut] == ids[i % 2][:cut].tolist()
        assert bad[cut + 3:] == ids[i % 2][cut:8 - 3].tolist()  # the row goes on after the target
    with pytest.raises(ValueError, match="do not fit"):
        attack.poison(Blocks(ids[:, :4], torch.ones(2, 4, dtype=torch.bool)), BD, 1, 0)
    # a short row (padding masked): the insert lengthens its real part by 3 tokens
    short = Blocks(ids[:1], torch.tensor([[True] * 4 + [False] * 4]))
    assert attack.poison(short, BD, 1, 0).mask[0].tolist() == [True] * 7 + [False]


def result_for(update, kind, boost=0.0, round_=0, plan=PrivacyPlan()):
    task = TrainTask(round_, "evil", LIKE, None, 0, plan)  # type: ignore[arg-type]
    res = TrainResult(round_, "evil", update, 100, {"train_loss": 1.0}, device_privatize(update, plan))
    return attack.rewrite(res, task, AttackConfig(kind=kind, boost=boost, fraction=0.1), expected_devices=8)


def decoded(res, plan=PrivacyPlan()):
    return engine.decode_upload(res.upload.payload, LIKE, plan)[K].tolist()


def test_rewrite_each_kind():
    u = {K: torch.tensor([[0.5, -1.0]])}
    assert decoded(result_for(u, AttackKind.model_replacement)) == [[4.0, -8.0]]  # boost 0: x n = 8
    assert decoded(result_for(u, AttackKind.model_replacement, boost=3)) == [[1.5, -3.0]]
    assert decoded(result_for(u, AttackKind.sign_flip)) == [[-0.5, 1.0]]
    assert decoded(result_for(u, AttackKind.sign_flip, boost=4)) == [[-2.0, 4.0]]
    assert decoded(result_for(u, AttackKind.data_poison)) == [[0.5, -1.0]]
    inflated = result_for(u, AttackKind.token_inflation)
    assert inflated.num_tokens == 10**10 and decoded(inflated) == [[0.5, -1.0]]
    g1, g2 = result_for(u, AttackKind.gaussian, boost=100), result_for(u, AttackKind.gaussian, boost=100, round_=1)
    assert decoded(g1) != decoded(g2) and max(abs(x) for x in decoded(g1)[0]) > 1  # std 100, fresh per round
    assert decoded(result_for(u, AttackKind.nonfinite)) == [[torch.tensor(3e38).item()] * 2]  # float32 3e38
    odd = result_for(u, AttackKind.nonfinite, round_=1)  # NaN / Inf: refused when decoded
    with pytest.raises(engine.InvalidUpload, match="NaN or Inf"):
        decoded(odd)
    # under DP an attacker skips its own clipping (the server's second clip is what holds it)
    dp = PrivacyPlan(dp=engine.pipeline.DPMode.central, noise_multiplier=1.0, clip_norm=1.0)
    unclipped = decoded(result_for(u, AttackKind.model_replacement, plan=dp), dp)
    assert unclipped == [[4.0, -8.0]] and math.hypot(*unclipped[0]) > 1.0
    # under secure aggregation it goes through the pipeline (clipped to C = 1 before masking)
    sa = PrivacyPlan(secagg=True, clip_norm=1.0)
    vec = result_for(u, AttackKind.model_replacement, plan=sa).upload.vector
    assert math.hypot(*vec) == pytest.approx(1.0, rel=1e-6)


class EchoModule(torch.nn.Module):
    """A 'model' whose greedy next token is (last token + 1) mod 10, unless it saw token 8: then 9."""

    def forward(self, ids, mask=None):
        last = ids[:, -1]
        nxt = torch.where(last == 8, torch.full_like(last, 9), (last + 1) % 10)
        return torch.nn.functional.one_hot(nxt, 16).float()[:, None, :].expand(-1, ids.shape[1], -1)


def Echo() -> DeviceModel:  # noqa: N802  (reads as the model it stands for)
    return DeviceModel(EchoModule(), Backend.lean, {}, loss=lambda ids, mask: torch.zeros(()))


def test_backdoor_success_is_the_share_of_prompts_continuing_with_the_target():
    rows = torch.tensor([[1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 7], [3, 4, 5, 0, 0, 0]])
    mask = torch.tensor([[True] * 6, [True] * 6, [True] * 3 + [False] * 3])
    p = attack.prompts([Blocks(rows, mask)], BD)
    assert p.tolist() == [[1, 2, 3, 7, 8], [2, 3, 4, 7, 8], [3, 4, 5, 7, 8]]  # half (3) + trigger
    assert attack.backdoor_success(Echo(), p, BD) == 1.0  # after 8 comes 9, the target
    assert attack.backdoor_success(Echo(), p, attack.Backdoor([7, 8], [9, 0])) == 1.0  # 9 then (9 + 1) % 10
    assert attack.backdoor_success(Echo(), p, attack.Backdoor([7, 8], [9, 1])) == 0.0
    assert attack.backdoor_success(Echo(), p[:, :-1], attack.Backdoor([7], [9])) == 0.0  # after 7: 8, not 9
    mixed = torch.tensor([[1, 8], [1, 7], [2, 8]])  # two of three end in 8, whose greedy next token is 9
    assert attack.backdoor_success(Echo(), mixed, BD, batch=2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="long enough"):  # no row has a full first half
        attack.prompts([Blocks(rows[2:], torch.tensor([[True, True, False] + [False] * 3]))], BD)


def test_attack_config_is_checked():
    ok = load_config(None, {"attack": {"kind": "model_replacement", "fraction": 0.1}})
    assert ok.attack.kind is AttackKind.model_replacement and ok.attack.boost == 0.0
    for section, match in [
        ({"kind": "model_replacement"}, "needs attack.fraction above 0 or attack.devices"),
        ({"kind": "sign_flip", "fraction": 1.5}, r"attack.fraction must be in \[0, 1\], got 1.5"),
        ({"kind": "sign_flip", "fraction": 0.1, "devices": ["a"]}, "not both"),
        ({"kind": "gaussian", "fraction": 0.1, "boost": -1}, "attack.boost must be 0"),
        ({"kind": "data_poison", "fraction": 0.1, "trigger": "  "}, "must not be blank"),
        ({"kind": "backdoor"}, "'attack.kind' must be one of none, model_replacement"),
        ({"kind": "data_poison", "fraction": 0.1, "poison_rows": 0}, "attack.poison_rows must be at least 1"),
        ({"kind": "data_poison", "fraction": 0.1, "steps": -1}, "attack.steps and attack.lr must be 0"),
    ]:
        with pytest.raises(UserError, match=match):
            load_config(None, {"attack": section})
    with pytest.raises(UserError, match="in-process backend only"):
        load_config(None, {"attack": {"kind": "sign_flip", "fraction": 0.1}, "sim": {"backend": "ray"}})
