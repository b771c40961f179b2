"""One matrix over aggregator x privacy x codec: every combination aggregates a round correctly.

Synthetic updates (no model) keep it fast. Each combination runs the round engine the simulator and
the coordinator share: the device half of the privacy pipeline (`pipeline.device_privatize`), the
collection (`round.collect_in_memory`: decode, or the secure sum) and the server half
(`round.aggregate`). Its mean is compared with the plain token-weighted (or, under DP/secagg,
uniform) mean of the clipped updates, within the error that combination may add: codec rounding
(bounded per coordinate from the codec's maths and the data, see `codec_bound`), fixed-point
rounding, or DP noise (checked against its known standard deviation instead).

Under secure aggregation the fixed-point encoding is the codec (an update is never codec-encoded),
so those combinations are float32 only.
"""

import dataclasses
import itertools

import pytest
import torch

from pocketfed.config import Codec, DPMode, PrivacyConfig, ServerConfig, Strategy
from pocketfed.privacy import dp, pipeline, secagg
from pocketfed.protocol.messages import TrainResult
from pocketfed.server import round as engine
from pocketfed.server import strategies

PRIVACY = {
    "none": dict(),
    "secagg": dict(secagg=True),
    "central_dp": dict(dp=DPMode.central, noise_multiplier=1.0),
    "distributed_dp_secagg": dict(dp=DPMode.distributed, noise_multiplier=1.0, secagg=True, secagg_degree=4),
}
CASES = [(s, p, c) for s, p, c in itertools.product(Strategy, PRIVACY, Codec)
         if c is Codec.float32 or not PRIVACY[p].get("secagg")]
ROUND = 3


def updates(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        ({"a.lora_A.weight": torch.randn(4, 8, generator=g) * 0.02, "a.lora_B.weight": torch.randn(8, 4, generator=g) * 0.02},
         50 + 10 * i)
        for i in range(n)
    ]


def run_round(ups, pcfg: PrivacyConfig):
    """The round engine over `ups` [(update, tokens)] -> (mean, bytes each device sent)."""
    plan = pipeline.plan_for(pcfg, None, len(ups))
    if plan.dp is not DPMode.none:  # no accountant here: the plan takes the config's z
        plan = dataclasses.replace(plan, noise_multiplier=pcfg.noise_multiplier)
    results = [TrainResult(ROUND, f"dev{i}", u, w, upload=pipeline.device_privatize(u, plan))
               for i, (u, w) in enumerate(ups)]
    like = ups[0][0]
    contributions, total, _ = engine.collect_in_memory(results, plan, like, ROUND)
    return engine.aggregate(contributions, plan, like, total), [c.bytes_sent for c in contributions]


def codec_bound(ups, codec: Codec) -> dict[str, torch.Tensor]:
    """Per-coordinate bound on |token-weighted mean of decoded - of exact| from the codec's maths:
    sum_i (n_i / sum n) e_i, with e_i the most one value x of device i can move (pocketfed.codec):
        float32  0
        float16  |x| 2^-11 (round to nearest, 11 significant bits), 2^-25 below 2^-14 (subnormal step 2^-24)
        int8     s / 2 with s = max|x| / 127 over the tensor
    plus two float32 roundings of the result (the decode's q * s, the mean's cast): 2^-23 max|x|."""
    total = sum(w for _, w in ups)
    out = {}
    for k in ups[0][0]:
        def err(x: torch.Tensor) -> torch.Tensor:
            x = x.double()
            if codec is Codec.float16:
                return torch.maximum(x.abs() * 2.0**-11, torch.full_like(x, 2.0**-25))
            if codec is Codec.int8:
                return torch.full_like(x, float(x.abs().max()) / 127 / 2)
            return torch.zeros_like(x)

        out[k] = sum(err(u[k]) * (w / total) for u, w in ups)
        out[k] += 2.0**-23 * max(float(u[k].abs().max()) for u, _ in ups)
    return out


@pytest.mark.parametrize("strategy, privacy, codec", CASES)
def test_round_matrix(strategy, privacy, codec):
    ups = updates()
    pcfg = PrivacyConfig(codec=codec, clip_norm=0.1, **PRIVACY[privacy])
    mean, sent = run_round(ups, pcfg)
    if pcfg.dp is not DPMode.none or pcfg.secagg:
        clipped = [dp.clip_update(u, 0.1)[0] for u, _ in ups]
        expect = {k: sum(c[k] for c in clipped) / len(ups) for k in ups[0][0]}
    else:
        expect = strategies.weighted_mean([strategies.WeightedUpdate(u, w) for u, w in ups])
    if pcfg.dp is DPMode.none and pcfg.secagg:
        tol = secagg.error_bound(len(ups), pcfg.frac_bits) / len(ups)  # n 2^-(f+1) on the sum, over n
        err = max(float((mean[k] - expect[k]).abs().max()) for k in expect)
        assert err <= tol + 1e-9, f"{privacy}/{codec}: error {err} above {tol}"
    elif pcfg.dp is DPMode.none:
        bound = codec_bound(ups, codec)
        excess = max(float(((mean[k] - expect[k]).abs().double() - bound[k]).max()) for k in expect)
        assert excess <= 0, f"{privacy}/{codec}: error above the codec's bound by {excess}"
        if codec is not Codec.float32:  # the codec really rounded: the bound is not vacuous
            worst = max(float(((mean[k] - expect[k]).abs().double() / bound[k]).max()) for k in expect)
            assert worst > 0.1, worst
    else:
        # Noise on the mean has std z*C/n per coordinate; 64 coordinates: max |N(0,1)| < 5 w.p. > 0.9999.
        std = 1.0 * 0.1 / len(ups)
        noise = torch.cat([(mean[k] - expect[k]).flatten() for k in expect])
        assert float(noise.abs().max()) < 5 * std + 1e-6
        assert 0.5 * std < float(noise.std()) < 1.6 * std  # the noise is really there, at the right scale
    # The strategy applies it and stays finite.
    scfg = ServerConfig(strategy=strategy, lr=1.0 if strategy is Strategy.fedavg else 1e-2)
    state, _ = strategies.apply_mean(strategies.init({k: torch.zeros_like(v) for k, v in expect.items()}, scfg), mean, scfg)
    assert all(torch.isfinite(v).all() for v in state.params.values())
    assert min(sent) > 0


def test_int8_bound_is_a_quarter_millesimal_here():
    """The matrix's data: values ~ N(0, 0.02^2), absmax ~0.05 per tensor -> s / 2 ~ 2e-4 (float16: ~1e-5)."""
    ups = updates()
    int8 = max(float(b.max()) for b in codec_bound(ups, Codec.int8).values())
    fp16 = max(float(b.max()) for b in codec_bound(ups, Codec.float16).values())
    assert 1e-4 < int8 < 3e-4 and 2e-6 < fp16 < 2e-5, (int8, fp16)


def test_codec_bytes_shrink():
    up = {"w": torch.randn(64, 256) * 0.01}
    sizes = {c: len(pipeline.device_privatize(up, pipeline.PrivacyPlan(codec=c)).payload) for c in Codec}
    data = {Codec.float32: 64 * 256 * 4, Codec.float16: 64 * 256 * 2, Codec.int8: 64 * 256 + 4}  # int8: + its scale
    assert all(0 < sizes[c] - data[c] < 400 for c in Codec), sizes  # the rest is the safetensors header
