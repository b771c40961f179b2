"""One-time enrollment tokens (`pocketfed enroll`). Light on purpose: the command imports only this
module and the store, never the round engine (and so never torch)."""

from __future__ import annotations

import secrets
import time

from pocketfed.errors import UserError
from pocketfed.server.store import Store, sha256_hex

ENROLL_TTL_S = 7 * 86400.0


def enroll(store: Store, count: int = 1, ttl_s: float = ENROLL_TTL_S, now: float | None = None) -> list[str]:
    """`count` new one-time enrollment tokens, valid for `ttl_s` seconds. Only their sha256 is stored,
    so the state folder does not hold a usable token; a token is 32 random bytes (secrets)."""
    if count < 1 or count > 10_000:
        raise UserError(f"--count must be between 1 and 10000, not {count}")
    if not ttl_s > 0:
        raise UserError(f"--ttl-hours must be positive, not {ttl_s / 3600:g}")
    now = time.time() if now is None else now
    tokens = [secrets.token_urlsafe(32) for _ in range(count)]
    with store.transaction():
        for token in tokens:
            store.add_enrollment(sha256_hex(token.encode()), now, now + ttl_s)
    return tokens
