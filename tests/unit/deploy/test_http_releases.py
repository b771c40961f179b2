"""Device-side release checks: signature (tampering), version (rollback), expiry (freeze), hash."""

from __future__ import annotations

import time

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save as st_save

from pocketfed.device.agent import INSTALLED, accept_release, trusted_release_key
from pocketfed.release import signing
from pocketfed.protocol.wire import SignedManifest

KEY = Ed25519PrivateKey.generate()
ADAPTERS = {v: st_save({"a.lora_A.weight": torch.full((2, 2), float(v))}) for v in range(4)}


def release(version: int, key=KEY, ttl: float = 3600.0, sha: str | None = None, tamper: dict | None = None) -> SignedManifest:
    now = time.time()
    m = signing.Manifest(version=version, parent_version=version - 1, sha256=sha or signing.sha256_hex(ADAPTERS[version]),
                         round=version, strategy="fedavg", base_model="tiny", issued_at=now, expires_at=now + ttl)
    signed = SignedManifest(manifest=m.to_json(), signature=signing.sign(key, m))
    signed.manifest.update(tamper or {})  # tampering after signing
    return signed


def download(sha: str) -> bytes:
    return next(a for a in ADAPTERS.values() if signing.sha256_hex(a) == sha)


def accept(home, r: SignedManifest, fetch=download):
    return accept_release(home, KEY.public_key(), r, fetch, time.time())


def test_accepts_newer_and_same_release(tmp_path):
    m, adapter = accept(tmp_path, release(1))
    assert m.version == 1 and float(adapter["a.lora_A.weight"][0, 0]) == 1.0
    m, _ = accept(tmp_path, release(1), fetch=lambda sha: pytest.fail("the installed adapter is reused"))
    assert accept(tmp_path, release(3))[0].version == 3


@pytest.mark.parametrize("case, words", [
    ("tampered", "signature"), ("wrong_key", "signature"), ("rollback", "rollback"), ("fork", "rollback"),
    ("expired", "expired"), ("bad_blob", "sha256"),
])
def test_refusals(tmp_path, case, words):
    accept(tmp_path, release(2))
    installed = (tmp_path / INSTALLED).read_bytes()
    bad = {
        "tampered": lambda: release(3, tamper={"version": 99}),
        "wrong_key": lambda: release(3, key=Ed25519PrivateKey.generate()),
        "rollback": lambda: release(1),
        "fork": lambda: release(2, sha=signing.sha256_hex(ADAPTERS[3])),
        "expired": lambda: release(3, ttl=-1.0),
        "bad_blob": lambda: release(3),
    }[case]()
    fetch = (lambda sha: ADAPTERS[0]) if case == "bad_blob" else download
    with pytest.raises(signing.ReleaseRejected, match=words):
        accept(tmp_path, bad, fetch)
    assert (tmp_path / INSTALLED).read_bytes() == installed  # nothing installed


def test_release_key_is_pinned_on_first_use(tmp_path):
    first = trusted_release_key(tmp_path, None, lambda: signing.public_hex(KEY))
    again = trusted_release_key(tmp_path, None, lambda: pytest.fail("a pinned key is not fetched again"))
    assert signing.public_hex(first) == signing.public_hex(again) == signing.public_hex(KEY)


def test_key_files(tmp_path):
    key = signing.load_or_create_key(tmp_path)
    assert (tmp_path / signing.KEY_FILE).stat().st_mode & 0o077 == 0
    assert signing.public_hex(signing.load_or_create_key(tmp_path)) == signing.public_hex(key)
    assert (tmp_path / signing.PUB_FILE).read_text().strip() == signing.public_hex(key)
