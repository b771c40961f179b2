"""`pocketfed release status|verify|trust` on a device home: light (no torch), clear exits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pocketfed import signing
from pocketfed.runtime import home as home_mod

RUN = """
import sys
sys.argv = ["pocketfed", *sys.argv[1:]]
import atexit
atexit.register(lambda: print("TORCH" if "torch" in sys.modules else "LIGHT"))
from pocketfed.cli import main
main()
"""


def pocketfed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, timeout=300,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_status_and_verify_are_light_and_verify_fails_on_a_flipped_byte(device_home: Path) -> None:
    out = pocketfed("release", "status", "--home", str(device_home))
    assert out.returncode == 0 and out.stdout.strip().endswith("LIGHT"), out.stdout + out.stderr
    assert "made on this device" in out.stdout
    ok = pocketfed("release", "verify", "--home", str(device_home))
    assert ok.returncode == 0 and "privacy lock: made on this device" in ok.stdout and ok.stdout.strip().endswith("LIGHT")
    data = device_home / "model" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x80
    data.write_bytes(bytes(raw))
    bad = pocketfed("release", "verify", "--home", str(device_home))
    assert bad.returncode == 1, bad.stdout
    assert "FAIL weights" in bad.stdout and "model/model.onnx.data" in bad.stdout


def test_trust_a_new_key_keeps_the_old_releases_aside(device_home: Path) -> None:
    new = signing.public_hex(Ed25519PrivateKey.generate())
    old_versions = home_mod.installed_versions(device_home)
    out = pocketfed("release", "trust", "--home", str(device_home), "--key", new)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (device_home / "release.pub").read_text().strip() == new
    assert home_mod.current_release(device_home) is None and not (device_home / "model").exists()
    retired = next(device_home.glob("retired-*"))
    assert home_mod.installed_versions(retired) == old_versions and (retired / "personal_adapter").is_dir()
    bad = pocketfed("release", "trust", "--home", str(device_home), "--key", "zz")
    assert bad.returncode != 0 and "is not a release public key" in bad.stdout + bad.stderr
