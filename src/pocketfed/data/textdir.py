"""A folder of `.txt`, `.md` and `.jsonl` files is one device's data (what a real device holds).

A folder whose sub-folders hold such files is a population: one device per sub-folder.
In `.jsonl` files each line is an object with a "text" field.
"""

from __future__ import annotations

import json
from pathlib import Path

from pocketfed.errors import UserError

SUFFIXES = (".txt", ".md", ".jsonl")


def _read_jsonl(path: Path) -> list[str]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}: line {n} is not valid JSON; each line must be an object with a \"text\" field") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UserError(f"{path}: line {n} has no string \"text\" field")
        out.append(obj["text"])
    return out


def read_file(path: Path) -> list[str]:
    """The pieces of text in one file (paragraphs for .txt/.md, records for .jsonl)."""
    try:
        if path.suffix == ".jsonl":
            pieces = _read_jsonl(path)
        else:
            pieces = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read: {e.strerror}") from None
    pieces = [p for p in pieces if p.strip()]
    if not pieces:
        raise UserError(f"{path} is empty; remove it or give it some text")
    return pieces


def read_device(folder: Path) -> list[str]:
    """All pieces of text of one device folder, files in name order."""
    if not folder.is_dir():
        raise UserError(f"data folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise UserError(f"data folder {str(folder)!r} holds no {', '.join(SUFFIXES)} files")
    pieces: list[str] = []
    for f in files:
        pieces.extend(read_file(f))
    return pieces


def list_devices(root: Path) -> dict[str, Path]:
    """{device id: folder}: the sub-folders of `root`, or `root` itself when it holds files."""
    if not root.is_dir():
        raise UserError(f"data folder {str(root)!r} does not exist")
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subs:
        return {p.name: p for p in subs}
    return {root.name: root}
