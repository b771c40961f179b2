"""Device registration (Ed25519 keys, one-time enrollment tokens)."""

from __future__ import annotations

from pocketfed.server.service import ENROLLMENT_REFUSED, KEY_TAKEN, NAME_TAKEN, NOT_ENROLLED, Coordinator, Refused
from pocketfed.server.store import sha256_hex


def register(c: Coordinator, name: str, public_key: str, now: float, token: str | None = None) -> str:
    """Register a device under `name` with its Ed25519 key (idempotent for the same pair). Unless
    deploy.open_registration, a new pair spends a one-time enrollment token (`enroll`).

    Every caller without a valid token gets the same answer whatever the name (enrollment_required
    or enrollment_refused, by what it sent): only an enrolled caller learns that a name is taken,
    and its token is then not spent (the transaction rolls back), so it may choose another name."""
    with c.lock:
        owner = c.store.device_key(name)
        known = c.store.device_by_key(public_key)
        if owner == public_key:
            return name
        if known is not None:  # the caller signed with this key: it is that device, and may know it
            raise Refused(KEY_TAKEN, f"this key is already registered as device {known!r}")
        with c.store.transaction():
            if not c.cfg.deploy.open_registration:
                if not token:
                    raise Refused(NOT_ENROLLED, "this coordinator registers enrolled devices only: run "
                                  "`pocketfed enroll` on the server and give the device its token (--enroll-token)")
                if not c.store.spend_enrollment(sha256_hex(token.encode()), name, now):
                    raise Refused(ENROLLMENT_REFUSED, "the enrollment token is unknown, expired or already used; "
                                  "ask the server's operator for a new one (`pocketfed enroll`)")
            if owner is not None:
                raise Refused(NAME_TAKEN, f"device name {name!r} is registered with another key; choose another --name")
            c.store.add_device(name, public_key, now)
        return name



