"""A device's home folder: where its releases, personal adapter and runtime model live.

    <home>/release.pub               the coordinator's release key this home trusts (hex; pinned on
                                     first contact, or given with --release-key)
    <home>/releases/<version>/       each installed signed release, written to a temp folder and
        manifest.json                renamed into place (a reader sees all of it or none of it):
        signature                    the manifest exactly as signed, its hex Ed25519 signature,
        adapter.safetensors          the global adapter it names (sha256 in the manifest), and
        task.json                    the task's model id and LoRA config (how to apply the adapter)
    <home>/current                   the installed version (one line, replaced atomically)
    <home>/personal_adapter/         the personal adapter (PEFT folder + pocketfed.json: date, gain);
                                     it never leaves: the ledger refuses kind "personal_adapter"
    <home>/model/                    the runtime model built on this device from the current release
        pocketfed.json               (+ the personal adapter), onnx-int4 by default, and what it was
                                     built from: release version, manifest sha256, the sha256 of
                                     every file, personal adapter date and gain, format
    <home>/ledger.jsonl              the egress ledger (`pocketfed.egress.LEDGER_FILE`)
    <home>/device.json               the server URL, CA file, data folder and profile `pocketfed device`
                                     last ran with (for `release pull` and `personalize`)

A foundation-level module: standard library only (no torch), so light commands (`pocketfed
release status`, the page) start fast.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pocketfed.errors import UserError
from pocketfed.files import fsync_dir, sha256_file, write_atomic  # noqa: F401  (sha256_file: part of this module's API)

RELEASE_PIN = "release.pub"
DEVICE_INFO = "device.json"  # the server, CA and data folder `pocketfed device` last ran with
RELEASES = "releases"
CURRENT = "current"
PERSONAL_DIR = "personal_adapter"
MODEL_DIR = "model"
MODEL_RECORD = "pocketfed.json"  # in model/: what the runtime model was built from
PERSONAL_RECORD = "pocketfed.json"  # in personal_adapter/: date, gain
MANIFEST, SIGNATURE, ADAPTER, TASK = "manifest.json", "signature", "adapter.safetensors", "task.json"


def _home(home: str | Path) -> Path:
    path = Path(home).expanduser()
    if not path.is_dir():
        raise UserError(f"device home {str(path)!r} does not exist; give the --home of `pocketfed device`")
    return path


def model_dir(home: str | Path) -> Path:
    """<home>/model; a UserError naming the home when it has no runtime model yet."""
    path = _home(home) / MODEL_DIR
    if not (path / MODEL_RECORD).is_file():
        raise UserError(f"device home {str(home)!r} has no on-device model yet ({str(path)!r}); it is built after a "
                        f"release is installed: run `pocketfed release pull --home {home}`")
    return path


def current_release(home: str | Path) -> str | None:
    """The installed release version (as written in <home>/current), or None."""
    path = Path(home).expanduser() / CURRENT
    if not path.is_file():
        return None
    text = path.read_text().strip()
    return text or None


def release_dir(home: str | Path, version: int | str) -> Path:
    return Path(home).expanduser() / RELEASES / str(int(version))


def read_release(home: str | Path, version: int | str | None = None) -> tuple[dict[str, Any], str, Path] | None:
    """(manifest as signed, signature hex, folder) of `version` (default: the current one), or None."""
    version = current_release(home) if version is None else version
    if version is None:
        return None
    folder = release_dir(home, version)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        signature = (folder / SIGNATURE).read_text().strip()
    except (OSError, ValueError):
        return None
    return manifest, signature, folder


def installed_versions(home: str | Path) -> list[int]:
    root = Path(home).expanduser() / RELEASES
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def install_release(home: str | Path, manifest: dict[str, Any], signature: str, adapter: bytes,
                    task: dict[str, Any]) -> Path:
    """Write releases/<version>/ (temp folder, then one rename), then point `current` at it.

    The caller has verified the signature, the expiry, the rollback rule and the adapter's sha256."""
    home = Path(home).expanduser()
    folder = release_dir(home, manifest["version"])
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            (tmp / MANIFEST).write_text(json.dumps(manifest, sort_keys=True))
            (tmp / SIGNATURE).write_text(signature + "\n")
            (tmp / ADAPTER).write_bytes(adapter)
            (tmp / TASK).write_text(json.dumps(task, sort_keys=True))
            for p in tmp.iterdir():
                fd = os.open(p, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            os.rename(tmp, folder)
            fsync_dir(folder.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    write_atomic(home / CURRENT, f"{int(manifest['version'])}\n")
    return folder


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when it is absent or not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def personal_record(home: str | Path) -> dict[str, Any] | None:
    """<home>/personal_adapter/pocketfed.json ({"date", "gain", "release", ...}), or None."""
    return read_json(Path(home).expanduser() / PERSONAL_DIR / PERSONAL_RECORD)
