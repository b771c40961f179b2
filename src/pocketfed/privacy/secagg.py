"""Secure aggregation: the server learns the sum of the devices' updates and nothing else.

Protocol: Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017 (the
honest-but-curious variant, without the signature/consistency round), over the sparse
neighbour graph of SecAgg+ (Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020). Shamir, "How to Share a Secret",
CACM 22(11), 1979.

Steps (device functions / server functions; messages are the dataclasses below):
 0. advertise:   u makes two X25519 key pairs, (c_u, C_u) for encryption and (s_u, S_u) for masks,
                 and sends `AdvertiseKeys(C_u, S_u)`. Server: `key_directories` sends each u the
                 public keys of its neighbours N(u) (all others, or a random 2h-regular Harary
                 graph for SecAgg+, h = ceil(degree/2)).
 1. share keys:  u draws a self-mask seed b_u, Shamir-shares s_u and b_u t-of-|N(u)+u| over
                 GF(p), p = 2^521 - 1, and encrypts the shares for v with AES-GCM under
                 HKDF(X25519(c_u, C_v), round, u, v). Server: `route_shares` only relays.
 2. masked input: u clips x_u to L2 norm C, encodes it in fixed point (below) and sends
                 y_u = x_u + PRG(b_u) + sum_{v in N(u), u<v} PRG(s_uv) - sum_{v in N(u), u>v} PRG(s_uv)
                 (mod 2^k), with s_uv = HKDF-SHA256(X25519(s_u, S_v), round, min(u,v), max(u,v)).
                 Server: `unmask_request` names the survivors U3 (inputs received) and the
                 dropped D = U2 \\ U3 (shared keys, sent no input).
 3. unmasking:   each responder reveals its share of b_u for u in U3 and of s_u for u in D, never
                 both for the same u. Server: `aggregate` rebuilds b_u (u in U3) and s_u (u in D)
                 from >= t shares, strips PRG(b_u) and the survivors' pairwise masks with dropped
                 devices, and decodes sum_{u in U3} x_u. Fewer than t shares anywhere raises
                 `SecAggError` and nothing is returned.

PRG(seed) is AES-256-CTR keyed by the 32-byte seed (zero nonce; each seed is used once), read as
little-endian words and reduced mod 2^k. A masked vector y_u alone is uniform on Z_{2^k}^d.

Fixed point, with C the clip norm, f fractional bits and n the cohort size:
    encode(x) = round(x * 2^f) mod 2^k,   |x_i| <= ||x|| <= C  so  |round(x_i 2^f)| <= Q = floor(C 2^f) + 1
    k = bit_length(n Q) + 1   so the signed sum |sum_u q_u| <= n Q < 2^(k-1) never wraps;
    decode(s) = (s - 2^k [s >= 2^(k-1)]) / 2^f.
Error bound (round to nearest): |decode(sum_u encode(x_u)) - sum_u x_u| <= n 2^-(f+1) per
coordinate, exact otherwise (scaling by 2^f is exact in float64; k <= 54 keeps the sum exact).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pocketfed.privacy.dp import clip_vector

RandomBytes = Callable[[int], bytes]
"""A source of secret random bytes: `os.urandom` in use, a seeded stream in tests."""

PRIME = 2**521 - 1  # Mersenne prime; the Shamir field GF(p) holds any 32-byte secret.
_FIELD_BYTES = 66  # ceil(521 / 8)
FIELD_BYTES = _FIELD_BYTES  # one Shamir share y on the wire, big-endian
PUBLIC_KEY_BYTES = 32  # an X25519 public key
SHARE_NONCE_BYTES = 12  # AES-GCM nonce
SHARE_CIPHERTEXT_BYTES = 8 + 2 * _FIELD_BYTES + 16  # sender, recipient, share(s_u), share(b_u), GCM tag
_MAX_BITS = 54  # sums below 2^53 convert to float64 exactly
_VERSION = b"pocketfed/secagg/v1/"


class SecAggError(Exception):
    """The round cannot complete safely (too few devices or shares, a malformed message)."""


# --------------------------------------------------------------------------- fixed point


def modulus_bits(cohort_size: int, clip_norm: float, frac_bits: int) -> int:
    """k such that the sum of n encoded vectors of L2 norm <= C cannot wrap mod 2^k."""
    q_max = math.floor(clip_norm * 2**frac_bits) + 1
    return (cohort_size * q_max).bit_length() + 1


def error_bound(cohort_size: int, frac_bits: int) -> float:
    """Max per-coordinate error of the decoded sum vs the exact sum of clipped inputs: n 2^-(f+1)."""
    return cohort_size * 2.0 ** -(frac_bits + 1)


def _dtype(bits: int) -> type[np.unsignedinteger]:
    return np.uint32 if bits <= 32 else np.uint64


def encode(x: np.ndarray, clip_norm: float, frac_bits: int, bits: int) -> np.ndarray:
    """Clip to L2 norm C, then round(x * 2^f) mod 2^k as unsigned words [D]."""
    q = np.rint(clip_vector(x, clip_norm) * 2.0**frac_bits).astype(np.int64)
    return (q.astype(np.uint64) & np.uint64(2**bits - 1)).astype(_dtype(bits))


def decode(s: np.ndarray, frac_bits: int, bits: int) -> np.ndarray:
    """Map a sum mod 2^k back to signed fixed point, then to float64."""
    signed = (s.astype(np.uint64) & np.uint64(2**bits - 1)).astype(np.int64)
    signed[signed >= 2 ** (bits - 1)] -= 2**bits
    return signed.astype(np.float64) / 2.0**frac_bits


# --------------------------------------------------------------------------- PRG and keys


def expand_mask(seed: bytes, dim: int, bits: int) -> np.ndarray:
    """PRG(seed): d uniform words mod 2^k from the AES-256-CTR keystream of the 32-byte seed."""
    dtype = _dtype(bits)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(dim * np.dtype(dtype).itemsize)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=dtype) & dtype(2**bits - 1)


def _hkdf(secret: bytes, label: bytes, round_id: int, a: int, b: int) -> bytes:
    info = _VERSION + label + struct.pack(">QII", round_id, a, b)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def agree_seed(my_private: bytes, their_public: bytes, round_id: int, u: int, v: int) -> bytes:
    """Pairwise mask seed s_uv = s_vu: HKDF over X25519, bound to the round and both ids."""
    shared = X25519PrivateKey.from_private_bytes(my_private).exchange(
        X25519PublicKey.from_public_bytes(their_public)
    )
    return _hkdf(shared, b"pairwise-mask", round_id, min(u, v), max(u, v))


def _channel_key(my_private: bytes, their_public: bytes, round_id: int, sender: int, to: int) -> bytes:
    shared = X25519PrivateKey.from_private_bytes(my_private).exchange(
        X25519PublicKey.from_public_bytes(their_public)
    )
    return _hkdf(shared, b"share-channel", round_id, sender, to)


def _keypair(random_bytes: RandomBytes) -> tuple[bytes, bytes]:
    private = X25519PrivateKey.from_private_bytes(random_bytes(32))
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def seeded_random_bytes(seed: int, label: str) -> RandomBytes:
    """Deterministic SHAKE-256 byte stream for tests: never use outside tests."""
    counter = 0

    def draw(n: int) -> bytes:
        nonlocal counter
        counter += 1
        return hashlib.shake_256(f"{seed}/{label}/{counter}".encode()).digest(n)

    return draw


# --------------------------------------------------------------------------- Shamir


def _field_element(random_bytes: RandomBytes) -> int:
    while True:  # rejection sampling: uniform on [0, p)
        r = int.from_bytes(random_bytes(_FIELD_BYTES), "big") & (2**521 - 1)
        if r < PRIME:
            return r


def shamir_split(secret: int, threshold: int, xs: Iterable[int], random_bytes: RandomBytes) -> dict[int, int]:
    """Shares f(x) for each x, f(X) = secret + a_1 X + ... + a_{t-1} X^(t-1) over GF(p), a_i random."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret must lie in [0, p)")
    coefficients = [secret] + [_field_element(random_bytes) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        if not 0 < x < PRIME:
            raise ValueError(f"share point x must be in (0, p), got {x}")
        y = 0
        for a in reversed(coefficients):  # Horner
            y = (y * x + a) % PRIME
        shares[x] = y
    return shares


def shamir_combine(shares: Mapping[int, int]) -> int:
    """Lagrange interpolation at 0: f(0) = sum_j y_j prod_{m != j} x_m / (x_m - x_j) (mod p).

    Any t shares give the secret; t-1 shares give a value independent of it.
    """
    secret = 0
    for xj, yj in shares.items():
        num, den = 1, 1
        for xm in shares:
            if xm != xj:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    return secret


def _point(device_id: int) -> int:
    return device_id + 1  # x = 0 is the secret itself


# --------------------------------------------------------------------------- messages


@dataclasses.dataclass(frozen=True)
class SecAggConfig:
    """What every party agrees on before the round: it fixes k and the threshold t."""

    round_id: int
    cohort_size: int
    dimension: int
    threshold: int
    clip_norm: float = 1.0
    frac_bits: int = 16

    def __post_init__(self) -> None:
        if self.threshold < 2 or self.threshold > self.cohort_size:
            raise ValueError(f"threshold must be in [2, cohort_size={self.cohort_size}], "
                             f"got {self.threshold}")
        if self.clip_norm <= 0 or self.frac_bits < 0 or self.dimension < 1:
            raise ValueError("clip_norm and dimension must be positive, frac_bits non-negative")
        if self.bits > _MAX_BITS:
            raise ValueError(f"the sum needs {self.bits} bits > {_MAX_BITS}: lower frac_bits "
                             f"or the clip norm")

    @property
    def bits(self) -> int:
        return modulus_bits(self.cohort_size, self.clip_norm, self.frac_bits)


@dataclasses.dataclass(frozen=True)
class AdvertiseKeys:
    """Step 0, device -> server: two X25519 public keys (32 bytes each)."""

    round_id: int
    device_id: int
    enc_public: bytes
    mask_public: bytes

    @property
    def nbytes(self) -> int:
        return len(self.enc_public) + len(self.mask_public)


@dataclasses.dataclass(frozen=True)
class KeyDirectory:
    """Step 0, server -> device u: the public keys of u's neighbours, {v: (C_v, S_v)}."""

    round_id: int
    device_id: int
    neighbours: Mapping[int, tuple[bytes, bytes]]


@dataclasses.dataclass(frozen=True)
class EncryptedShare:
    """AES-GCM(nonce, sender || recipient || share(s_u) || share(b_u)); the server cannot read it."""

    sender: int
    recipient: int
    nonce: bytes
    ciphertext: bytes


@dataclasses.dataclass(frozen=True)
class ShareKeys:
    """Step 1, device -> server: one encrypted share pair per holder (neighbours and itself)."""

    round_id: int
    device_id: int
    shares: tuple[EncryptedShare, ...]

    @property
    def nbytes(self) -> int:
        return sum(len(s.nonce) + len(s.ciphertext) for s in self.shares)


@dataclasses.dataclass(frozen=True)
class SharesForDevice:
    """Step 1, server -> device v: the ciphertexts addressed to v."""

    round_id: int
    recipient: int
    shares: tuple[EncryptedShare, ...]


@dataclasses.dataclass(frozen=True)
class MaskedInput:
    """Step 2, device -> server: y_u as D words mod 2^k (uint32 when k <= 32, else uint64)."""

    round_id: int
    device_id: int
    masked: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.masked.nbytes)


@dataclasses.dataclass(frozen=True)
class UnmaskRequest:
    """Step 3, server -> devices: who sent masked inputs (U3) and who dropped after sharing (D)."""

    round_id: int
    survivors: frozenset[int]
    dropped: frozenset[int]


@dataclasses.dataclass(frozen=True)
class UnmaskResponse:
    """Step 3, device -> server: shares of b_u for u in U3, of s_u for u in D, as {u: y}."""

    round_id: int
    device_id: int
    self_mask_shares: Mapping[int, int]
    key_shares: Mapping[int, int]

    @property
    def nbytes(self) -> int:
        return _FIELD_BYTES * (len(self.self_mask_shares) + len(self.key_shares))


@dataclasses.dataclass(frozen=True)
class DeviceState:
    """A device's secrets for one round; lives only on the device."""

    config: SecAggConfig
    device_id: int
    enc_private: bytes
    mask_private: bytes
    self_seed: bytes = b""
    neighbours: Mapping[int, tuple[bytes, bytes]] = dataclasses.field(default_factory=dict)
    held: Mapping[int, tuple[int, int]] = dataclasses.field(default_factory=dict)  # u -> (s, b)


# --------------------------------------------------------------------------- device side


@dataclasses.dataclass(frozen=True)
class RoundKeys:
    """Step 0's two X25519 key pairs: (c_u, C_u) for the share channels, (s_u, S_u) for masks."""

    enc_private: bytes
    enc_public: bytes
    mask_private: bytes
    mask_public: bytes


def generate_keys(random_bytes: RandomBytes = os.urandom) -> RoundKeys:
    """Step 0 (Bonawitz et al. 2017, Fig. 4 "AdvertiseKeys"): two fresh key pairs for one round.

    In a deployment the keys exist before the cohort (and so the device's index u and the
    round's `SecAggConfig`) is fixed: `begin` binds them to both once the server announces them.
    """
    enc_private, enc_public = _keypair(random_bytes)
    mask_private, mask_public = _keypair(random_bytes)
    return RoundKeys(enc_private, enc_public, mask_private, mask_public)


def begin(config: SecAggConfig, device_id: int, keys: RoundKeys) -> DeviceState:
    """The device's state for the round: its index u, the agreed config and its private keys."""
    return DeviceState(config, device_id, keys.enc_private, keys.mask_private)


def advertise(config: SecAggConfig, device_id: int, random_bytes: RandomBytes = os.urandom
              ) -> tuple[DeviceState, AdvertiseKeys]:
    """Step 0: fresh key pairs for this round."""
    keys = generate_keys(random_bytes)
    return begin(config, device_id, keys), AdvertiseKeys(config.round_id, device_id, keys.enc_public, keys.mask_public)


def share_keys(state: DeviceState, directory: KeyDirectory, random_bytes: RandomBytes = os.urandom
               ) -> tuple[DeviceState, ShareKeys]:
    """Step 1: draw b_u, Shamir-share s_u and b_u to N(u) + u, encrypt each pair for its holder."""
    cfg, u = state.config, state.device_id
    if directory.round_id != cfg.round_id or directory.device_id != u:
        raise SecAggError(f"device {u}: key directory is for another round or device")
    if len(directory.neighbours) + 1 < cfg.threshold:
        raise SecAggError(f"device {u}: {len(directory.neighbours)} neighbours cannot hold "
                          f"{cfg.threshold} shares")
    self_seed = random_bytes(32)
    holders = sorted(set(directory.neighbours) | {u})
    xs = [_point(v) for v in holders]
    s_shares = shamir_split(int.from_bytes(state.mask_private, "big"), cfg.threshold, xs, random_bytes)
    b_shares = shamir_split(int.from_bytes(self_seed, "big"), cfg.threshold, xs, random_bytes)
    own_enc_public = X25519PrivateKey.from_private_bytes(state.enc_private).public_key().public_bytes_raw()
    out = []
    for v in holders:
        their_enc = own_enc_public if v == u else directory.neighbours[v][0]
        key = _channel_key(state.enc_private, their_enc, cfg.round_id, u, v)
        plaintext = struct.pack(">II", u, v) + s_shares[_point(v)].to_bytes(_FIELD_BYTES, "big") \
            + b_shares[_point(v)].to_bytes(_FIELD_BYTES, "big")
        nonce = random_bytes(12)
        aad = _VERSION + struct.pack(">QII", cfg.round_id, u, v)
        out.append(EncryptedShare(u, v, nonce, AESGCM(key).encrypt(nonce, plaintext, aad)))
    new_state = dataclasses.replace(state, self_seed=self_seed, neighbours=dict(directory.neighbours))
    return new_state, ShareKeys(cfg.round_id, u, tuple(out))


def _open_share(state: DeviceState, share: EncryptedShare, sender_enc_public: bytes) -> tuple[int, int]:
    cfg, v = state.config, state.device_id
    key = _channel_key(state.enc_private, sender_enc_public, cfg.round_id, share.sender, v)
    aad = _VERSION + struct.pack(">QII", cfg.round_id, share.sender, v)
    try:
        plaintext = AESGCM(key).decrypt(share.nonce, share.ciphertext, aad)
    except Exception as exc:  # cryptography raises InvalidTag
        raise SecAggError(f"device {v}: share from {share.sender} failed authentication") from exc
    sender, recipient = struct.unpack(">II", plaintext[:8])
    if (sender, recipient) != (share.sender, v):
        raise SecAggError(f"device {v}: share claims to be from {sender} to {recipient}")
    s = int.from_bytes(plaintext[8 : 8 + _FIELD_BYTES], "big")
    b = int.from_bytes(plaintext[8 + _FIELD_BYTES :], "big")
    return s, b


def mask_input(state: DeviceState, bundle: SharesForDevice, vector: np.ndarray
               ) -> tuple[DeviceState, MaskedInput]:
    """Step 2: keep the shares received, then y_u = encode(x_u) + PRG(b_u) +- PRG(s_uv) mod 2^k.

    Pairwise masks are added only for neighbours whose shares arrived (U2 in the paper).
    """
    cfg, u = state.config, state.device_id
    if bundle.round_id != cfg.round_id or bundle.recipient != u:
        raise SecAggError(f"device {u}: share bundle is for another round or device")
    if vector.shape != (cfg.dimension,):
        raise SecAggError(f"device {u}: vector shape {vector.shape} != ({cfg.dimension},)")
    own_enc = X25519PrivateKey.from_private_bytes(state.enc_private).public_key().public_bytes_raw()
    held = {}
    for share in bundle.shares:
        if share.sender != u and share.sender not in state.neighbours:
            raise SecAggError(f"device {u}: share from {share.sender}, who is not a neighbour")
        sender_enc = own_enc if share.sender == u else state.neighbours[share.sender][0]
        held[share.sender] = _open_share(state, share, sender_enc)
    bits, mask = cfg.bits, _dtype(cfg.bits)(2**cfg.bits - 1)
    y = encode(vector, cfg.clip_norm, cfg.frac_bits, bits)
    y += expand_mask(state.self_seed, cfg.dimension, bits)
    for v in sorted(held):
        if v == u:
            continue
        seed = agree_seed(state.mask_private, state.neighbours[v][1], cfg.round_id, u, v)
        if u < v:
            y += expand_mask(seed, cfg.dimension, bits)
        else:
            y -= expand_mask(seed, cfg.dimension, bits)
    y &= mask
    return dataclasses.replace(state, held=held), MaskedInput(cfg.round_id, u, y)


def unmask(state: DeviceState, request: UnmaskRequest) -> UnmaskResponse:
    """Step 3: reveal b-shares for survivors and s-shares for the dropped, never both for one u."""
    cfg, u = state.config, state.device_id
    if request.round_id != cfg.round_id:
        raise SecAggError(f"device {u}: unmask request is for round {request.round_id}")
    if request.survivors & request.dropped:
        raise SecAggError(f"device {u}: devices {sorted(request.survivors & request.dropped)} "
                          f"are listed as both surviving and dropped")
    if u not in request.survivors or len(request.survivors) < cfg.threshold:
        raise SecAggError(f"device {u}: refusing to unmask with {len(request.survivors)} survivors")
    b_shares = {v: pair[1] for v, pair in state.held.items() if v in request.survivors}
    s_shares = {v: pair[0] for v, pair in state.held.items() if v in request.dropped}
    return UnmaskResponse(cfg.round_id, u, b_shares, s_shares)


# --------------------------------------------------------------------------- server side


def neighbour_graph(device_ids: Sequence[int], degree: int | None, seed: bytes) -> dict[int, frozenset[int]]:
    """N(u) for every u: everyone else when degree is None or >= n - 1; otherwise a Harary graph
    H_{2h,n} (u linked to the h nearest on each side of a ring, h = ceil(degree / 2)) over a
    permutation drawn from `seed` (public randomness), as in SecAgg+ (Bell et al., 2020)."""
    ids = sorted(set(device_ids))
    n = len(ids)
    if degree is None or degree >= n - 1:
        return {u: frozenset(ids) - {u} for u in ids}
    if degree < 1:
        raise ValueError(f"degree must be at least 1, got {degree}")
    ring = sorted(ids, key=lambda u: hashlib.sha256(seed + struct.pack(">I", u)).digest())
    half = math.ceil(degree / 2)
    graph: dict[int, set[int]] = {u: set() for u in ids}
    for i, u in enumerate(ring):
        for j in range(1, half + 1):
            v = ring[(i + j) % n]
            graph[u].add(v)
            graph[v].add(u)
    return {u: frozenset(vs) for u, vs in graph.items()}


def default_threshold(cohort_size: int, degree: int | None) -> int:
    """t = floor(m / 2) + 1, a majority of the neighbourhood, m = min(n, 2 ceil(degree / 2) + 1).

    A majority keeps an honest-but-curious server from getting both b_u and s_u of one device
    (Bonawitz et al. 2017, Thm 6.2 needs t > n / 2 against a server that lies about dropouts).
    """
    graph_size = cohort_size if not degree else min(cohort_size, 2 * math.ceil(degree / 2) + 1)
    return graph_size // 2 + 1


def key_directories(config: SecAggConfig, adverts: Sequence[AdvertiseKeys],
                    graph: Mapping[int, frozenset[int]]) -> dict[int, KeyDirectory]:
    """Step 0 (server): after >= t adverts, give each u the keys of its advertised neighbours."""
    keys = {a.device_id: (a.enc_public, a.mask_public) for a in adverts if a.round_id == config.round_id}
    if len(keys) < config.threshold:
        raise SecAggError(f"only {len(keys)} devices advertised keys; threshold is {config.threshold}")
    smallest = min(len(graph[u]) + 1 for u in keys)
    if smallest < config.threshold:
        raise SecAggError(f"a neighbourhood of {smallest} devices cannot hold {config.threshold} "
                          f"shares: raise the degree or lower the threshold")
    return {u: KeyDirectory(config.round_id, u, {v: keys[v] for v in graph[u] if v in keys})
            for u in keys}


def route_shares(config: SecAggConfig, messages: Sequence[ShareKeys]) -> dict[int, SharesForDevice]:
    """Step 1 (server): relay each ciphertext to its recipient among the devices that shared (U2)."""
    senders = {m.device_id for m in messages if m.round_id == config.round_id}
    if len(senders) < config.threshold:
        raise SecAggError(f"only {len(senders)} devices shared keys; threshold is {config.threshold}")
    inbox: dict[int, list[EncryptedShare]] = {u: [] for u in senders}
    for m in messages:
        for share in m.shares:
            if share.sender != m.device_id:
                raise SecAggError(f"device {m.device_id} sent a share claiming sender {share.sender}")
            if share.recipient in inbox:
                inbox[share.recipient].append(share)
    return {u: SharesForDevice(config.round_id, u, tuple(s)) for u, s in inbox.items()}


def unmask_request(config: SecAggConfig, masked: Sequence[MaskedInput], shared: AbstractSet[int]
                   ) -> UnmaskRequest:
    """Step 2 (server): U3 = devices whose masked input arrived; D = U2 \\ U3."""
    survivors = frozenset(m.device_id for m in masked)
    if not survivors <= shared:
        raise SecAggError(f"masked inputs from devices that did not share keys: {sorted(survivors - shared)}")
    if len(survivors) < config.threshold:
        raise SecAggError(f"only {len(survivors)} masked inputs arrived; threshold is {config.threshold}")
    return UnmaskRequest(config.round_id, survivors, frozenset(shared) - survivors)


def _reconstruct(config: SecAggConfig, owner: int, shares: Mapping[int, int], what: str) -> bytes:
    if len(shares) < config.threshold:
        raise SecAggError(f"only {len(shares)} shares of device {owner}'s {what} arrived; "
                          f"threshold is {config.threshold}: the round fails, no sum is released")
    chosen = dict(sorted(shares.items())[: config.threshold])
    secret = shamir_combine({_point(v): y for v, y in chosen.items()})
    if secret >= 2**256:
        raise SecAggError(f"device {owner}'s {what} did not reconstruct (inconsistent shares)")
    return secret.to_bytes(32, "big")


def aggregate(config: SecAggConfig, adverts: Sequence[AdvertiseKeys], graph: Mapping[int, frozenset[int]],
              masked: Sequence[MaskedInput], request: UnmaskRequest,
              responses: Sequence[UnmaskResponse]) -> np.ndarray:
    """Step 3 (server): sum_{u in U3} y_u - PRG(b_u) -+ masks with D, decoded to float64 [D].

    Raises SecAggError, releasing nothing, if fewer than t devices answered or any needed secret
    has fewer than t shares.
    """
    responders = {r.device_id: r for r in responses if r.device_id in request.survivors}
    if len(responders) < config.threshold:
        raise SecAggError(f"only {len(responders)} devices answered the unmasking; threshold is "
                          f"{config.threshold}: the round fails, no sum is released")
    mask_public = {a.device_id: a.mask_public for a in adverts}
    bits, dtype = config.bits, _dtype(config.bits)
    total = np.zeros(config.dimension, dtype=dtype)
    for m in masked:
        if m.device_id in request.survivors:
            total += m.masked.astype(dtype)
    for u in sorted(request.survivors):  # remove self masks
        shares = {v: r.self_mask_shares[u] for v, r in responders.items() if u in r.self_mask_shares}
        total -= expand_mask(_reconstruct(config, u, shares, "self-mask seed"), config.dimension, bits)
    for d in sorted(request.dropped):  # remove survivors' pairwise masks with dropped devices
        partners = sorted(graph[d] & request.survivors)
        if not partners:
            continue
        shares = {v: r.key_shares[d] for v, r in responders.items() if d in r.key_shares}
        mask_private = _reconstruct(config, d, shares, "mask key")
        for v in partners:
            seed = agree_seed(mask_private, mask_public[v], config.round_id, d, v)
            if v < d:  # v added +PRG(s_vd)
                total -= expand_mask(seed, config.dimension, bits)
            else:
                total += expand_mask(seed, config.dimension, bits)
    return decode(total, config.frac_bits, bits)


# --------------------------------------------------------------------------- in-process round


@dataclasses.dataclass(frozen=True)
class RoundOutcome:
    """What an in-process round returns: the sum, who is in it, and what it cost."""

    total: np.ndarray  # [D] float64, sum of the clipped inputs of `included`
    included: frozenset[int]
    bits: int
    device_seconds: Mapping[int, float]
    device_bytes_sent: Mapping[int, int]
    server_seconds: float


def simulate_round(
    vectors: Sequence[np.ndarray], *, clip_norm: float = 1.0, frac_bits: int = 16,
    threshold: int | None = None, neighbours: int | None = None, round_id: int = 0,
    dropout_before_masking: AbstractSet[int] = frozenset(),
    dropout_after_masking: AbstractSet[int] = frozenset(),
    rng_seed_for_tests: int | None = None,
) -> RoundOutcome:
    """Run every party of one round in this process, timing devices and server apart.

    Device ids are 0..n-1. `dropout_before_masking`: shared keys, never sent a masked input (their
    pairwise masks are removed; they are not in the sum). `dropout_after_masking`: sent a masked
    input, then never answered the unmasking (they are in the sum). `threshold` defaults to a
    majority of the neighbourhood, floor(m/2) + 1 with m = min(n, neighbours + 1).
    """
    n = len(vectors)
    dim = int(np.asarray(vectors[0]).size)
    t = threshold if threshold is not None else default_threshold(n, neighbours)
    config = SecAggConfig(round_id, n, dim, t, clip_norm, frac_bits)

    def source(label: str) -> RandomBytes:
        return os.urandom if rng_seed_for_tests is None else seeded_random_bytes(rng_seed_for_tests, label)

    seconds = dict.fromkeys(range(n), 0.0)
    sent = dict.fromkeys(range(n), 0)
    server = 0.0

    states, adverts = {}, []
    for u in range(n):
        start = time.perf_counter()
        states[u], advert = advertise(config, u, source(f"device-{u}"))
        seconds[u] += time.perf_counter() - start
        sent[u] += advert.nbytes
        adverts.append(advert)

    start = time.perf_counter()
    graph = neighbour_graph(range(n), neighbours, source("server")(32))
    directories = key_directories(config, adverts, graph)
    server += time.perf_counter() - start

    share_msgs = []
    for u in range(n):
        start = time.perf_counter()
        states[u], msg = share_keys(states[u], directories[u], source(f"device-{u}-shares"))
        seconds[u] += time.perf_counter() - start
        sent[u] += msg.nbytes
        share_msgs.append(msg)

    start = time.perf_counter()
    bundles = route_shares(config, share_msgs)
    server += time.perf_counter() - start

    masked = []
    for u in range(n):
        if u in dropout_before_masking:
            continue
        start = time.perf_counter()
        states[u], msg = mask_input(states[u], bundles[u], np.asarray(vectors[u]).ravel())
        seconds[u] += time.perf_counter() - start
        sent[u] += msg.nbytes
        masked.append(msg)

    start = time.perf_counter()
    request = unmask_request(config, masked, set(bundles))
    server += time.perf_counter() - start

    responses = []
    for u in sorted(request.survivors - dropout_after_masking):
        start = time.perf_counter()
        response = unmask(states[u], request)
        seconds[u] += time.perf_counter() - start
        sent[u] += response.nbytes
        responses.append(response)

    start = time.perf_counter()
    total = aggregate(config, adverts, graph, masked, request, responses)
    server += time.perf_counter() - start
    return RoundOutcome(total, request.survivors, config.bits, seconds, sent, server)


def run_round(
    vectors: Sequence[np.ndarray], *, clip_norm: float = 1.0, frac_bits: int = 16,
    threshold: int | None = None, neighbours: int | None = None, round_id: int = 0,
    dropout_before_masking: AbstractSet[int] = frozenset(),
    dropout_after_masking: AbstractSet[int] = frozenset(),
    rng_seed_for_tests: int | None = None,
) -> np.ndarray:
    """The unmasked float64 sum of the clipped vectors of every device that sent a masked input.

    Exact up to `error_bound(len(vectors), frac_bits)` per coordinate; raises `SecAggError` (and
    returns nothing) when too few devices or shares remain. See `simulate_round` for the rest.
    """
    return simulate_round(
        vectors, clip_norm=clip_norm, frac_bits=frac_bits, threshold=threshold,
        neighbours=neighbours, round_id=round_id, dropout_before_masking=dropout_before_masking,
        dropout_after_masking=dropout_after_masking, rng_seed_for_tests=rng_seed_for_tests,
    ).total
