"""The update codec (pocketfed.codec) with numbers worked out by hand, its error bounds, and the
payloads the decoder must refuse."""

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pocketfed import codec
from pocketfed.codec import SCALE, PayloadError, decode, encode
from pocketfed.config import Codec

LIKE = {"w": torch.zeros(4)}


def test_int8_by_hand():
    # absmax = 1.984375 = 127/64, so s = absmax / 127 = 1/64 = 0.015625 exactly (float32 holds it).
    # x / s = [127, -32, 6.4000001 (0.1 is 0.100000001490116 in float32), 2.5]
    # round (half to even) -> q = [127, -32, 6, 2];  x' = q * s = [1.984375, -0.5, 0.09375, 0.03125]
    x = torch.tensor([1.984375, -0.5, 0.1, 0.0390625])
    tensors = st_load(encode({"w": x}, Codec.int8))
    assert tensors["w"].dtype == torch.int8 and tensors["w"].tolist() == [127, -32, 6, 2]
    assert tensors["w" + SCALE].dtype == torch.float32 and tensors["w" + SCALE].tolist() == [0.015625]
    out = decode(encode({"w": x}, Codec.int8), LIKE)["w"]
    assert out.dtype == torch.float32 and out.tolist() == [1.984375, -0.5, 0.09375, 0.03125]
    # errors [0, 0, 0.00625, 0.0078125]: the tie 2.5 -> 2 sits exactly on the bound s / 2 = 0.0078125
    assert (out - x).abs().max().item() == pytest.approx(0.0078125, abs=1e-9)


def test_int8_zero_tensor_keeps_scale_one():
    tensors = st_load(encode({"w": torch.zeros(4)}, Codec.int8))
    assert tensors["w"].tolist() == [0, 0, 0, 0] and tensors["w" + SCALE].tolist() == [1.0]
    assert decode(encode({"w": torch.zeros(4)}, Codec.int8), LIKE)["w"].tolist() == [0.0] * 4


def test_float16_by_hand():
    # 0.1 = 1.6 x 2^-4: 10 fraction bits, 0.6 x 1024 = 614.4 -> 614: (1024 + 614) / 1024 x 2^-4 = 0.0999755859375
    # 1/3 = 1.333.. x 2^-2: 0.333.. x 1024 = 341.33 -> 341: 1365 / 4096 = 0.333251953125
    # 1e-7 is below 2^-14 (subnormal): steps of 2^-24 = 5.96e-8; 1e-7 / 2^-24 = 1.68 -> 2: 2^-23 = 1.1920929e-07
    # 2049 needs 12 significant bits: a tie between 2048 and 2050 -> even mantissa -> 2048
    x = torch.tensor([0.1, 1 / 3, 1e-7, 2049.0])
    tensors = st_load(encode({"w": x}, Codec.float16))
    assert tensors["w"].dtype == torch.float16
    out = decode(encode({"w": x}, Codec.float16), LIKE)["w"]
    assert out.dtype == torch.float32
    assert out.tolist() == [0.0999755859375, 0.333251953125, 2.0**-23, 2048.0]


def test_float32_is_exact():
    x = {"a": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)), "b": torch.tensor([1e-30, -3e38])}
    out = decode(encode(x, Codec.float32), x)
    assert all(torch.equal(out[k], x[k]) for k in x)


@pytest.mark.parametrize("seed", range(3))
def test_round_trip_error_within_the_bound(seed):
    g = torch.Generator().manual_seed(seed)
    x = {"a": torch.randn(16, 32, generator=g) * 0.02, "b": torch.randn(32, 16, generator=g) * 3}
    int8 = decode(encode(x, Codec.int8), x)
    fp16 = decode(encode(x, Codec.float16), x)
    for k, v in x.items():
        s = v.abs().max() / 127
        assert ((int8[k] - v).abs() <= s / 2 * (1 + 1e-6)).all()  # s / 2, + the float32 rounding of q * s
        assert (int8[k] - v).abs().max() > s / 4  # it really rounds: 512 values, not one lucky grid
        bound = torch.maximum(v.abs() * 2.0**-11, torch.full_like(v, 2.0**-25))
        assert ((fp16[k] - v).abs() <= bound).all()


def test_int8_is_smaller_than_float16_than_float32():
    x = {"w": torch.randn(64, 64)}
    sizes = [len(encode(x, c)) for c in (Codec.int8, Codec.float16, Codec.float32)]
    assert sizes[0] < sizes[1] < sizes[2]


# ---- payloads the decoder refuses -------------------------------------------------------------
BAD = [
    (b"not safetensors", "not a valid safetensors payload"),
    (st_save({"v": torch.zeros(4)}), "missing ['w'], unexpected ['v']"),
    (st_save({"w": torch.zeros(4), "extra": torch.zeros(1)}), "missing [], unexpected ['extra']"),
    (st_save({"w": torch.zeros(5)}), "'w' has shape (5,), expected (4,)"),
    (st_save({"w": torch.tensor([0.0, float("nan"), 0.0, 0.0])}), "'w' holds NaN or Inf"),
    (st_save({"w": torch.tensor([0.0, float("inf"), 0.0, 0.0])}), "'w' holds NaN or Inf"),
    (encode({"w": torch.tensor([1e5, 0.0, 0.0, 0.0])}, Codec.float16), "'w' holds NaN or Inf"),  # past 65504
    (st_save({"w": torch.zeros(4, dtype=torch.int8)}), "int8 tensor 'w' has no scale"),
    (st_save({"w": torch.zeros(4, dtype=torch.int8), "w" + SCALE: torch.ones(2)}), "int8 tensor 'w' has no scale"),
    (st_save({"w": torch.zeros(4, dtype=torch.int8), "w" + SCALE: torch.tensor([float("nan")])}), "holds NaN or Inf"),
    (st_save({"w": torch.zeros(4, dtype=torch.float64)}), "has dtype torch.float64, expected float32, float16 or int8"),
]


@pytest.mark.parametrize("payload, words", BAD, ids=["garbage", "renamed", "extra", "shape", "nan", "inf",
                                                     "fp16-overflow", "no-scale", "two-scales", "nan-scale", "float64"])
def test_bad_payloads_are_refused_with_the_reason(payload, words):
    with pytest.raises(PayloadError) as e:
        decode(payload, LIKE)
    assert words in str(e.value)
    assert isinstance(e.value, ValueError) and codec.PayloadError is PayloadError
