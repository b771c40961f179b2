"""A device's releases, without torch: trust the coordinator's key, verify and install releases.

`pocketfed device` (device/agent.py) and the light `pocketfed release status|pull|verify|trust`
commands both go through here, so a release is checked the same way whoever installs it:
signature against the trusted key, expiry, rollback (`pocketfed.signing.verify`), and the
adapter's sha256; then `pocketfed.runtime.home.install_release` writes it atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pocketfed.errors import UserError
from pocketfed.files import write_atomic
from pocketfed.protocol import wire
from pocketfed import signing
from pocketfed.runtime import home as device_home


class KeyChanged(UserError):
    """The server signs releases with another key than the one this home trusts."""


def installed_task(home: Path) -> dict[str, Any]:
    """The task settings kept with the installed release ({} when none is installed)."""
    found = device_home.read_release(home)
    return (device_home.read_json(found[2] / device_home.TASK) or {}) if found is not None else {}


def trusted_release_key(home: Path, pinned: Path | None, fetch: Callable[[], str], server: str = "the server") -> Any:
    """The release public key: --release-key if given, else the one pinned in <home> on first
    contact (trust on first use), else fetched from the server over TLS and pinned now.

    A pinned key that is not the one the server now signs with raises KeyChanged: one sentence
    saying what changed and how to trust the new key, instead of refusing every release after."""
    if pinned is not None:
        if not pinned.is_file():
            raise UserError(f"release key file {str(pinned)!r} does not exist")
        try:
            return signing.public_from_hex(pinned.read_text())
        except signing.ReleaseRejected:
            raise UserError(f"{str(pinned)!r} must hold the release public key as 64 hex digits") from None
    pin = home / device_home.RELEASE_PIN
    if not pin.is_file():
        write_atomic(pin, (fetch() + "\n").encode())
        return signing.public_from_hex(pin.read_text())
    trusted = pin.read_text().strip()
    served = fetch().strip()
    if served != trusted:
        from pocketfed.runtime.privacy_lock import key_fingerprint

        raise KeyChanged(
            f"{server} now signs releases with key {key_fingerprint(served)}, but the home {str(home)!r} trusts "
            f"{key_fingerprint(trusted)} (it was made with another coordinator, or this server is not the one it "
            f"joined); if you trust the new coordinator, run `pocketfed release trust --home {home} --key {served}` "
            f"(the old releases are kept aside), or use a new --home")
    return signing.public_from_hex(trusted)


def installed_manifest(home: Path) -> signing.Manifest | None:
    """The installed release's manifest (<home>/releases/<current>/manifest.json), or None."""
    found = device_home.read_release(home)
    return signing.Manifest.from_json(found[0]) if found is not None else None


def accept_release(home: Path, trusted: Any, release: wire.SignedManifest, download: Callable[[str], bytes],
                   now: float, task: dict[str, Any] | None = None,
                   check: Callable[[bytes, int], str | None] = lambda data, version: None) -> tuple[signing.Manifest, bytes, bool]:
    """Verify a release against the trusted key and the installed one, install it, and return it,
    its adapter (safetensors bytes) and whether it is newly installed.

    Raises ReleaseRejected for a bad signature, an expired manifest, a rollback, or an adapter
    whose sha256 is not the manifest's. The release is installed (`runtime.home.install_release`:
    <home>/releases/<version>/, then <home>/current) only after all checks; `task` (the task's
    model, lora, data and train settings) is kept beside it, to build the runtime model from.
    `check(adapter bytes, version)` names a problem with the adapter's values (None: none)."""
    installed = installed_manifest(home)
    m = signing.verify(trusted, dict(release.manifest), release.signature, now, installed)
    adapter_path = device_home.release_dir(home, m.version) / device_home.ADAPTER
    fresh = installed is None or m.version != installed.version
    data = adapter_path.read_bytes() if not fresh and adapter_path.is_file() else download(m.sha256)
    if signing.sha256_hex(data) != m.sha256:
        raise signing.ReleaseRejected(f"adapter of version {m.version} does not match its manifest's sha256")
    if (problem := check(data, m.version)) is not None:  # a poisoned release (`device.guard`): never installed
        raise signing.ReleaseRejected(problem)
    if fresh:
        device_home.install_release(home, dict(release.manifest), release.signature, data, task or {})
    return m, data, fresh




def finite_problem(data: bytes, version: int) -> str | None:
    """The poisoned-release check without torch (`device.guard.release_problem` reads tensors):
    a release whose adapter holds NaN or Inf is not installed."""
    import numpy as np  # noqa: PLC0415
    from safetensors.numpy import load  # noqa: PLC0415

    arrays = load(data)
    bad = sorted(k for k, a in arrays.items() if a.dtype.kind == "f" and not np.isfinite(a).all())
    if bad:
        return f"release version {version} holds NaN or Inf in {len(bad)} of its {len(arrays)} tensors (first: {bad[0]!r})"
    return None


def trust(home: Path, key_hex: str) -> str:
    """Trust a new coordinator's release key: the old key's releases, model and personal adapter
    move to <home>/retired-<old fingerprint>/ (rollback protection is per key: the new
    coordinator's versions start again), and the key is pinned. -> a sentence saying what was done."""
    from pocketfed.runtime.privacy_lock import key_fingerprint  # noqa: PLC0415

    try:
        signing.public_from_hex(key_hex)
    except signing.ReleaseRejected:
        raise UserError(f"--key {key_hex!r} is not a release public key (64 hex digits)") from None
    key_hex = key_hex.strip().lower()
    pin = home / device_home.RELEASE_PIN
    old = pin.read_text().strip() if pin.is_file() else None
    if old == key_hex:
        return f"{str(home)!r} already trusts key {key_fingerprint(key_hex)}; nothing changed"
    moved = []
    if old is not None:
        retired = home / f"retired-{key_fingerprint(old)}"
        retired.mkdir(exist_ok=True)
        for name in (device_home.RELEASES, device_home.CURRENT, device_home.MODEL_DIR, device_home.PERSONAL_DIR):
            if (home / name).exists():
                (home / name).rename(retired / name)
                moved.append(name)
    write_atomic(pin, key_hex + "\n")
    aside = f"; the old key's {', '.join(moved)} are kept in {str(retired)!r}" if moved else ""
    return f"{str(home)!r} now trusts release key {key_fingerprint(key_hex)}{aside}"
