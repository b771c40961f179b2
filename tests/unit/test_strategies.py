"""Server strategies against hand-computed numbers."""

import math

import pytest
import torch

from pocketfed.config import ServerConfig, Strategy
from pocketfed.server import strategies
from pocketfed.server.strategies import WeightedUpdate


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_fedavg_weights_by_tokens():
    # Device a: delta [1, 2] with 100 tokens; device b: delta [4, -1] with 300 tokens.
    # mean = (100*[1,2] + 300*[4,-1]) / 400 = [(100+1200)/400, (200-300)/400] = [3.25, -0.25]
    cfg = ServerConfig(strategy=Strategy.fedavg, lr=1.0)
    state = strategies.init({"w": t(10.0, 10.0)}, cfg)
    new, diag = strategies.apply(state, [WeightedUpdate({"w": t(1, 2)}, 100), WeightedUpdate({"w": t(4, -1)}, 300)], cfg)
    assert torch.allclose(new.params["w"], t(13.25, 9.75))
    assert new.round == 1 and state.round == 0  # the old state is untouched
    assert torch.equal(state.params["w"], t(10.0, 10.0))
    assert diag["update_norm"] == pytest.approx(math.sqrt(3.25**2 + 0.25**2))


def test_fedavg_server_lr_scales_the_step():
    cfg = ServerConfig(strategy=Strategy.fedavg, lr=0.5)
    state = strategies.init({"w": t(0.0)}, cfg)
    new, _ = strategies.apply(state, [WeightedUpdate({"w": t(2.0)}, 1)], cfg)
    assert new.params["w"].item() == pytest.approx(1.0)


def test_one_fedadam_step():
    # Reddi et al. 2021, Alg. 2, with beta1=0.9, beta2=0.99, tau=0.1, eta=0.01, Delta=[0.2, -0.4]:
    # m = 0.1*Delta = [0.02, -0.04]
    # v = 0.99*tau^2 + 0.01*Delta^2 = [0.0099+0.0004, 0.0099+0.0016] = [0.0103, 0.0115]
    # w = w + 0.01 * m / (sqrt(v) + 0.1)
    cfg = ServerConfig(strategy=Strategy.fedadam, lr=0.01, beta1=0.9, beta2=0.99, tau=0.1)
    state = strategies.init({"w": t(1.0, 1.0)}, cfg)
    new, _ = strategies.apply(state, [WeightedUpdate({"w": t(0.2, -0.4)}, 7)], cfg)
    expect_v = [0.0103, 0.0115]
    expect_w = [1 + 0.01 * 0.02 / (math.sqrt(0.0103) + 0.1), 1 - 0.01 * 0.04 / (math.sqrt(0.0115) + 0.1)]
    assert torch.allclose(new.m["w"], t(0.02, -0.04))
    assert torch.allclose(new.v["w"], t(*expect_v))
    assert torch.allclose(new.params["w"], t(*expect_w))


def test_one_fedyogi_step():
    # v = v - (1-beta2) * Delta^2 * sign(v - Delta^2); v0 = tau^2 = 0.01, Delta^2 = [0.04, 0.0001]
    # coord 0: sign(0.01-0.04) = -1 -> v = 0.01 + 0.01*0.04   = 0.0104
    # coord 1: sign(0.01-0.0001) = +1 -> v = 0.01 - 0.01*0.0001 = 0.009999
    cfg = ServerConfig(strategy=Strategy.fedyogi, lr=0.01, beta1=0.9, beta2=0.99, tau=0.1)
    state = strategies.init({"w": t(0.0, 0.0)}, cfg)
    new, _ = strategies.apply(state, [WeightedUpdate({"w": t(0.2, 0.01)}, 1)], cfg)
    assert torch.allclose(new.v["w"], t(0.0104, 0.009999))
    m = [0.02, 0.001]
    assert torch.allclose(new.params["w"], t(0.01 * m[0] / (math.sqrt(0.0104) + 0.1), 0.01 * m[1] / (math.sqrt(0.009999) + 0.1)))


def test_aggregating_nothing_is_refused():
    cfg = ServerConfig()
    with pytest.raises(ValueError):
        strategies.apply(strategies.init({"w": t(0.0)}, cfg), [], cfg)


def test_checkpoint_round_trip(tmp_path):
    from pocketfed.server import checkpoint

    cfg = ServerConfig(strategy=Strategy.fedadam)
    state, _ = strategies.apply(strategies.init({"a.w": t(1.0, 2.0)}, cfg), [WeightedUpdate({"a.w": t(0.5, 0.5)}, 3)], cfg)
    checkpoint.save(tmp_path / "c.safetensors", state, {"history": [{"round": 0}]})
    back, extra = checkpoint.load(tmp_path / "c.safetensors")
    assert back.round == 1 and extra == {"history": [{"round": 0}]}
    for part in ("params", "m", "v"):
        assert torch.equal(getattr(back, part)["a.w"], getattr(state, part)["a.w"])
    assert not list(tmp_path.glob(".ckpt-*"))  # no temp file left behind
