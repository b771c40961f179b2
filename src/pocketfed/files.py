"""Atomic file writes: a reader sees the old file or the new one, never half of one.

    write to a temp file in the same folder -> fsync -> rename over the target -> fsync the folder

The one copy of this in pocketfed (the store's blobs, checkpoints, keys, certificates, summaries,
a device's installed release all go through it).
"""

from __future__ import annotations

import hashlib

import os
import tempfile
from pathlib import Path
from typing import Callable


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: the directory entry is data of the folder)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str | Callable[[str], None], mode: int = 0o644) -> None:
    """Replace `path` with `data` (bytes, text, or a function that writes the temp file at the path it
    is given), created with permissions `mode` (0o600 for private keys). Parent folders are created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        if callable(data):
            os.close(fd)
            data(tmp)
            fd = os.open(tmp, os.O_RDONLY)
        else:
            with os.fdopen(os.dup(fd), "wb") as f:  # a loop over partial writes, on a duplicate fd
                f.write(data.encode() if isinstance(data, str) else data)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file, read 1 MiB at a time (model files are hundreds of MB)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
