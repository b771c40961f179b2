"""Signed releases of the global adapter: a manifest, signed by the server's release key (Ed25519).

    manifest = {schema, version, parent_version, sha256, round, strategy, base_model,
                issued_at, expires_at[, epsilon, delta]}

epsilon and delta, present only for a run with differential privacy, are the model's recipients'
epsilon spent so far: signed, so the device's privacy lock can show them without trusting a file.
    signature = Ed25519_sign(release_key, canonical_json(manifest))

canonical_json is UTF-8 JSON with sorted keys and no spaces, so signer and verifier hash the same
bytes. A device accepts a manifest only when (TUF's three classic attacks, Samuel et al. 2010):
    - the signature verifies against the release key it trusts       (tampering)
    - version > the version it runs, or equal with the same sha256   (rollback)
    - now < expires_at                                               (freeze)
The server re-signs the newest manifest with a fresh expiry whenever it serves it, so a device
that is held on an old manifest by an attacker sees it expire.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pocketfed.files import write_atomic

MANIFEST_SCHEMA = 1
KEY_FILE = "release.key"
PUB_FILE = "release.pub"


OPTIONAL = frozenset({"epsilon", "delta"})


class ReleaseRejected(Exception):
    """A release manifest the device must not install; the message says why."""


@dataclass(frozen=True)
class Manifest:
    version: int
    parent_version: int  # -1 for the initial adapter
    sha256: str  # of the adapter blob (safetensors)
    round: int  # committed rounds this adapter is the result of
    strategy: str
    base_model: str
    issued_at: float
    expires_at: float
    schema: int = MANIFEST_SCHEMA
    epsilon: float | None = None  # differential privacy of the adapter (absent from the JSON without DP)
    delta: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k not in OPTIONAL}

    @staticmethod
    def from_json(data: dict[str, Any]) -> "Manifest":
        fields = set(Manifest.__dataclass_fields__)
        if not isinstance(data, dict) or not fields - OPTIONAL <= set(data) <= fields:
            raise ReleaseRejected(f"manifest fields must be {sorted(fields - OPTIONAL)} and optionally {sorted(OPTIONAL)}")
        try:
            m = Manifest(**data)
        except TypeError as e:
            raise ReleaseRejected(f"manifest is malformed ({e})") from None
        if not (isinstance(m.version, int) and isinstance(m.sha256, str) and len(m.sha256) == 64):
            raise ReleaseRejected("manifest version must be an integer and sha256 64 hex digits")
        return m


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(key: Ed25519PrivateKey, manifest: Manifest) -> str:
    """The hex Ed25519 signature of the manifest's canonical JSON."""
    return key.sign(canonical_json(manifest.to_json())).hex()


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_from_hex(text: str) -> Ed25519PublicKey:
    try:
        raw = bytes.fromhex(text.strip())
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ReleaseRejected("the release public key must be 64 hex digits (32 bytes)") from None


def verify(
    public_key: Ed25519PublicKey,
    manifest_json: dict[str, Any],
    signature_hex: str,
    now: float,
    installed: Manifest | None,
) -> Manifest:
    """The manifest, if it is signed by `public_key`, not expired, and not a rollback of `installed`.

    Raises ReleaseRejected naming the reason (tampered, expired, rollback)."""
    try:
        signature = bytes.fromhex(signature_hex)
        public_key.verify(signature, canonical_json(manifest_json))
    except (ValueError, InvalidSignature):
        raise ReleaseRejected("manifest signature does not verify against the trusted release key (tampered?)") from None
    m = Manifest.from_json(manifest_json)
    if m.schema != MANIFEST_SCHEMA:
        raise ReleaseRejected(f"manifest schema {m.schema} is not {MANIFEST_SCHEMA}")
    if now >= m.expires_at:
        raise ReleaseRejected(f"manifest of version {m.version} expired at {m.expires_at:.0f} (frozen release?)")
    if installed is not None:
        if m.version < installed.version:
            raise ReleaseRejected(f"manifest version {m.version} is older than the installed {installed.version} (rollback)")
        if m.version == installed.version and m.sha256 != installed.sha256:
            raise ReleaseRejected(f"manifest version {m.version} names another adapter than the installed one (rollback)")
    return m


def load_or_create_key(folder: Path, name: str = KEY_FILE) -> Ed25519PrivateKey:
    """An Ed25519 private key kept as PEM in `folder/name` (mode 0600), created on first use.

    For the release key, its public half is also written to `folder/release.pub` (hex)."""
    path = folder / name
    if path.is_file():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 key")
    else:
        key = Ed25519PrivateKey.generate()  # from the OS's CSPRNG
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        write_atomic(path, pem, mode=0o600)
    if name == KEY_FILE:
        pub = folder / PUB_FILE
        if not pub.is_file() or pub.read_text().strip() != public_hex(key):
            write_atomic(pub, (public_hex(key) + "\n").encode(), mode=0o600)
            os.chmod(pub, 0o644)
    return key
