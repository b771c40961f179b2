"""Secure aggregation: the server learns the sum of the devices' updates and nothing else, even if
it deviates from the protocol (an active coordinator), as long as it cannot forge device identities.

Protocol: Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017, in its
active-adversary form (Fig. 4: signed AdvertiseKeys and the ConsistencyCheck round), over the
sparse neighbour graph of SecAgg+ (Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020). Shamir, "How to Share a Secret",
CACM 22(11), 1979. Signatures: Ed25519 (Bernstein et al., CHES 2011), each device's identity key.

Steps (device functions / server functions; messages are the dataclasses below):
 0. advertise:   u makes two X25519 key pairs, (c_u, C_u) for encryption and (s_u, S_u) for masks,
                 and sends `AdvertiseKeys(C_u, S_u, sig_u)`, sig_u = Ed25519 over (round, its identity
                 key, C_u, S_u) (`advertise`). Server: `order_cohort` sorts the signed adverts by
                 identity key (the device index u is the position: the server has no choice of order),
                 `graph_seed` hashes the list, and `key_directories` sends every u the whole list,
                 the seed and N(u). Device: `check_directory` checks that identity
                 keys are distinct and in order, that its own entry is its own, recomputes the seed
                 and N(u) and refuses any difference, verifies every neighbour's signature, and
                 recomputes the threshold floor (below).
 1. share keys:  u draws a self-mask seed b_u, Shamir-shares s_u and b_u t-of-|N(u)+u| over
                 GF(p), p = 2^521 - 1, and encrypts the shares for v with AES-GCM under
                 HKDF(X25519(c_u, C_v), round, u, v) (`share_keys`). Server: `route_shares` relays.
 2. masked input: u opens the shares it received (U2 as u sees it) and refuses to go on with fewer
                 than t valid ones, itself included (Bonawitz et al. require |U2| >= t: with fewer, a
                 server that withheld the shares would leave y_u masked by PRG(b_u) alone, then ask
                 for b_u's shares). Else it sends (`mask_input`)
                 y_u = x_u + PRG(b_u) + sum_{v in U2 n N(u), u<v} PRG(s_uv) - sum_{v in U2 n N(u), u>v} PRG(s_uv)
                 (mod 2^k), with s_uv = HKDF-SHA256(X25519(s_u, S_v), round, min(u,v), max(u,v)).
                 Server: `consistency_request` names the survivors U3 (inputs received).
 2'. consistency: every u in U3 signs (round, graph seed, sorted U3) with its identity key, once
                 (`sign_survivors`). Server: `unmask_request` relays the signatures with U3 and the
                 dropped D = U2 \\ U3. Device: `check_consistency` needs >= t valid signatures over
                 exactly the U3 it signed, from distinct identity keys of N(u) + u verified in step 0.
 3. unmasking:   u reveals its share of b_v for v in U3 and of s_v for v in D, never both for one v
                 (`unmask`), and refuses unless >= t of N(u) + u survived. Server: `aggregate`
                 rebuilds b_u (u in U3) and s_d (d in D) from >= t shares, strips PRG(b_u) and the
                 survivors' pairwise masks with dropped devices, and decodes sum_{u in U3} x_u.
                 Fewer than t shares anywhere raises `SecAggError` and nothing is returned.

Why a device needs t signatures over its U3: a server that told two devices different survivor
sets could ask one for b_v's share (v survived) and another for s_v's (v dropped); each honest
device signs one U3 only, so two sets cannot both gather t signatures in one neighbourhood when t
is a majority of it. Binding the graph seed into the signature makes every signer vouch for the same
cohort list too.

SecAgg+ graph and threshold. With privacy.secagg_degree = 0 every device neighbours every other
(t = floor(n/2) + 1, Bonawitz et al. 2017, Thm 6.2's t > n/2). Otherwise the graph is the Harary
graph H_{2h,n}: a ring in cohort order permuted by the seed, u linked to the h nearest on each side, with
    h = max(ceil(secagg_degree / 2), ceil(LOG_FACTOR * log2 n)),      LOG_FACTOR = 1
so the degree 2h grows as O(log n), as Bell et al. 2020 require (Sec. 3: k = O(log n) neighbours keep
the graph connected and each neighbourhood honest-majority with high probability); the configured
degree is a minimum. The server cannot pick the permutation: the seed is a hash of all the signed
adverts, fixed once the keys are. (It can still choose which advertisers make the cohort; each
choice gives one graph, and the threshold argument below holds for every graph.)
Threshold for a sparse graph, t = h + 2 (`threshold_floor`). An edge of H_{2h,n} spans at most h
ring positions, so h consecutive devices that drop (or that the server calls dropped) cut the ring
there, and two such runs split it into arcs with no pairwise mask between them: each arc's sum could
be unmasked on its own (an exact 3-device sum at n = 20, h = 2). A device next to a run has h of its
2h + 1 neighbourhood positions in the run, so at most h + 1 survivors; with t >= h + 2 its b_u
cannot be rebuilt from survivors' shares (each arc stays masked by its boundary devices' PRG(b_u)),
and the device itself refuses to unmask. t = h + 2 is also a majority of the 2h + 1 (> h + 1/2),
which keeps the two-views argument above. The price: a device tolerates h - 1 dropouts among its
2h neighbours, where a bare majority tolerated h; a neighbourhood below t could not be unmasked anyway.

What the signatures rest on: the identity keys are those the devices registered with the server
(pocketfed.protocol.auth; the same key signs requests, under another prefix). They stop a server
from swapping an honest device's round keys; a server that enrols identities of its own (Sybils)
is out of scope here, as in Bonawitz et al., whose active-adversary proof assumes a PKI.

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
from typing import Any, TypeVar

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
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
PUBLIC_KEY_BYTES = 32  # an X25519 or Ed25519 public key
SIGNATURE_BYTES = 64  # an Ed25519 signature
SEED_BYTES = 32  # the SecAgg+ graph seed (SHA-256)
SHARE_NONCE_BYTES = 12  # AES-GCM nonce
SHARE_CIPHERTEXT_BYTES = 8 + 2 * _FIELD_BYTES + 16  # sender, recipient, share(s_u), share(b_u), GCM tag
LOG_FACTOR = 1.0  # SecAgg+ half-degree h >= ceil(LOG_FACTOR * log2 n); see the module docstring
_MAX_BITS = 54  # sums below 2^53 convert to float64 exactly
_VERSION = b"pocketfed/secagg/v1/"
_T = TypeVar("_T")


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
    """Clip to L2 norm C, then round(x * 2^f) mod 2^k as unsigned words [D].

    An integer vector is already on the grid 2^-f (the distributed discrete Gaussian's output,
    `pocketfed.privacy.discrete`): it is checked against the bound the modulus is sized for and
    only reduced mod 2^k."""
    if np.issubdtype(np.asarray(x).dtype, np.integer):
        q = np.asarray(x, dtype=np.int64)
        limit = math.floor(clip_norm * 2**frac_bits) + 1
        if q.size and int(np.abs(q).max()) > limit:
            raise SecAggError(f"an integer input entry exceeds {limit}, the bound the modulus is sized for")
    else:
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



# --------------------------------------------------------------------------- graph and threshold


def graph_degree(cohort_size: int, configured: int) -> int:
    """The SecAgg+ degree 2h for n devices, h = max(ceil(configured / 2), ceil(LOG_FACTOR log2 n)),
    or 0 (every device neighbours every other) when `configured` is 0 or 2h >= n - 1."""
    if configured < 0 or cohort_size < 1:
        raise ValueError(f"secagg_degree must be >= 0 (0 = the full graph), got {configured}")
    if configured == 0:
        return 0
    half = max(math.ceil(configured / 2), math.ceil(LOG_FACTOR * math.log2(max(cohort_size, 2))))
    return 0 if 2 * half >= cohort_size - 1 else 2 * half


def _is_full(cohort_size: int, degree: int) -> bool:
    return degree == 0 or degree >= cohort_size - 1


def threshold_floor(cohort_size: int, degree: int) -> int:
    """The smallest t a device accepts: floor(n/2) + 1 on the full graph (degree 0), h + 2 on
    H_{2h,n} (h = ceil(degree / 2)), so that a run of h dropped devices, which cuts the ring,
    leaves the devices beside it below t (module docstring)."""
    if _is_full(cohort_size, degree):
        return cohort_size // 2 + 1
    return math.ceil(degree / 2) + 2


def default_threshold(cohort_size: int, configured_degree: int | None) -> int:
    """t for n devices and the configured SecAgg+ degree (a minimum): the floor of the graph used."""
    return threshold_floor(cohort_size, graph_degree(cohort_size, configured_degree or 0))


def neighbour_graph(device_ids: Sequence[int], degree: int | None, seed: bytes) -> dict[int, frozenset[int]]:
    """N(u) for every u: everyone else when degree is 0/None or >= n - 1; otherwise the Harary graph
    H_{2h,n} (u linked to the h nearest on each side of a ring, h = ceil(degree / 2)) over a
    permutation drawn from `seed` (public randomness), as in SecAgg+ (Bell et al., 2020)."""
    ids = sorted(set(device_ids))
    n = len(ids)
    if not degree or degree >= n - 1:
        return {u: frozenset(ids) - {u} for u in ids}
    if degree < 1:
        raise ValueError(f"degree must be at least 1, got {degree}")
    ring = ring_order(ids, seed)
    half = math.ceil(degree / 2)
    graph: dict[int, set[int]] = {u: set() for u in ids}
    for i, u in enumerate(ring):
        for j in range(1, half + 1):
            v = ring[(i + j) % n]
            graph[u].add(v)
            graph[v].add(u)
    return {u: frozenset(vs) for u, vs in graph.items()}


def ring_order(device_ids: Iterable[int], seed: bytes) -> list[int]:
    """The SecAgg+ ring: the ids sorted by SHA-256(seed || id)."""
    return sorted(device_ids, key=lambda u: hashlib.sha256(seed + struct.pack(">I", u)).digest())


# --------------------------------------------------------------------------- messages


@dataclasses.dataclass(frozen=True)
class SecAggConfig:
    """What every party agrees on before step 1: it fixes k, the threshold t and the graph degree
    (0: the full graph; else the SecAgg+ degree 2h actually used, see `graph_degree`)."""

    round_id: int
    cohort_size: int
    dimension: int
    threshold: int
    clip_norm: float = 1.0
    frac_bits: int = 16
    degree: int = 0

    def __post_init__(self) -> None:
        if self.threshold < 2 or self.threshold > self.cohort_size:
            raise ValueError(f"threshold must be in [2, cohort_size={self.cohort_size}], "
                             f"got {self.threshold}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)) or self.frac_bits < 0 or self.dimension < 1:
            raise ValueError(f"clip_norm ({self.clip_norm}) and dimension ({self.dimension}) must be positive, "
                             f"frac_bits ({self.frac_bits}) non-negative")
        if self.degree < 0:
            raise ValueError(f"degree must be >= 0 (0 = the full graph), got {self.degree}")
        if self.bits > _MAX_BITS:
            raise ValueError(f"the sum needs {self.bits} bits > {_MAX_BITS}: lower frac_bits "
                             f"or the clip norm")

    @property
    def bits(self) -> int:
        return modulus_bits(self.cohort_size, self.clip_norm, self.frac_bits)


@dataclasses.dataclass(frozen=True)
class RoundKeys:
    """Step 0's two X25519 key pairs: (c_u, C_u) for the share channels, (s_u, S_u) for masks."""

    enc_private: bytes
    enc_public: bytes
    mask_private: bytes
    mask_public: bytes


@dataclasses.dataclass(frozen=True)
class AdvertiseKeys:
    """Step 0, device -> server: two X25519 public keys signed with the device's Ed25519 identity.
    The device's index is its position in the cohort (`order_cohort`), so the signature covers the
    identity key, not an index the device does not know yet."""

    round_id: int
    identity_public: bytes
    enc_public: bytes
    mask_public: bytes
    signature: bytes

    @property
    def nbytes(self) -> int:
        """What the device sends: the identity key is the server's already (registration)."""
        return len(self.enc_public) + len(self.mask_public) + len(self.signature)


@dataclasses.dataclass(frozen=True)
class KeyDirectory:
    """Step 0, server -> device u: the cohort's signed adverts in index order, the graph seed the
    server derived from them and the neighbours N(u) it claims; u checks all three."""

    round_id: int
    device_id: int
    cohort: tuple[AdvertiseKeys, ...]
    seed: bytes
    neighbours: frozenset[int]

    @property
    def nbytes(self) -> int:
        per = 3 * PUBLIC_KEY_BYTES + SIGNATURE_BYTES
        return len(self.cohort) * per + len(self.seed) + 4 * len(self.neighbours)


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

    @property
    def nbytes(self) -> int:
        return sum(4 + len(s.nonce) + len(s.ciphertext) for s in self.shares)


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
class ConsistencyRequest:
    """Step 2', server -> devices in U3: who sent masked inputs."""

    round_id: int
    survivors: frozenset[int]


@dataclasses.dataclass(frozen=True)
class ConsistencySignature:
    """Step 2', device -> server: Ed25519 over (round, graph seed, sorted U3)."""

    round_id: int
    device_id: int
    signature: bytes

    @property
    def nbytes(self) -> int:
        return len(self.signature)


@dataclasses.dataclass(frozen=True)
class UnmaskRequest:
    """Step 3, server -> devices: U3, the dropped D = U2 \\ U3, and U3's signatures over U3 {v: sig}."""

    round_id: int
    survivors: frozenset[int]
    dropped: frozenset[int]
    signatures: Mapping[int, bytes]

    @property
    def nbytes(self) -> int:
        return 4 * (len(self.survivors) + len(self.dropped)) + (4 + SIGNATURE_BYTES) * len(self.signatures)


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
    """A device's secrets and what it verified, for one round; lives only on the device."""

    config: SecAggConfig
    device_id: int
    keys: RoundKeys
    identity: Ed25519PrivateKey
    seed: bytes = b""  # the graph seed, once `check_directory` verified the cohort list
    neighbours: Mapping[int, AdvertiseKeys] = dataclasses.field(default_factory=dict)  # N(u), verified
    self_seed: bytes = b""
    held: Mapping[int, tuple[int, int]] = dataclasses.field(default_factory=dict)  # u -> (s, b)
    masked: bool = False  # sent y_u
    signed: frozenset[int] | None = None  # the U3 it signed (once)
    confirmed: frozenset[int] | None = None  # the U3 that gathered t signatures

    @property
    def enc_private(self) -> bytes:
        return self.keys.enc_private

    @property
    def mask_private(self) -> bytes:
        return self.keys.mask_private


# --------------------------------------------------------------------------- signatures


def _public_raw(identity: Ed25519PrivateKey) -> bytes:
    return identity.public_key().public_bytes_raw()


def _verify(public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (ValueError, InvalidSignature):
        return False
    return True


def advert_message(round_id: int, identity_public: bytes, enc_public: bytes, mask_public: bytes) -> bytes:
    """What step 0 signs: the round, the signer's identity key and its two round keys."""
    return _VERSION + b"advertise" + struct.pack(">Q", round_id) + identity_public + enc_public + mask_public


def consistency_message(round_id: int, seed: bytes, survivors: AbstractSet[int]) -> bytes:
    """What step 2' signs: the round, the graph seed (so the cohort list) and sorted U3."""
    ids = sorted(survivors)
    return _VERSION + b"consistency" + struct.pack(f">Q{len(seed)}sI{len(ids)}I", round_id, seed, len(ids), *ids)


def verify_advert(advert: AdvertiseKeys) -> bool:
    """Whether the advert's signature verifies under its identity key."""
    return _verify(advert.identity_public, advert.signature, advert_message(
        advert.round_id, advert.identity_public, advert.enc_public, advert.mask_public))


def verify_survivors(identity_public: bytes, signature: bytes, round_id: int, seed: bytes,
                     survivors: AbstractSet[int]) -> bool:
    """Whether `signature` is `identity_public`'s step-2' signature over (round, seed, U3)."""
    return _verify(identity_public, signature, consistency_message(round_id, seed, survivors))


def graph_seed(round_id: int, cohort: Sequence[AdvertiseKeys]) -> bytes:
    """SHA-256 of the cohort's signed adverts in index order: the SecAgg+ ring's public randomness,
    fixed once the keys are (the server cannot draw it again until the graph suits it)."""
    h = hashlib.sha256(_VERSION + b"graph-seed" + struct.pack(">QI", round_id, len(cohort)))
    for a in cohort:
        h.update(a.identity_public + a.enc_public + a.mask_public + a.signature)
    return h.digest()


# --------------------------------------------------------------------------- device side


def generate_keys(random_bytes: RandomBytes = os.urandom) -> RoundKeys:
    """Step 0 (Bonawitz et al. 2017, Fig. 4 "AdvertiseKeys"): two fresh key pairs for one round.

    In a deployment the keys exist before the cohort (and so the device's index u and the
    round's `SecAggConfig`) is fixed: `begin` binds them to both once the server announces them.
    """
    enc_private, enc_public = _keypair(random_bytes)
    mask_private, mask_public = _keypair(random_bytes)
    return RoundKeys(enc_private, enc_public, mask_private, mask_public)


def advertise(round_id: int, keys: RoundKeys, identity: Ed25519PrivateKey) -> AdvertiseKeys:
    """Step 0: the round keys, signed with the device's identity key."""
    me = _public_raw(identity)
    signature = identity.sign(advert_message(round_id, me, keys.enc_public, keys.mask_public))
    return AdvertiseKeys(round_id, me, keys.enc_public, keys.mask_public, signature)


def begin(config: SecAggConfig, device_id: int, keys: RoundKeys, identity: Ed25519PrivateKey) -> DeviceState:
    """The device's state for the round: its index u, the agreed config, its keys and identity."""
    return DeviceState(config, device_id, keys, identity)


def accept_config(config: SecAggConfig, *, round_id: int, dimension: int, min_degree: int, clip_norm: float,
                  frac_bits: int) -> None:
    """The device's own check of the round's parameters against its task (SecAggError if not):
    its round and dimension; fixed point as the task says (frac_bits, and a clip bound no smaller
    than the device's upload bound: a smaller one would clip away part of its noise share); a
    graph at least as dense as `graph_degree(n, min_degree)`. t is checked in `check_directory`."""
    problems = []
    if config.round_id != round_id:
        problems.append(f"round_id {config.round_id} != {round_id}")
    if config.dimension != dimension:
        problems.append(f"dimension {config.dimension} != the update's {dimension}")
    if config.frac_bits != frac_bits:
        problems.append(f"frac_bits {config.frac_bits} != the task's {frac_bits}")
    if not config.clip_norm >= clip_norm * (1 - 1e-12):
        problems.append(f"clip_norm {config.clip_norm} < the device's upload bound {clip_norm}")
    need = graph_degree(config.cohort_size, min_degree)
    if not _is_full(config.cohort_size, config.degree) and (need == 0 or config.degree < need):
        problems.append(f"degree {config.degree} < {need or 'the full graph'} for {config.cohort_size} devices "
                        f"(secagg_degree {min_degree})")
    if problems:
        raise SecAggError("refusing the round's secure-aggregation parameters: " + "; ".join(problems))


def check_directory(state: DeviceState, directory: KeyDirectory) -> DeviceState:
    """End of step 0 on the device: verify the cohort list, the graph and the threshold, or refuse.

    Checks, each a SecAggError: round and index; n = config.cohort_size; identity keys strictly
    increasing (distinct, and no choice of order for the server); entry u is this device's own;
    the seed is `graph_seed` of the list; N(u) is the graph's; every neighbour's advert signed by
    its identity key for this round; t >= `threshold_floor(n, degree)` and N(u) + u can hold t
    shares. Only N(u)'s signatures are verified (O(log n) of them under SecAgg+): a doctored entry
    elsewhere is its own neighbours' to refuse, and the consistency signatures bind every signer to
    this same list (the seed).
    """
    cfg, u = state.config, state.device_id
    n = cfg.cohort_size
    if directory.round_id != cfg.round_id or directory.device_id != u:
        raise SecAggError(f"device {u}: key directory is for another round or device")
    if len(directory.cohort) != n or not 0 <= u < n:
        raise SecAggError(f"device {u}: key directory lists {len(directory.cohort)} devices; cohort_size is {n}")
    floor = threshold_floor(n, cfg.degree)
    if cfg.threshold < floor:
        raise SecAggError(f"device {u}: threshold {cfg.threshold} is below {floor}, the least this device "
                          f"accepts for {n} devices at degree {cfg.degree or 'full'}")
    for v, a in enumerate(directory.cohort):
        if a.round_id != cfg.round_id:
            raise SecAggError(f"device {u}: device {v}'s advert is for round {a.round_id}")
        if v and a.identity_public <= directory.cohort[v - 1].identity_public:
            raise SecAggError(f"device {u}: the cohort's identity keys are duplicated or out of order at {v}")
    mine = directory.cohort[u]
    if (mine.identity_public, mine.enc_public, mine.mask_public) != (
            _public_raw(state.identity), state.keys.enc_public, state.keys.mask_public):
        raise SecAggError(f"device {u}: entry {u} of the key directory is not this device's keys")
    seed = graph_seed(cfg.round_id, directory.cohort)
    if seed != directory.seed:
        raise SecAggError(f"device {u}: the graph seed is not the hash of the cohort's adverts")
    neighbours = neighbour_graph(range(n), cfg.degree, seed)[u]
    if neighbours != directory.neighbours:
        raise SecAggError(f"device {u}: the server's neighbours {sorted(directory.neighbours)[:8]} are not "
                          f"the graph's {sorted(neighbours)[:8]}")
    for v in sorted(neighbours):
        if not verify_advert(directory.cohort[v]):
            raise SecAggError(f"device {u}: device {v}'s advertised keys are not signed by its identity key "
                              f"for round {cfg.round_id} (substituted keys?)")
    if len(neighbours) + 1 < cfg.threshold:
        raise SecAggError(f"device {u}: {len(neighbours)} neighbours cannot hold {cfg.threshold} shares")
    return dataclasses.replace(state, seed=seed, neighbours={v: directory.cohort[v] for v in neighbours})


def share_keys(state: DeviceState, random_bytes: RandomBytes = os.urandom) -> tuple[DeviceState, ShareKeys]:
    """Step 1: draw b_u, Shamir-share s_u and b_u to N(u) + u, encrypt each pair for its holder."""
    cfg, u = state.config, state.device_id
    if not state.seed:
        raise SecAggError(f"device {u}: no verified key directory (call check_directory first)")
    self_seed = random_bytes(32)
    holders = sorted(set(state.neighbours) | {u})
    xs = [_point(v) for v in holders]
    s_shares = shamir_split(int.from_bytes(state.mask_private, "big"), cfg.threshold, xs, random_bytes)
    b_shares = shamir_split(int.from_bytes(self_seed, "big"), cfg.threshold, xs, random_bytes)
    out = []
    for v in holders:
        their_enc = state.keys.enc_public if v == u else state.neighbours[v].enc_public
        key = _channel_key(state.enc_private, their_enc, cfg.round_id, u, v)
        plaintext = struct.pack(">II", u, v) + s_shares[_point(v)].to_bytes(_FIELD_BYTES, "big") \
            + b_shares[_point(v)].to_bytes(_FIELD_BYTES, "big")
        nonce = random_bytes(12)
        aad = _VERSION + struct.pack(">QII", cfg.round_id, u, v)
        out.append(EncryptedShare(u, v, nonce, AESGCM(key).encrypt(nonce, plaintext, aad)))
    return dataclasses.replace(state, self_seed=self_seed), ShareKeys(cfg.round_id, u, tuple(out))


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

    Refuses (SecAggError) with fewer than t valid shares, its own included (|U2| >= t in
    Bonawitz et al. 2017): otherwise a server that withheld them would get y_u masked by PRG(b_u)
    alone and could then ask u's neighbours for b_u. Pairwise masks are added only for neighbours
    whose shares arrived (U2 as u sees it).
    """
    cfg, u = state.config, state.device_id
    if bundle.round_id != cfg.round_id or bundle.recipient != u:
        raise SecAggError(f"device {u}: share bundle is for another round or device")
    if vector.shape != (cfg.dimension,):
        raise SecAggError(f"device {u}: vector shape {vector.shape} != ({cfg.dimension},)")
    if not state.self_seed or state.masked:
        raise SecAggError(f"device {u}: masks its input once, after sharing its keys")
    held: dict[int, tuple[int, int]] = {}
    for share in bundle.shares:
        if share.sender != u and share.sender not in state.neighbours:
            raise SecAggError(f"device {u}: share from {share.sender}, who is not a neighbour")
        if share.sender in held:
            raise SecAggError(f"device {u}: two shares from {share.sender}")
        sender_enc = state.keys.enc_public if share.sender == u else state.neighbours[share.sender].enc_public
        held[share.sender] = _open_share(state, share, sender_enc)
    if len(held) < cfg.threshold:
        raise SecAggError(f"device {u}: received {len(held)} valid shares (itself included); threshold is "
                          f"{cfg.threshold}: refusing to send its masked input")
    bits, mask = cfg.bits, _dtype(cfg.bits)(2**cfg.bits - 1)
    y = encode(vector, cfg.clip_norm, cfg.frac_bits, bits)
    y += expand_mask(state.self_seed, cfg.dimension, bits)
    for v in sorted(held):
        if v == u:
            continue
        seed = agree_seed(state.mask_private, state.neighbours[v].mask_public, cfg.round_id, u, v)
        if u < v:
            y += expand_mask(seed, cfg.dimension, bits)
        else:
            y -= expand_mask(seed, cfg.dimension, bits)
    y &= mask
    return dataclasses.replace(state, held=held, masked=True), MaskedInput(cfg.round_id, u, y)


def sign_survivors(state: DeviceState, request: ConsistencyRequest) -> tuple[DeviceState, ConsistencySignature]:
    """Step 2': sign (round, graph seed, U3), once, if u sent its input, is in U3 and |U3| >= t."""
    cfg, u = state.config, state.device_id
    survivors = frozenset(request.survivors)
    if request.round_id != cfg.round_id:
        raise SecAggError(f"device {u}: consistency request is for round {request.round_id}")
    if not state.masked or u not in survivors:
        raise SecAggError(f"device {u}: signs a survivor set only after its masked input, and only one naming it")
    if len(survivors) < cfg.threshold or not survivors <= set(range(cfg.cohort_size)):
        raise SecAggError(f"device {u}: refusing to sign {len(survivors)} survivors (threshold {cfg.threshold}, "
                          f"cohort 0..{cfg.cohort_size - 1})")
    if state.signed is not None and state.signed != survivors:
        raise SecAggError(f"device {u}: already signed another survivor set this round")
    signature = state.identity.sign(consistency_message(cfg.round_id, state.seed, survivors))
    return dataclasses.replace(state, signed=survivors), ConsistencySignature(cfg.round_id, u, signature)


def check_consistency(state: DeviceState, request: UnmaskRequest) -> DeviceState:
    """Start of step 3: the U3 of the request is the one u signed, and >= t devices of N(u) + u
    signed exactly it with the identity keys u verified in step 0 (Bonawitz et al. 2017, Fig. 4,
    ConsistencyCheck). Keys are distinct (step 0), so t signatures are t devices."""
    cfg, u = state.config, state.device_id
    if request.round_id != cfg.round_id:
        raise SecAggError(f"device {u}: unmask request is for round {request.round_id}")
    if state.signed is None or frozenset(request.survivors) != state.signed:
        raise SecAggError(f"device {u}: the survivors to unmask are not the set it signed")
    identities = {v: a.identity_public for v, a in state.neighbours.items()}
    valid = 1  # its own: it signed exactly this set (`sign_survivors`), whatever the server relays
    for v, sig in sorted(request.signatures.items()):  # verify until t are valid: each check costs ~70 us
        if valid >= cfg.threshold:
            break
        if v != u and v in identities and v in state.signed \
                and verify_survivors(identities[v], sig, cfg.round_id, state.seed, state.signed):
            valid += 1
    if valid < cfg.threshold:
        raise SecAggError(f"device {u}: {valid} of its neighbourhood signed this survivor set; threshold is "
                          f"{cfg.threshold}: refusing to unmask (the server may have told devices different sets)")
    return dataclasses.replace(state, confirmed=state.signed)


def unmask(state: DeviceState, request: UnmaskRequest) -> UnmaskResponse:
    """Step 3: reveal b-shares for survivors and s-shares for the dropped, never both for one u.

    Refuses unless `check_consistency` confirmed this U3, D is disjoint from it, and >= t of
    N(u) + u survived (fewer means a run of dropouts cuts the SecAgg+ ring next to u; module
    docstring). The last is implied by the t signatures, which come from survivors of N(u) + u;
    it is checked again so that this function's refusal does not rest on the caller's order.
    """
    cfg, u = state.config, state.device_id
    if request.round_id != cfg.round_id:
        raise SecAggError(f"device {u}: unmask request is for round {request.round_id}")
    if request.survivors & request.dropped:
        raise SecAggError(f"device {u}: devices {sorted(request.survivors & request.dropped)} "
                          f"are listed as both surviving and dropped")
    if state.confirmed is None or frozenset(request.survivors) != state.confirmed:
        raise SecAggError(f"device {u}: refusing to unmask a survivor set without t signatures over it")
    near = (set(state.neighbours) | {u}) & request.survivors
    if len(near) < cfg.threshold:
        raise SecAggError(f"device {u}: only {len(near)} of its neighbourhood survived; threshold is "
                          f"{cfg.threshold}: refusing to unmask")
    b_shares = {v: pair[1] for v, pair in state.held.items() if v in request.survivors}
    s_shares = {v: pair[0] for v, pair in state.held.items() if v in request.dropped}
    return UnmaskResponse(cfg.round_id, u, b_shares, s_shares)


# --------------------------------------------------------------------------- server side


def order_cohort(round_id: int, adverts: Iterable[AdvertiseKeys]) -> tuple[AdvertiseKeys, ...]:
    """Step 0 (server): the cohort U1 in index order (by identity key). An honest server verifies
    each advert as it arrives (`verify_advert`), so that no device trips on junk; the devices do not
    rely on it (`check_directory`)."""
    cohort = sorted(adverts, key=lambda a: a.identity_public)
    for i, a in enumerate(cohort):
        if a.round_id != round_id:
            raise SecAggError(f"an advert for round {a.round_id} in round {round_id}")
        if i and a.identity_public == cohort[i - 1].identity_public:
            raise SecAggError("two adverts carry the same identity key")
    return tuple(cohort)


def cohort_graph(config: SecAggConfig, cohort: Sequence[AdvertiseKeys]) -> dict[int, frozenset[int]]:
    """N(u) for the cohort: the graph of `config.degree` over the seed the adverts fix."""
    return neighbour_graph(range(len(cohort)), config.degree, graph_seed(config.round_id, cohort))


def key_directories(config: SecAggConfig, cohort: Sequence[AdvertiseKeys]) -> dict[int, KeyDirectory]:
    """Step 0 (server): after >= t adverts, give each u the signed list, the seed and N(u)."""
    n = len(cohort)
    if n < config.threshold or n != config.cohort_size:
        raise SecAggError(f"{n} devices advertised keys; cohort_size is {config.cohort_size}, "
                          f"threshold is {config.threshold}")
    seed = graph_seed(config.round_id, cohort)
    graph = neighbour_graph(range(n), config.degree, seed)
    smallest = min(len(vs) + 1 for vs in graph.values())
    if smallest < config.threshold:
        raise SecAggError(f"a neighbourhood of {smallest} devices cannot hold {config.threshold} "
                          f"shares: raise the degree or lower the threshold")
    frozen = tuple(cohort)
    return {u: KeyDirectory(config.round_id, u, frozen, seed, graph[u]) for u in range(n)}


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


def consistency_request(config: SecAggConfig, masked: Sequence[MaskedInput], shared: AbstractSet[int]
                        ) -> ConsistencyRequest:
    """Step 2 (server): U3 = devices whose masked input arrived."""
    survivors = frozenset(m.device_id for m in masked)
    if not survivors <= shared:
        raise SecAggError(f"masked inputs from devices that did not share keys: {sorted(survivors - shared)}")
    if len(survivors) < config.threshold:
        raise SecAggError(f"only {len(survivors)} masked inputs arrived; threshold is {config.threshold}")
    return ConsistencyRequest(config.round_id, survivors)


def unmask_request(config: SecAggConfig, request: ConsistencyRequest, signatures: Sequence[ConsistencySignature],
                   shared: AbstractSet[int]) -> UnmaskRequest:
    """Step 2' (server): the survivors' signatures over U3, U3 and D = U2 \\ U3; fewer than t
    signers fails the round. The server does not verify the signatures: every device verifies those
    it needs (`check_consistency`, it cannot take the server's word), and a bad one counts there as a
    device that did not sign, which a device can do anyway. (Adverts are verified on receipt: a bad
    one would make every neighbour refuse its key directory, failing the round for all.)"""
    valid = {s.device_id: s.signature for s in signatures
             if s.device_id in request.survivors and s.round_id == config.round_id and len(s.signature) == 64}
    if len(valid) < config.threshold:
        raise SecAggError(f"only {len(valid)} of {len(request.survivors)} survivors signed the survivor set; "
                          f"threshold is {config.threshold}")
    return UnmaskRequest(config.round_id, request.survivors, frozenset(shared) - request.survivors, valid)


def _reconstruct(config: SecAggConfig, owner: int, shares: Mapping[int, int], what: str) -> bytes:
    if len(shares) < config.threshold:
        raise SecAggError(f"only {len(shares)} shares of device {owner}'s {what} arrived; "
                          f"threshold is {config.threshold}: the round fails, no sum is released")
    chosen = dict(sorted(shares.items())[: config.threshold])
    secret = shamir_combine({_point(v): y for v, y in chosen.items()})
    if secret >= 2**256:
        raise SecAggError(f"device {owner}'s {what} did not reconstruct (inconsistent shares)")
    return secret.to_bytes(32, "big")


def aggregate(config: SecAggConfig, cohort: Sequence[AdvertiseKeys], graph: Mapping[int, frozenset[int]],
              masked: Sequence[MaskedInput], request: UnmaskRequest,
              responses: Sequence[UnmaskResponse]) -> np.ndarray:
    """Step 3 (server): sum_{u in U3} y_u - PRG(b_u) -+ masks with D, decoded to float64 [D].

    Raises SecAggError, releasing nothing, if fewer than t signers answered or any needed secret
    has fewer than t shares.
    """
    responders = {r.device_id: r for r in responses if r.device_id in request.signatures}
    if len(responders) < config.threshold:
        raise SecAggError(f"only {len(responders)} devices answered the unmasking; threshold is "
                          f"{config.threshold}: the round fails, no sum is released")
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
            seed = agree_seed(mask_private, cohort[v].mask_public, config.round_id, d, v)
            if v < d:  # v added +PRG(s_vd)
                total -= expand_mask(seed, config.dimension, bits)
            else:
                total += expand_mask(seed, config.dimension, bits)
    return decode(total, config.frac_bits, bits)


# --------------------------------------------------------------------------- in-process round


@dataclasses.dataclass(frozen=True)
class RoundOutcome:
    """What an in-process round returns: the sum, who is in it, and what it cost, per party
    (the caller's order: vectors[i] is party i). The `auth` figures are the part of the cost spent
    on the active-adversary defences: signing and verifying adverts, the directory check, the
    consistency round (signatures, their relay and check)."""

    total: np.ndarray  # [D] float64, sum of the clipped inputs of `included`
    included: frozenset[int]
    bits: int
    degree: int  # the graph degree used (0: full)
    threshold: int
    device_seconds: Mapping[int, float]
    device_auth_seconds: Mapping[int, float]
    device_bytes_sent: Mapping[int, int]
    device_auth_bytes_sent: Mapping[int, int]
    device_bytes_received: Mapping[int, int]
    server_seconds: float
    server_auth_seconds: float


def seeded_identity(seed: int, label: str) -> Ed25519PrivateKey:
    """A deterministic Ed25519 identity for tests: never use outside tests."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.shake_256(f"{seed}/{label}/identity".encode()).digest(32))


def simulate_round(
    vectors: Sequence[np.ndarray], *, clip_norm: float = 1.0, frac_bits: int = 16,
    threshold: int | None = None, neighbours: int | None = None, round_id: int = 0,
    dropout_before_masking: AbstractSet[int] = frozenset(),
    dropout_after_masking: AbstractSet[int] = frozenset(),
    identities: Sequence[Ed25519PrivateKey] | None = None,
    rng_seed_for_tests: int | None = None,
) -> RoundOutcome:
    """Run every party of one round in this process, timing devices and server apart.

    Party i holds vectors[i] and identities[i] (fresh Ed25519 keys when None); its cohort index
    is the rank of its identity key. `neighbours`: the configured SecAgg+ degree, a minimum
    (`graph_degree`; None or 0 = the full graph). `threshold` defaults to `threshold_floor`; a lower
    one is refused by the devices. `dropout_before_masking`: shared keys, never sent a masked input
    (their pairwise masks are removed; they are not in the sum). `dropout_after_masking`: sent a
    masked input, then answered nothing more (they are in the sum). The devices run the same checks
    as in a deployment, `accept_config` included.
    """
    n = len(vectors)
    dim = int(np.asarray(vectors[0]).size)
    degree = graph_degree(n, neighbours or 0)
    t = threshold if threshold is not None else threshold_floor(n, degree)
    config = SecAggConfig(round_id, n, dim, t, clip_norm, frac_bits, degree)

    def source(label: str) -> RandomBytes:
        return os.urandom if rng_seed_for_tests is None else seeded_random_bytes(rng_seed_for_tests, label)

    if identities is None:
        identities = [Ed25519PrivateKey.generate() if rng_seed_for_tests is None
                      else seeded_identity(rng_seed_for_tests, f"device-{i}") for i in range(n)]
    seconds, auth = dict.fromkeys(range(n), 0.0), dict.fromkeys(range(n), 0.0)
    sent, auth_sent, received = dict.fromkeys(range(n), 0), dict.fromkeys(range(n), 0), dict.fromkeys(range(n), 0)
    server = server_auth = 0.0

    def timed(party: int, fn: Callable[..., _T], *args: Any, is_auth: bool = False, **kwargs: Any) -> _T:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        elapsed = time.perf_counter() - start
        seconds[party] += elapsed
        if is_auth:
            auth[party] += elapsed
        return out

    keys, adverts = {}, []
    for i in range(n):
        keys[i] = timed(i, generate_keys, source(f"device-{i}"))
        advert = timed(i, advertise, round_id, keys[i], identities[i], is_auth=True)
        sent[i] += advert.nbytes
        auth_sent[i] += len(advert.signature)
        adverts.append(advert)

    start = time.perf_counter()
    if not all(verify_advert(a) for a in adverts):  # on receipt, as the deployment does
        raise SecAggError("an advert does not verify under its identity key")
    server_auth += time.perf_counter() - start
    cohort = order_cohort(round_id, adverts)
    index = {a.identity_public: u for u, a in enumerate(cohort)}
    party_of = {index[a.identity_public]: i for i, a in enumerate(adverts)}
    directories = key_directories(config, cohort)
    graph = {u: d.neighbours for u, d in directories.items()}
    server += time.perf_counter() - start

    states, share_msgs = {}, []
    for u in range(n):
        i = party_of[u]
        timed(i, accept_config, config, round_id=round_id, dimension=dim, min_degree=neighbours or 0,
              clip_norm=clip_norm, frac_bits=frac_bits)
        received[i] += directories[u].nbytes
        states[u] = timed(i, check_directory, begin(config, u, keys[i], identities[i]), directories[u], is_auth=True)
        states[u], msg = timed(i, share_keys, states[u], source(f"device-{i}-shares"))
        sent[i] += msg.nbytes
        share_msgs.append(msg)

    start = time.perf_counter()
    bundles = route_shares(config, share_msgs)
    server += time.perf_counter() - start

    masked = []
    for u in range(n):
        i = party_of[u]
        if i in dropout_before_masking:
            continue
        received[i] += bundles[u].nbytes
        states[u], msg = timed(i, mask_input, states[u], bundles[u], np.asarray(vectors[i]).ravel())
        sent[i] += msg.nbytes
        masked.append(msg)

    start = time.perf_counter()
    request = consistency_request(config, masked, set(bundles))
    server += time.perf_counter() - start

    signatures = []
    answering = sorted(u for u in request.survivors if party_of[u] not in dropout_after_masking)
    for u in answering:
        i = party_of[u]
        received[i] += 4 * len(request.survivors)
        states[u], sig = timed(i, sign_survivors, states[u], request, is_auth=True)
        sent[i] += sig.nbytes
        auth_sent[i] += sig.nbytes
        signatures.append(sig)

    start = time.perf_counter()
    unmasking = unmask_request(config, request, signatures, set(bundles))
    elapsed = time.perf_counter() - start
    server, server_auth = server + elapsed, server_auth + elapsed

    responses = []
    for u in answering:
        i = party_of[u]
        mine = {v: s for v, s in unmasking.signatures.items() if v in graph[u] | {u}}  # what u is sent
        view = dataclasses.replace(unmasking, signatures=mine)
        received[i] += view.nbytes
        states[u] = timed(i, check_consistency, states[u], view, is_auth=True)
        response = timed(i, unmask, states[u], view)
        sent[i] += response.nbytes
        responses.append(response)

    start = time.perf_counter()
    total = aggregate(config, cohort, graph, masked, unmasking, responses)
    server += time.perf_counter() - start
    included = frozenset(party_of[u] for u in request.survivors)
    return RoundOutcome(total, included, config.bits, degree, t, seconds, auth, sent, auth_sent, received,
                        server, server_auth)


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
