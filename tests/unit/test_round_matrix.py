"""One matrix over aggregator x privacy x codec: every combination aggregates a round correctly.

Synthetic updates (no model) keep it fast. For each combination the aggregated mean is compared
with the plain token-weighted (or, under DP/secagg, uniform) mean of the clipped updates, within
the error that combination may add: codec rounding, fixed-point rounding, or DP noise (checked
against its known standard deviation instead).
"""

import itertools
import math

import pytest
import torch

from pocketfed.config import Codec, DPMode, PrivacyConfig, ServerConfig, Strategy
from pocketfed.privacy import dp, secagg
from pocketfed.server import strategies
from pocketfed.server.aggregate import aggregate_round
from pocketfed.server.strategies import WeightedUpdate

PRIVACY = {
    "none": dict(),
    "secagg": dict(secagg=True),
    "central_dp": dict(dp=DPMode.central, noise_multiplier=1.0),
    "distributed_dp_secagg": dict(dp=DPMode.distributed, noise_multiplier=1.0, secagg=True, secagg_degree=4),
}
CODEC_TOL = {Codec.float32: 1e-7, Codec.float16: 2e-3, Codec.int8: 1e-2}


def updates(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        WeightedUpdate({"a.lora_A.weight": torch.randn(4, 8, generator=g) * 0.02, "a.lora_B.weight": torch.randn(8, 4, generator=g) * 0.02}, 50 + 10 * i)
        for i in range(n)
    ]


@pytest.mark.parametrize(
    "strategy, privacy, codec", list(itertools.product(Strategy, PRIVACY, Codec))
)
def test_round_matrix(strategy, privacy, codec):
    if PRIVACY[privacy].get("secagg") and codec is not Codec.float32:
        pytest.skip("under secure aggregation the fixed-point encoding is the codec")
    ups = updates()
    pcfg = PrivacyConfig(codec=codec, clip_norm=0.1, **PRIVACY[privacy])
    agg = aggregate_round(ups, pcfg, clip_norm=0.1, noise_multiplier=pcfg.noise_multiplier, expected_devices=len(ups), round_id=3)
    private = privacy != "none"
    if private:
        clipped = [dp.clip_update(u.update, 0.1)[0] for u in ups]
        expect = {k: sum(c[k] for c in clipped) / len(ups) for k in ups[0].update}
    else:
        expect = strategies.weighted_mean(ups)
    err = max(float((agg.mean[k] - expect[k]).abs().max()) for k in expect)
    if pcfg.dp is DPMode.none:
        tol = CODEC_TOL[codec] if not pcfg.secagg else secagg.error_bound(len(ups), pcfg.frac_bits) / len(ups)
        assert err <= tol + 1e-9, f"{privacy}/{codec}: error {err} above {tol}"
    else:
        # Noise on the mean has std z*C/n per coordinate; 64 coordinates: max |N(0,1)| < 5 w.p. > 0.9999.
        std = 1.0 * 0.1 / len(ups)
        noise = torch.cat([(agg.mean[k] - expect[k]).flatten() for k in expect])
        assert float(noise.abs().max()) < 5 * std + 1e-6
        assert 0.5 * std < float(noise.std()) < 1.6 * std  # the noise is really there, at the right scale
    # The strategy applies it and stays finite.
    scfg = ServerConfig(strategy=strategy, lr=1.0 if strategy is Strategy.fedavg else 1e-2)
    state, _ = strategies.apply_mean(strategies.init({k: torch.zeros_like(v) for k, v in expect.items()}, scfg), agg.mean, scfg)
    assert all(torch.isfinite(v).all() for v in state.params.values())
    assert agg.bytes_up_per_device > 0


def test_codec_bytes_shrink():
    ups = [WeightedUpdate({"w": torch.randn(64, 256) * 0.01}, 1)]
    sizes = {c: aggregate_round(ups, PrivacyConfig(codec=c), 1.0, 0.0, 1, 0).bytes_up_per_device for c in Codec}
    assert sizes[Codec.int8] < sizes[Codec.float16] < sizes[Codec.float32]
    assert math.isclose(sizes[Codec.float16] / sizes[Codec.float32], 0.5, rel_tol=0.2)
