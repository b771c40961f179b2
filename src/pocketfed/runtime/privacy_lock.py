"""The privacy lock: one line telling the user where their model was made and what left the device.

Two entry points:
- `verify(home)`: for a device home (`pocketfed.runtime.home`): four checks (signature, weights,
  ledger, epsilon; see the section below) and a `LockReport`; what `pocketfed suggest --home`,
  `release verify` and the page show. Nothing is taken from an unsigned file without a check.
- `privacy_lock(model_dir, home)`: for an export folder outside a device home (`--model`): the
  line from the export's manifest and a ledger, as the files say, unchecked.

`privacy_lock` rests on two records, read as plain files (no import of pocketfed's device code; the kinds
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

import datetime as dt
import hashlib
import json
import math
import socket
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from pocketfed import egress, signing
from pocketfed.egress import LEDGER_FILE
from pocketfed.runtime import home as home_mod
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


# ---- the lock of a device home: four checks ---------------------------------------------------------
# `verify(home)` backs the lock with checks instead of trusting files (the section above reads an
# export folder's manifest as it is, for models that are not in a device home):
#   signature  <home>/current names the newest installed release; its manifest verifies (Ed25519)
#              against the key this home trusts (<home>/release.pub), and its adapter's sha256 is the
#              signed one
#   weights    every file of the runtime model (the files the runtime loads) hashes to what
#              <home>/model/pocketfed.json recorded when this device built it, and that record names
#              the signed manifest (its sha256) and the personal adapter now in the home
#   ledger     <home>/ledger.jsonl exists and holds only kinds that may leave (`pocketfed.egress`),
#              every kind counted with its bytes; refusals (never sent) counted apart
#   epsilon    read from the signed manifest only; any other place that states one agrees with it
# What it does not do: a person with write access to the whole home can rebuild the model and its
# record together; the lock detects corruption and edits of a single file, not an owner of the device.

CHECKS = ("signature", "weights", "ledger", "epsilon")


@dataclass(frozen=True)
class Check:
    name: str  # one of CHECKS
    ok: bool
    detail: str  # a sentence: what was checked, or what failed


@dataclass(frozen=True)
class LockReport:
    ok: bool  # every check passed
    checks: tuple[Check, ...]
    line: str  # the lock sentence when ok, else the first failing check's sentence
    sent: dict[str, dict[str, int]]  # egress kind -> {"count", "bytes"}, every allowed kind (and any other seen)
    refusals: int
    release: dict[str, Any]  # {"version", "signed_by", "created", "epsilon", "delta", "round", "base_model"}
    personal: dict[str, Any] | None  # the personal adapter in the model: {"date", "gain", ...}, or None

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)


def key_fingerprint(public_hex: str) -> str:
    """A short name for a release key: the first 16 hex digits of sha256(raw key)."""
    return hashlib.sha256(bytes.fromhex(public_hex)).hexdigest()[:16]


def _signature_check(home: Path) -> tuple[Check, dict[str, Any] | None, dict[str, Any]]:
    """(the check, the manifest when its signature verifies (even if another part of the check
    failed), what the page shows of the release)."""

    version = home_mod.current_release(home)
    if version is None:
        return Check("signature", False, "no release is installed in this home"), None, {}
    found = home_mod.read_release(home, version)
    if found is None:
        return Check("signature", False, f"the installed release {version} is missing or unreadable"), None, {}
    manifest, signature, folder = found
    info: dict[str, Any] = {"version": manifest.get("version"), "round": manifest.get("round"),
                            "base_model": manifest.get("base_model"), "epsilon": None, "delta": None}
    pin = home / home_mod.RELEASE_PIN
    try:
        key_hex = pin.read_text().strip()
        public = signing.public_from_hex(key_hex)
    except (OSError, signing.ReleaseRejected):
        return Check("signature", False, f"this home trusts no release key ({pin.name} is missing or bad)"), None, info
    info["signed_by"] = key_fingerprint(key_hex)
    try:
        public.verify(bytes.fromhex(signature), signing.canonical_json(manifest))
        m = signing.Manifest.from_json(manifest)
    except (ValueError, InvalidSignature, signing.ReleaseRejected):
        return Check("signature", False, f"the installed release {version} is not signed by the trusted key "
                                         f"{info['signed_by']} (its manifest.json was changed)"), None, info
    info.update(version=m.version, round=m.round, base_model=m.base_model, epsilon=m.epsilon, delta=m.delta,
                created=dt.datetime.fromtimestamp(m.issued_at, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    newest = max(home_mod.installed_versions(home), default=m.version)
    if m.version < newest:
        return Check("signature", False, f"the home runs release {m.version} but release {newest} is installed "
                                         "(rolled back)"), manifest, info
    adapter = folder / home_mod.ADAPTER
    if not adapter.is_file() or home_mod.sha256_file(adapter) != m.sha256:
        return Check("signature", False, f"the adapter of release {m.version} is not the signed one"), manifest, info
    return Check("signature", True, f"release {m.version} signed by {info['signed_by']}"), manifest, info


def _weights_check(home: Path, model: Path, manifest: dict[str, Any] | None) -> tuple[Check, dict[str, Any] | None]:

    record = home_mod.read_json(model / home_mod.MODEL_RECORD)
    if record is None:
        return Check("weights", False, f"there is no on-device model record ({model.name}/{home_mod.MODEL_RECORD})"), None
    personal = record.get("personal") if isinstance(record.get("personal"), dict) else None
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return Check("weights", False, f"the model record {model.name}/{home_mod.MODEL_RECORD} lists no files"), personal
    on_disk = {str(p.relative_to(model)) for p in model.rglob("*") if p.is_file() and p.name != home_mod.MODEL_RECORD}
    for name in sorted(on_disk | set(files)):
        path = model / name
        if name not in files or not path.is_file() or home_mod.sha256_file(path) != files[name]:
            return Check("weights", False, f"the weights loaded do not match the signed release ({model.name}/{name})"), personal
    if manifest is not None and record.get("manifest_sha256") != signing.sha256_hex(signing.canonical_json(manifest)):
        return Check("weights", False, f"the model was built from another release than the installed "
                                       f"{manifest.get('version')} ({model.name}/{home_mod.MODEL_RECORD})"), personal
    if personal is not None:
        path = home / home_mod.PERSONAL_DIR / "adapter_model.safetensors"
        if not path.is_file() or home_mod.sha256_file(path) != personal.get("sha256"):
            return Check("weights", False, "the model was built with another personal adapter than the one in "
                                           f"this home ({home_mod.PERSONAL_DIR}/)"), personal
    return Check("weights", True, f"{len(files)} model files match what this device built"), personal


def _sizes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _ledger_check(home: Path) -> tuple[Check, dict[str, dict[str, int]], int, str]:
    path = home / LEDGER_FILE
    sent = {k: {"count": 0, "bytes": 0} for k in egress.ALLOWED_KINDS}
    if not path.is_file():
        return Check("ledger", False, f"this home has no egress ledger ({LEDGER_FILE}) to say what left it"), sent, 0, ""
    refusals = unreadable = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in filter(str.strip, f):
            try:
                entry = json.loads(line)
                kind, nbytes = str(entry["kind"]), int(entry.get("bytes", 0))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                unreadable += 1  # a torn last line after a crash: the message it describes was not sent
                continue
            if kind == egress.REFUSAL:
                refusals += 1
                continue
            row = sent.setdefault(kind, {"count": 0, "bytes": 0})
            row["count"] += 1
            row["bytes"] += nbytes
    other = egress.unexpected(k for k, v in sent.items() if v["count"])
    if other:
        return Check("ledger", False, f"the ledger shows messages that may not leave a device left this one "
                                      f"({', '.join(other)})"), sent, refusals, ""

    def n(*kinds: str) -> tuple[int, int]:
        return sum(sent[k]["count"] for k in kinds), sum(sent[k]["bytes"] for k in kinds)

    parts = []
    for count, nbytes, one, many, show_bytes in [
        (*n(egress.UPDATE), "model update", "model updates", True),
        (*n(egress.MASKED_UPDATE), "masked model update", "masked model updates", True),
        (*n(egress.SECAGG_KEYS, egress.SECAGG_SHARES, egress.SECAGG_SIGNATURE, egress.UNMASK_SHARES),
         "key-agreement message", "key-agreement messages", False),
        (*n(egress.METRICS), "metric report", "metric reports", False),
        (*n(egress.REGISTRATION), "registration", "registrations", False),
        (*n(egress.CHECKIN), "check-in", "check-ins", False),
    ]:
        if count:
            parts.append(f"{count} {one if count == 1 else many}" + (f" ({_sizes(nbytes)})" if show_bytes else ""))
    phrase = "sent so far: " + ", ".join([*parts, "no text"]) if parts else "sent so far: nothing"
    detail = f"{sum(v['count'] for v in sent.values())} messages, all of kinds that may leave; {refusals} refused"
    if unreadable:
        detail += f"; {unreadable} unreadable line{'s' * (unreadable != 1)} skipped"
    return Check("ledger", True, detail), sent, refusals, phrase


def _epsilon_check(signed: bool, release: dict[str, Any], model: Path) -> Check:
    if not signed:
        return Check("epsilon", False, "epsilon cannot be read: the installed release's signature does not verify")
    eps = release.get("epsilon")
    if eps is not None and not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        return Check("epsilon", False, f"the signed release states an invalid epsilon {eps!r}")
    stated = home_mod.read_json(model / "manifest.json")
    privacy = stated.get("privacy") if stated else None
    other = privacy.get("epsilon") if isinstance(privacy, dict) else None
    if other is not None and (eps is None or abs(float(other) - float(eps)) > 1e-9 * max(1.0, abs(float(eps)))):
        return Check("epsilon", False, f"the model's manifest.json says epsilon {other} but the signed release says "
                                       f"{'none' if eps is None else eps}")
    if eps is None:
        return Check("epsilon", True, "the signed release has no differential privacy")
    return Check("epsilon", True, f"epsilon {eps:.3g} (delta {release.get('delta') or 0:.0e}), from the signed release")


def verify(home: str | Path, model_dir: str | Path | None = None) -> LockReport:
    """Run the four checks on `home` and the runtime model in `model_dir` (default <home>/model:
    pass the folder the runtime actually loaded). Reads files only; never raises for a bad home
    (a missing piece is a failed check), except a UserError when `home` is not a folder."""
    home = Path(home).expanduser()
    if not home.is_dir():
        from pocketfed.errors import UserError  # noqa: PLC0415

        raise UserError(f"device home {str(home)!r} does not exist; give the --home of `pocketfed device`")
    model = Path(model_dir).expanduser() if model_dir is not None else home / home_mod.MODEL_DIR
    signature, manifest, release = _signature_check(home)
    weights, personal = _weights_check(home, model, manifest)
    ledger, sent, refusals, phrase = _ledger_check(home)
    epsilon = _epsilon_check(manifest is not None, release, model)
    checks = (signature, weights, ledger, epsilon)
    ok = all(c.ok for c in checks)
    if ok:
        record = home_mod.read_json(model / home_mod.MODEL_RECORD) or {}
        where = "made on this device" if record.get("made_on") == host_id() else "made on another machine"
        line = f"{where}; {phrase}"
        if release.get("epsilon") is not None:
            line += f"; differential privacy epsilon {release['epsilon']:.3g}"
    else:
        line = next(c.detail for c in checks if not c.ok)
    return LockReport(ok, checks, line, sent, refusals, release, personal)
