"""The privacy lock: one line telling the user where their model was made and what left the device.

It rests on two records, read as plain files (no import of pocketfed's device code; the kinds
come from the foundation module `pocketfed.egress`, the list the device's ledger enforces):

- the export's manifest.json: `made_on` (a hash of the host id, compared with this device's),
  `personalized`, and the run's differential-privacy figures `privacy: {epsilon, delta}`;
- the device's egress ledger `<home>/ledger.jsonl`, append-only JSON lines, one per message that
  left the device, each with a `kind`. Only `egress.ALLOWED_KINDS` may leave (the registration,
  check-ins, model updates, metrics, and under secure aggregation the masked update and
  key-agreement messages); any other
  kind is reported as a warning, and refusals (recorded, never sent) are counted apart.

With no ledger the line says it cannot check egress, rather than promising anything.
"""

from __future__ import annotations

import hashlib
import json
import socket
import uuid
from collections import Counter
from pathlib import Path

from pocketfed import egress
from pocketfed.egress import LEDGER_FILE
from pocketfed.runtime.model import read_manifest


def host_id() -> str:
    """A short, non-reversible id of this machine: sha256 of /etc/machine-id (or hostname + MAC)."""
    machine = ""
    for p in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            machine = Path(p).read_text().strip()
        except OSError:
            continue
        if machine:
            break
    raw = machine or f"{socket.gethostname()}-{uuid.getnode()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def read_ledger(home: str | Path) -> Counter[str] | None:
    """Messages per kind in `<home>/ledger.jsonl`; None when there is no ledger. Bad lines are skipped."""
    path = Path(home).expanduser() / LEDGER_FILE
    if not path.is_file():
        return None
    kinds: Counter[str] = Counter()
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                kinds["<unreadable>"] += 1
                continue
            kinds[str(entry.get("kind", "<no kind>")) if isinstance(entry, dict) else "<no kind>"] += 1
    return kinds


def privacy_lock(model_dir: str | Path, home: str | Path | None = None) -> str:
    """'privacy lock: made on this device; trained with DP epsilon=..; your personal data was not shared (..)'."""
    _, manifest = read_manifest(model_dir)
    parts = []
    here = manifest.get("made_on") == host_id()
    parts.append("made on this device" if here else "made on another machine")
    dp = manifest.get("privacy")
    if isinstance(dp, dict) and dp.get("epsilon") is not None:
        parts.append(f"trained with DP epsilon={float(dp['epsilon']):.3g}, delta={float(dp.get('delta') or 0):.1e}")
    kinds = read_ledger(home) if home is not None else None
    if kinds is None:
        parts.append("no egress ledger on this device to check what was shared")
    else:
        refused = kinds.pop(egress.REFUSAL, 0)
        kinds.pop("<unreadable>", 0)  # a torn last line after a crash: no message it describes was sent
        total = sum(kinds.values())
        listing = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
        if refused:
            listing += f"; {refused} refused and kept" if listing else f"{refused} refused and kept"
        other = egress.unexpected(kinds)
        if other:
            parts.append(f"WARNING: the ledger shows other messages left this device ({', '.join(other)})")
        elif total == 0:
            parts.append("your personal data was not shared (ledger: nothing left this device)")
        else:
            said = egress.describe(kinds)  # e.g. ["model updates", "metrics"]
            what = " and ".join([", ".join(said[:-1]), said[-1]] if len(said) > 1 else said)
            parts.append(
                f"your personal data was not shared (ledger: {total} message{'s' * (total != 1)} "
                f"left this device, only {what}: {listing})"
            )
    return "privacy lock: " + "; ".join(parts)
