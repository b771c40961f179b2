"""Update <-> bytes: what a device uploads, as safetensors, optionally compressed.

Codecs (per tensor):
    float32  exact
    float16  half precision (relative error <= 2^-11)
    int8     symmetric absmax quantization: q = round(x / s), s = max|x| / 127, x' = q * s;
             error per value <= s / 2. Scales travel as float32 tensors named "<key>.__scale".
The decoder checks the result against the expected adapter schema (names, shapes) and refuses
NaN or Inf: nothing trusts a payload it has not checked.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pocketfed.config import Codec

AdapterState = dict[str, torch.Tensor]
SCALE = ".__scale"


class PayloadError(ValueError):
    """An uploaded payload that does not decode to a valid update of the expected schema."""


def encode(update: AdapterState, codec: Codec) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    for k, v in update.items():
        v = v.detach().to(torch.float32).contiguous()
        if codec is Codec.float32:
            tensors[k] = v
        elif codec is Codec.float16:
            tensors[k] = v.to(torch.float16)
        else:
            scale = v.abs().max() / 127.0
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            tensors[k] = torch.round(v / scale).clamp(-127, 127).to(torch.int8)
            tensors[k + SCALE] = scale.reshape(1)
    return st_save(tensors, metadata={"codec": codec.value})


def decode(payload: bytes, like: AdapterState) -> AdapterState:
    """Bytes -> float32 update with exactly the keys and shapes of `like`, all values finite."""
    try:
        tensors = st_load(payload)
    except Exception as e:  # safetensors raises its own error types for corrupt input
        raise PayloadError(f"update is not a valid safetensors payload ({e})") from None
    keys = {k for k in tensors if not k.endswith(SCALE)}
    if keys != set(like):
        missing, extra = sorted(set(like) - keys)[:3], sorted(keys - set(like))[:3]
        raise PayloadError(f"update tensors do not match the adapter schema (missing {missing}, unexpected {extra})")
    out: AdapterState = {}
    for k, ref in like.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise PayloadError(f"update tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if t.dtype == torch.int8:
            scale = tensors.get(k + SCALE)
            if scale is None or scale.numel() != 1:
                raise PayloadError(f"int8 tensor {k!r} has no scale")
            value = t.to(torch.float32) * scale.to(torch.float32)
        elif t.dtype in (torch.float32, torch.float16):
            value = t.to(torch.float32)
        else:
            raise PayloadError(f"update tensor {k!r} has dtype {t.dtype}, expected float32, float16 or int8")
        if not torch.isfinite(value).all():
            raise PayloadError(f"update tensor {k!r} holds NaN or Inf")
        out[k] = value
    return out
