"""Device-side release checks: signature (tampering), version (rollback), expiry (freeze), hash."""

from __future__ import annotations

import time

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save as st_save

from pocketfed.device.agent import KeyChanged, accept_release, trusted_release_key
from pocketfed import signing
from pocketfed.protocol.wire import SignedManifest
from pocketfed.runtime import home as device_home

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


def installed(home) -> tuple[str | None, list[int]]:
    return device_home.current_release(home), device_home.installed_versions(home)


def test_accepts_newer_and_same_release(tmp_path):
    m, adapter, fresh = accept(tmp_path, release(1))
    assert m.version == 1 and fresh and float(adapter["a.lora_A.weight"][0, 0]) == 1.0
    m, _, fresh = accept(tmp_path, release(1), fetch=lambda sha: pytest.fail("the installed adapter is reused"))
    assert not fresh
    assert accept(tmp_path, release(3))[0].version == 3
    assert installed(tmp_path) == ("3", [1, 3])  # every release kept, the newest current
    kept = device_home.read_release(tmp_path, 1)
    assert kept is not None and (kept[2] / "adapter.safetensors").read_bytes() == ADAPTERS[1]


@pytest.mark.parametrize("case, words", [
    ("tampered", "signature"), ("wrong_key", "signature"), ("rollback", "rollback"), ("fork", "rollback"),
    ("expired", "expired"), ("bad_blob", "sha256"),
])
def test_refusals(tmp_path, case, words):
    accept(tmp_path, release(2))
    before = installed(tmp_path)
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
    assert installed(tmp_path) == before == ("2", [2])  # nothing installed


def test_release_key_is_pinned_on_first_use(tmp_path):
    first = trusted_release_key(tmp_path, None, lambda: signing.public_hex(KEY))
    # the server's key is asked again only to compare it with the pin (a changed one: KeyChanged)
    again = trusted_release_key(tmp_path, None, lambda: signing.public_hex(KEY))
    assert signing.public_hex(first) == signing.public_hex(again) == signing.public_hex(KEY)


def test_a_changed_coordinator_key_is_one_sentence_not_a_loop(tmp_path):
    trusted_release_key(tmp_path, None, lambda: signing.public_hex(KEY))
    new = signing.public_hex(Ed25519PrivateKey.generate())
    with pytest.raises(KeyChanged) as e:
        trusted_release_key(tmp_path, None, lambda: new, "https://coord:8443")
    text = str(e.value)
    assert text.startswith("https://coord:8443 now signs releases with key ") and "\n" not in text
    assert f"pocketfed release trust --home {tmp_path} --key {new}" in text
    assert (tmp_path / "release.pub").read_text().strip() == signing.public_hex(KEY)  # the pin is kept


def test_key_files(tmp_path):
    key = signing.load_or_create_key(tmp_path)
    assert (tmp_path / signing.KEY_FILE).stat().st_mode & 0o077 == 0
    assert signing.public_hex(signing.load_or_create_key(tmp_path)) == signing.public_hex(key)
    assert (tmp_path / signing.PUB_FILE).read_text().strip() == signing.public_hex(key)


def test_attack_a_home_from_another_coordinator_stops_with_one_sentence(tmp_path, monkeypatch):
    """The real device loop against a coordinator whose key is not the home's pin: KeyChanged (a
    UserError: the CLI prints it and exits 2) right after registering, never a refusal loop."""
    from fastapi.testclient import TestClient

    from pocketfed.device import agent
    from pocketfed.server import coordinator as co
    from tests.unit.deploy.http_fixtures import app_for, make_coordinator

    c = make_coordinator(tmp_path / "state")
    monkeypatch.setattr(agent.http, "connect", lambda url, ca: TestClient(app_for(c)))
    home, data = tmp_path / "home", tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("a few words\n")
    home.mkdir()
    (home / "release.pub").write_text(signing.public_hex(KEY) + "\n")  # an earlier coordinator's key
    events = []
    with pytest.raises(KeyChanged, match="now signs releases with key .* but the home .* trusts"):
        agent.run_device("http://127.0.0.1:1", None, data, home, threads=0, max_wait_s=0.2,
                         on_event=lambda kind, info: events.append(kind), enrollment_token=co.enroll(c.store)[0])
    assert "release_refused" not in events and "task" not in events
    assert (home / "release.pub").read_text().strip() == signing.public_hex(KEY)  # nothing re-pinned


def test_a_dp_coordinator_signs_the_epsilon_into_its_manifest(tmp_path):
    """The privacy lock reads epsilon from the signed manifest alone: the coordinator must sign it."""
    from pocketfed.config import load_config
    from pocketfed.server import coordinator as co
    from tests.unit.deploy.http_fixtures import init_params

    cfg = load_config(None, {"sim": {"rounds": 3, "seed": 0},
                             "privacy": {"dp": "central", "noise_multiplier": 1.0, "clip_norm": 0.5, "delta": 1e-5},
                             "deploy": {"goal": 2, "quorum": 1, "population": 10}})
    c = co.open_coordinator(tmp_path / "state", cfg, "synthetic", init_params)
    manifest, signature = co.manifest_for(c, c.store.latest_version(), time.time())
    m = signing.verify(c.release_key.public_key(), manifest, signature, time.time(), None)
    assert m.epsilon == c.privacy.epsilons()["epsilon_recipients"] and m.delta == 1e-5  # 0.0 before any round
    no_dp = co.open_coordinator(tmp_path / "plain", load_config(None, {"sim": {"rounds": 1}}), "synthetic", init_params)
    plain, _ = co.manifest_for(no_dp, no_dp.store.latest_version(), time.time())
    assert "epsilon" not in plain and "delta" not in plain  # absent, not null: older devices read it unchanged
