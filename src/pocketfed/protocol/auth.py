"""Request signing: every device request carries its key, a timestamp, a nonce and an Ed25519
signature over the request, body included.

    message   = "pocketfed-v1\\n" METHOD "\\n" path?query "\\n" timestamp "\\n" nonce "\\n" sha256(body)
    headers   X-PF-Key: public key (hex)    X-PF-Timestamp: unix seconds
              X-PF-Nonce: 16 random bytes (hex)    X-PF-Signature: Ed25519(message) (hex)

The server refuses (in this order) malformed headers, a timestamp more than the allowed skew
from its clock, a key no device registered (all three from the headers alone, before a byte of the
body is read: `check_headers`), a signature that does not verify (over the body's sha256, computed
as the body streams in: `Headers.verify`), and a nonce this key already used (nonces are kept for
twice the skew, which covers every timestamp still accepted; only a registered key's verified
requests spend one, so strangers add no rows).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY, TIMESTAMP, NONCE, SIGNATURE = "x-pf-key", "x-pf-timestamp", "x-pf-nonce", "x-pf-signature"
_HEX = re.compile(r"^[0-9a-f]+$")

# Refusal codes.
BAD_HEADERS, STALE, BAD_SIGNATURE, UNKNOWN_DEVICE, REPLAYED = (
    "bad_auth_headers", "stale_timestamp", "bad_signature", "unknown_device", "replayed_request")


class AuthError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class SignedRequest:
    public_key: str  # hex
    timestamp: float
    nonce: str


def message(method: str, path_qs: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    return digest_message(method, path_qs, timestamp, nonce, hashlib.sha256(body).hexdigest())


def digest_message(method: str, path_qs: str, timestamp: str, nonce: str, body_sha256: str) -> bytes:
    """The signed message, from the body's sha256 (hex): a server that streams a body to disk
    hashes it as it arrives and checks the signature at the end."""
    return "\n".join(["pocketfed-v1", method.upper(), path_qs, timestamp, nonce, body_sha256]).encode()


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def sign_headers(key: Ed25519PrivateKey, method: str, path_qs: str, body: bytes,
                 now: float | None = None, nonce: str | None = None) -> dict[str, str]:
    ts = f"{time.time() if now is None else now:.3f}"
    nonce = nonce or secrets.token_hex(16)
    sig = key.sign(message(method, path_qs, ts, nonce, body)).hex()
    return {KEY: public_hex(key), TIMESTAMP: ts, NONCE: nonce, SIGNATURE: sig}


@dataclass(frozen=True)
class Headers:
    """A request's signature headers, well formed and within the clock window (signature unchecked)."""

    public_key: str
    timestamp: str  # as sent: the signed message holds these characters
    nonce: str
    signature: str

    def verify(self, method: str, path_qs: str, body_sha256: str) -> SignedRequest:
        """The signature over the request whose body has this sha256 (hex), or AuthError."""
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.public_key)).verify(
                bytes.fromhex(self.signature), digest_message(method, path_qs, self.timestamp, self.nonce, body_sha256))
        except (ValueError, InvalidSignature):
            raise AuthError(BAD_SIGNATURE, "request signature does not verify for X-PF-Key") from None
        return SignedRequest(self.public_key, float(self.timestamp), self.nonce)


def check_headers(headers: Mapping[str, str], now: float, max_skew_s: float) -> Headers:
    """Check what the headers alone can show: their form and the timestamp's freshness (before any
    body is read; the signature, which covers the body, is `Headers.verify`'s)."""
    key, ts, nonce, sig = (headers.get(h, "") for h in (KEY, TIMESTAMP, NONCE, SIGNATURE))
    if not (len(key) == 64 and _HEX.match(key)):
        raise AuthError(BAD_HEADERS, "X-PF-Key must be the device's Ed25519 public key as 64 hex digits")
    if not (len(nonce) == 32 and _HEX.match(nonce)):
        raise AuthError(BAD_HEADERS, "X-PF-Nonce must be 32 hex digits")
    if not (len(sig) == 128 and _HEX.match(sig)):
        raise AuthError(BAD_HEADERS, "X-PF-Signature must be 128 hex digits")
    try:
        t = float(ts)
        if len(ts) > 24 or t != t or t in (float("inf"), float("-inf")):
            raise ValueError
    except ValueError:
        raise AuthError(BAD_HEADERS, "X-PF-Timestamp must be unix seconds, e.g. 1700000000.123") from None
    if abs(now - t) > max_skew_s:
        raise AuthError(STALE, f"request timestamp is {now - t:+.0f} s from the server's clock; "
                               f"at most {max_skew_s:.0f} s is accepted (check the device clock)")
    return Headers(key, ts, nonce, sig)


def verify_headers(headers: Mapping[str, str], method: str, path_qs: str, body: bytes,
                   now: float, max_skew_s: float) -> SignedRequest:
    """Check form, freshness and signature (not registration or replay: those need the store)."""
    return check_headers(headers, now, max_skew_s).verify(method, path_qs, hashlib.sha256(body).hexdigest())
