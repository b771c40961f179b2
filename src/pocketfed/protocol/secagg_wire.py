"""Secure-aggregation messages as named arrays, the form they leave a device in and are checked in.

Every device -> server message of the protocol (Bonawitz et al., CCS 2017) is a set of named,
fixed-size arrays, sent as a safetensors body, so the egress ledger checks it like a model update
(names, shapes, dtypes against a schema the device computes from the round) and the server
parses it against the schema it computes from its own state:

    step 0  keys      enc_public uint8[32], mask_public uint8[32],              (C_u, S_u, and Ed25519 over
                      signature uint8[64]                                        round, identity, C_u, S_u)
    step 1  shares    share/<v> uint8[12 + 156] for v in N(u) + u                (nonce || AES-GCM ciphertext)
    step 2  masked    masked uint32[D] (k <= 32) or uint64[D]                    (y_u mod 2^k)
    step 2' signature signature uint8[64]                                        (Ed25519 over round, seed, U3)
    step 3  unmask    self/<u> uint8[66] for u in U3, key/<d> uint8[66] for d in D  (Shamir shares)

`<v>` is a device's index in the round's cohort (0..n-1, the cohort sorted by identity key), never
its name. The device's identity key is not sent: the server has it from registration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save

from pocketfed.privacy import secagg

Schema = Mapping[str, tuple[tuple[int, ...], str]]
KEYS, SHARES, MASKED, UNMASK = "secagg_keys", "secagg_shares", "masked_update", "unmask_shares"
CONSISTENCY = "secagg_signature"
_SEALED = secagg.SHARE_NONCE_BYTES + secagg.SHARE_CIPHERTEXT_BYTES


class MalformedMessage(ValueError):
    """A message does not match the schema of its protocol step."""


def _u8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy()


def to_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    return np_save({k: np.ascontiguousarray(arrays[k]) for k in sorted(arrays)})


def load(data: bytes, schema: Schema, exact: bool = True) -> dict[str, np.ndarray]:
    """Parse a safetensors body whose every array is in `schema` (and, if `exact`, all of them)."""
    try:
        arrays = np_load(data)
    except (SafetensorError, ValueError, TypeError) as e:
        raise MalformedMessage(f"not a safetensors body: {e}") from None
    for name, a in arrays.items():
        if name not in schema:
            raise MalformedMessage(f"array {name!r} does not belong in this message")
        shape, dtype = schema[name]
        if tuple(a.shape) != tuple(shape) or str(a.dtype) != dtype:
            raise MalformedMessage(f"array {name!r} is {tuple(a.shape)} {a.dtype}; expected {tuple(shape)} {dtype}")
    missing = sorted(set(schema) - set(arrays))
    if exact and missing:
        raise MalformedMessage(f"message lacks arrays {missing[:5]}")
    return arrays


# ---- step 0 --------------------------------------------------------------------------------------
def keys_schema() -> Schema:
    return {"enc_public": ((secagg.PUBLIC_KEY_BYTES,), "uint8"), "mask_public": ((secagg.PUBLIC_KEY_BYTES,), "uint8"),
            "signature": ((secagg.SIGNATURE_BYTES,), "uint8")}


def keys_arrays(advert: secagg.AdvertiseKeys) -> dict[str, np.ndarray]:
    return {"enc_public": _u8(advert.enc_public), "mask_public": _u8(advert.mask_public),
            "signature": _u8(advert.signature)}


def parse_keys(data: bytes) -> tuple[bytes, bytes, bytes]:
    """-> (C_u, S_u, signature); `secagg.AdvertiseKeys` adds the round and the registered identity key."""
    a = load(data, keys_schema())
    return a["enc_public"].tobytes(), a["mask_public"].tobytes(), a["signature"].tobytes()


# ---- step 1 --------------------------------------------------------------------------------------
def shares_schema(holders: Iterable[int]) -> Schema:
    return {f"share/{v}": ((_SEALED,), "uint8") for v in holders}


def shares_arrays(msg: secagg.ShareKeys) -> dict[str, np.ndarray]:
    return {f"share/{s.recipient}": _u8(s.nonce + s.ciphertext) for s in msg.shares}


def parse_shares(data: bytes, round_id: int, sender: int, holders: Iterable[int]) -> secagg.ShareKeys:
    a = load(data, shares_schema(holders))
    shares = []
    for name in sorted(a, key=lambda n: int(n.split("/")[1])):
        raw = a[name].tobytes()
        shares.append(secagg.EncryptedShare(sender, int(name.split("/")[1]), raw[: secagg.SHARE_NONCE_BYTES],
                                            raw[secagg.SHARE_NONCE_BYTES :]))
    return secagg.ShareKeys(round_id, sender, tuple(shares))


# ---- step 2 --------------------------------------------------------------------------------------
def masked_schema(config: secagg.SecAggConfig) -> Schema:
    return {"masked": ((config.dimension,), "uint32" if config.bits <= 32 else "uint64")}


def masked_arrays(msg: secagg.MaskedInput) -> dict[str, np.ndarray]:
    return {"masked": msg.masked}


def parse_masked(data: bytes, config: secagg.SecAggConfig, device: int) -> secagg.MaskedInput:
    words = load(data, masked_schema(config))["masked"]
    if words.size and int(words.max()) >= 2**config.bits:
        raise MalformedMessage(f"masked input has words >= 2^{config.bits}")
    return secagg.MaskedInput(config.round_id, device, words)


# ---- step 2' -------------------------------------------------------------------------------------
def signature_schema() -> Schema:
    return {"signature": ((secagg.SIGNATURE_BYTES,), "uint8")}


def signature_arrays(msg: secagg.ConsistencySignature) -> dict[str, np.ndarray]:
    return {"signature": _u8(msg.signature)}


def parse_signature(data: bytes) -> bytes:
    return load(data, signature_schema())["signature"].tobytes()


# ---- step 3 --------------------------------------------------------------------------------------
def unmask_schema(self_ids: Iterable[int], key_ids: Iterable[int]) -> Schema:
    out: dict[str, tuple[tuple[int, ...], str]] = {f"self/{u}": ((secagg.FIELD_BYTES,), "uint8") for u in self_ids}
    out.update({f"key/{d}": ((secagg.FIELD_BYTES,), "uint8") for d in key_ids})
    return out


def unmask_arrays(resp: secagg.UnmaskResponse) -> dict[str, np.ndarray]:
    out = {f"self/{u}": _u8(y.to_bytes(secagg.FIELD_BYTES, "big")) for u, y in resp.self_mask_shares.items()}
    out.update({f"key/{d}": _u8(y.to_bytes(secagg.FIELD_BYTES, "big")) for d, y in resp.key_shares.items()})
    return out


def parse_unmask(data: bytes, round_id: int, device: int, self_ids: Iterable[int], key_ids: Iterable[int]
                 ) -> secagg.UnmaskResponse:
    """The shares a responder may reveal: of b_u for survivors, of s_d for the dropped (a subset:
    it holds only the shares that reached it)."""
    a = load(data, unmask_schema(self_ids, key_ids), exact=False)
    values = {name: int.from_bytes(v.tobytes(), "big") for name, v in a.items()}
    if any(y >= secagg.PRIME for y in values.values()):
        raise MalformedMessage("a share is not an element of GF(2^521 - 1)")
    self_shares = {int(n.split("/")[1]): y for n, y in values.items() if n.startswith("self/")}
    key_shares = {int(n.split("/")[1]): y for n, y in values.items() if n.startswith("key/")}
    return secagg.UnmaskResponse(round_id, device, self_shares, key_shares)
