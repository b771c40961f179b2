"""The privacy lock of a device home (`privacy_lock.verify`): each tamper fails its own check.

Each test starts from a verified home (`device_home.make_device_home`: signed releases 1 and 2,
a personal adapter, the int4 model this device built, a ledger) and changes one thing."""

from __future__ import annotations

import json
from pathlib import Path

from pocketfed import signing
from pocketfed.runtime import home as home_mod
from pocketfed.runtime.privacy_lock import verify


def failing(home: Path) -> set[str]:
    return {c.name for c in verify(home).checks if not c.ok}


def test_a_verified_home_says_what_left(device_home: Path) -> None:
    report = verify(device_home)
    assert report.ok, report.checks
    # 2 updates of one 2x64 float32 tensor: 512 bytes + a 88-byte safetensors header = 600 bytes each
    assert report.sent["update"] == {"count": 2, "bytes": 1200}
    assert report.sent["checkin"]["count"] == 3 and report.sent["registration"]["count"] == 1
    assert report.sent["masked_update"] == {"count": 0, "bytes": 0}  # every allowed kind is counted
    assert report.refusals == 1
    assert report.line == ("made on this device; sent so far: 2 model updates (1.2 kB), 2 metric reports, "
                           "1 registration, 3 check-ins, no text; differential privacy epsilon 3.1")
    assert report.release["version"] == 2 and report.release["epsilon"] == 3.1
    assert len(report.release["signed_by"]) == 16
    assert report.personal is not None and report.personal["gain"] == 0.042


def test_attack_a_flipped_weight_byte_fails_the_weights_check(device_home: Path) -> None:
    data = device_home / "model" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # same size: a size check would pass it
    data.write_bytes(bytes(raw))
    report = verify(device_home)
    assert not report.ok and failing(device_home) == {"weights"}
    assert report.line == "the weights loaded do not match the signed release (model/model.onnx.data)"


def test_attack_editing_the_release_epsilon_fails_signature_and_epsilon(device_home: Path) -> None:
    path = device_home / "releases" / "2" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["epsilon"] = 0.5
    path.write_text(json.dumps(manifest))
    report = verify(device_home)
    assert failing(device_home) == {"signature", "epsilon"}
    assert "not signed by the trusted key" in report.line and "0.5" not in report.line
    assert report.release["epsilon"] is None  # never read from an unsigned file


def test_attack_a_model_manifest_claiming_another_epsilon_fails_the_epsilon_check(device_home: Path) -> None:
    model = device_home / "model"
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["privacy"]["epsilon"] = 0.5
    (model / "manifest.json").write_text(json.dumps(manifest))
    record = json.loads((model / "pocketfed.json").read_text())  # as if rebuilt consistently
    record["files"]["manifest.json"] = home_mod.sha256_file(model / "manifest.json")
    (model / "pocketfed.json").write_text(json.dumps(record))
    assert failing(device_home) == {"epsilon"}
    assert verify(device_home).line == "the model's manifest.json says epsilon 0.5 but the signed release says 3.1"


def test_attack_another_release_key_fails_the_signature_check(device_home: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    (device_home / "release.pub").write_text(signing.public_hex(Ed25519PrivateKey.generate()) + "\n")
    assert "signature" in failing(device_home)


def test_attack_a_rolled_back_current_fails_the_signature_check(device_home: Path) -> None:
    (device_home / "current").write_text("1\n")
    report = verify(device_home)
    assert "signature" in failing(device_home)
    assert report.check("signature").detail == "the home runs release 1 but release 2 is installed (rolled back)"


def test_attack_a_swapped_release_adapter_fails_the_signature_check(device_home: Path) -> None:
    adapter = device_home / "releases" / "2" / "adapter.safetensors"
    raw = bytearray(adapter.read_bytes())
    raw[-1] ^= 0x01
    adapter.write_bytes(bytes(raw))
    assert failing(device_home) == {"signature"}


def test_attack_a_model_built_from_another_release_fails_the_weights_check(device_home: Path) -> None:
    record_path = device_home / "model" / "pocketfed.json"
    record = json.loads(record_path.read_text())
    record["manifest_sha256"] = "0" * 64
    record_path.write_text(json.dumps(record))
    assert failing(device_home) == {"weights"}


def test_attack_a_replaced_personal_adapter_fails_the_weights_check(device_home: Path) -> None:
    weights = device_home / "personal_adapter" / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01
    weights.write_bytes(bytes(raw))
    assert failing(device_home) == {"weights"}


def test_attack_a_ledger_with_text_fails_the_ledger_check(device_home: Path) -> None:
    with (device_home / "ledger.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "raw_text_upload", "bytes": 9}) + "\n")
    report = verify(device_home)
    assert failing(device_home) == {"ledger"}
    assert report.line == "the ledger shows messages that may not leave a device left this one (raw_text_upload)"
    assert report.sent["raw_text_upload"] == {"count": 1, "bytes": 9}


def test_a_home_without_a_ledger_fails_the_ledger_check(device_home: Path) -> None:
    (device_home / "ledger.jsonl").unlink()
    assert failing(device_home) == {"ledger"}


def test_a_home_without_a_model(device_home: Path) -> None:
    import shutil

    shutil.rmtree(device_home / "model")
    assert failing(device_home) == {"weights"}
    assert home_mod.current_release(device_home) == "2"
