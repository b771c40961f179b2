"""The rows of "What left this device": the device's egress ledger as a person reads it.

`<home>/ledger.jsonl` (written only by `pocketfed.device.ledger.check_and_record`, the one door
out; that module imports torch, so the page reads the file itself, as the privacy lock does) holds
one JSON line per message, `{time, destination, kind, bytes, sha256, ...}`, and one per refused
request, `{time, destination, kind: "refusal", requested_kind, reason}`. A line that is not such an
object (a torn last line after a crash) is counted as unreadable, never shown as a message.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pocketfed import egress

MAX_ROWS = 500  # the newest rows the page lists; the totals always count them all


@dataclass
class LedgerRows:
    """Messages and refusals, newest first, at most MAX_ROWS each; the totals count every line."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # {time, kind, what, allowed, bytes, destination}
    refusals: list[dict[str, Any]] = field(default_factory=list)  # {time, requested_kind, reason, destination}
    total_messages: int = 0
    total_bytes: int = 0
    total_refusals: int = 0
    unreadable: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "messages": self.messages, "refusals": self.refusals,
            "total_messages": self.total_messages, "total_bytes": self.total_bytes,
            "total_refusals": self.total_refusals, "unreadable": self.unreadable,
        }


def _time(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def read(home: Path) -> LedgerRows:
    """The ledger of `home` (absent: nothing left this device)."""
    rows = LedgerRows()
    path = Path(home) / egress.LEDGER_FILE
    if not path.is_file():
        return rows
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                rows.unreadable += 1
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str):
                rows.unreadable += 1
                continue
            kind = entry["kind"]
            destination = str(entry.get("destination", ""))
            if kind == egress.REFUSAL:
                rows.total_refusals += 1
                rows.refusals.append({"time": _time(entry.get("time")), "destination": destination,
                                      "requested_kind": str(entry.get("requested_kind", "")),
                                      "reason": str(entry.get("reason", ""))})
                continue
            nbytes = entry.get("bytes", 0)
            nbytes = int(nbytes) if isinstance(nbytes, int) and nbytes >= 0 else 0
            rows.total_messages += 1
            rows.total_bytes += nbytes
            # a kind the ledger would never let out is shown as such, not hidden
            allowed = kind in egress.ALLOWED_KINDS
            what = egress.DESCRIPTIONS.get(kind, kind) if allowed else f"{kind} (may not leave a device)"
            rows.messages.append({"time": _time(entry.get("time")), "kind": kind, "what": what, "allowed": allowed,
                                  "bytes": nbytes, "destination": destination})
    # newest first; the file is in write order, so reversing is enough
    rows.messages = rows.messages[::-1][:MAX_ROWS]
    rows.refusals = rows.refusals[::-1][:MAX_ROWS]
    return rows
