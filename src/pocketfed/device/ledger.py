"""The device's egress ledger: nothing leaves the device unless it is checked and written down first.

`check_and_record` is the only door out. It accepts the kinds of message listed in
`pocketfed.egress` (the one list, shared with the runtime's privacy lock):
- "update":  a model update whose tensor names, shapes and dtypes equal the task's adapter schema
             ({name: (shape, dtype)}), encoded as safetensors;
- "metrics": scalar metrics whose names are in `ALLOWED_METRICS` and whose values are real,
             finite numbers (a string would be a metric that carries text), encoded as JSON;
- the secure-aggregation messages (`pocketfed.protocol.secagg_wire`), each a set of named
  fixed-size arrays checked against the schema of its protocol step exactly like an update:
  "secagg_keys" (two X25519 public keys), "secagg_shares" (one sealed Shamir-share pair per
  neighbour), "masked_update" (the update, clipped, fixed-point and masked mod 2^k), and
  "unmask_shares" (the shares the server may see), encoded as safetensors;
- "registration": the `wire.RegisterRequest` (name, public key, enrollment token), encoded as JSON;
  the ledger line keeps the token's sha256, never the token (the ledger is a log a person reads and
  may share; the token is a credential until the server spends it);
- "checkin": the `wire.CheckinRequest` (the eligibility fields), encoded as JSON.
- "eval_report": a federated-evaluation report, exactly the `wire.EvalReport` fields (four sums,
  `pocketfed.protocol.fedeval.check`), encoded as JSON; under secure aggregation it leaves as
  "masked_eval_report" (4 masked words, checked like the other secure-aggregation arrays).
Anything else is refused, "personal_adapter" above all: a private personal adapter never leaves.
It returns the exact bytes to send, after appending to `<home>/ledger.jsonl` one JSON line with
time, destination, kind, byte count, sha256 and the tensor names/shapes (or metric values). A
refusal raises `EgressRefused` and is appended too, as kind "refusal" with the reason.

The file is append-only: opened with O_APPEND, one write per line, fsync before returning, so an
entry is on disk before its message can be sent. `summarize` reads it back. `record_refusal`
writes a refusal the device decided on itself (a task below its privacy floors): nothing is sent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from safetensors.numpy import save as numpy_save

from pocketfed import egress
from pocketfed.egress import (  # noqa: F401 (re-exported: callers write ledger.UPDATE, ledger.SECAGG_KEYS...)
    ALLOWED_KINDS,
    CHECKIN,
    EVAL_REPORT,
    LEDGER_FILE,
    MASKED_EVAL_REPORT,
    MASKED_UPDATE,
    METRICS,
    REFUSAL,
    REGISTRATION,
    SECAGG_KEYS,
    SECAGG_KINDS,
    SECAGG_SHARES,
    SECAGG_SIGNATURE,
    UNMASK_SHARES,
    UPDATE,
)
from pocketfed.protocol import wire

ALLOWED_METRICS = frozenset({
    "num_tokens", "num_examples", "loss", "train_loss", "eval_loss", "perplexity", "steps",
    "wall_seconds", "energy_j", "peak_memory_mb", "unclipped",
    "lora_rank",  # the rank a device trained below the global one (HetLoRA), sent only without DP or secagg
})

Schema = Mapping[str, tuple[tuple[int, ...], str]]
"""The task's adapter schema: tensor name -> (shape, dtype name such as "float32")."""


class EgressRefused(Exception):
    """The device refused to send a message; the refusal is in the ledger."""


def _append(home: Path, entry: Mapping[str, Any]) -> None:
    home.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(home / LEDGER_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _dtype_name(t: Any) -> str:  # a torch.Tensor or a numpy array
    return str(t.dtype).removeprefix("torch.")


def _check_update(payload: Mapping[str, Any], schema: Schema, array: type | None = None) -> list[list[Any]]:
    if array is None:  # torch is imported only when an update is recorded: `pocketfed ledger` starts without it
        import torch  # noqa: PLC0415

        array = torch.Tensor
    for name, tensor in payload.items():
        if name not in schema:
            raise EgressRefused(f"tensor {name!r} is not in the task's adapter schema")
        if not isinstance(tensor, array):
            raise EgressRefused(f"tensor {name!r} is a {type(tensor).__name__}, not a {array.__name__}")
        shape, dtype = schema[name]
        if tuple(tensor.shape) != tuple(shape) or _dtype_name(tensor) != dtype:
            raise EgressRefused(f"tensor {name!r} is {tuple(tensor.shape)} {_dtype_name(tensor)}; "
                                f"the schema says {tuple(shape)} {dtype}")
    missing = sorted(set(schema) - set(payload))
    if missing:
        raise EgressRefused(f"update lacks schema tensors {missing}")
    return [[n, list(payload[n].shape), _dtype_name(payload[n])] for n in sorted(payload)]


def _check_metrics(payload: Mapping[str, Any]) -> dict[str, float]:
    if not payload:
        raise EgressRefused("an empty metrics message")
    out = {}
    for name, value in payload.items():
        if name not in ALLOWED_METRICS:
            raise EgressRefused(f"metric {name!r} is not in the allow-list {sorted(ALLOWED_METRICS)}")
        if isinstance(value, (str, bytes)):
            raise EgressRefused(f"metric {name!r} carries text, not a number")
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise EgressRefused(f"metric {name!r} is not a finite real number")
        out[name] = float(value)
    return out


def _check_request(kind: str, payload: Mapping[str, Any]) -> tuple[dict[str, Any], bytes]:
    """A registration or check-in: the wire model's exact fields (extra ones refused), its JSON bytes,
    and what the ledger line says of it (the enrollment token only as its sha256)."""
    model = wire.RegisterRequest if kind == REGISTRATION else wire.CheckinRequest
    try:
        req = model.model_validate(dict(payload))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "(message)"
        # the message, not the value: a field that should not be here may hold anything
        raise EgressRefused(f"{kind} field {where!r}: {first.get('msg', 'invalid')}") from None
    data = json.dumps(req.model_dump()).encode()
    if isinstance(req, wire.RegisterRequest):
        token = req.enrollment_token
        return {"name": req.name, "public_key": req.public_key,
                "enrollment_token_sha256": hashlib.sha256(token.encode()).hexdigest() if token else None}, data
    return {"eligibility": req.eligibility.model_dump()}, data


def _check_eval_report(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A federated-evaluation report: exactly the `wire.EvalReport` fields (the four sums, whole
    counts, hits <= tokens), nothing else."""
    from pocketfed.protocol import fedeval

    try:
        req = wire.EvalReport.model_validate(dict(payload))
        fedeval.check(fedeval.Sums(req.loss_sum, req.tokens, req.top1_hits, req.top3_hits), fedeval.MAX_TOKENS)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "(message)"
        raise EgressRefused(f"eval_report field {where!r}: {first.get('msg', 'invalid')}") from None
    except fedeval.InvalidReport as e:
        raise EgressRefused(f"eval_report: {e}") from None
    return req.model_dump()


def check_and_record(home: str | Path, destination: str, kind: str, payload: Mapping[str, Any],
                     schema: Schema) -> bytes:
    """Check an outbound message, record it, and return the exact bytes to send.

    Raises EgressRefused (after recording the refusal) for any kind outside `ALLOWED_KINDS`,
    a tensor or array outside the schema (name, shape or dtype), or a metric outside the
    allow-list or not a finite number, or a registration or check-in that is not exactly its wire
    message (`wire.RegisterRequest`, `wire.CheckinRequest`: `payload` is its `model_dump()`, `schema`
    is unused). For the secure-aggregation kinds `schema` is the step's
    (`pocketfed.protocol.secagg_wire.*_schema`) and the arrays are numpy arrays.
    """
    home = Path(home)
    try:
        if kind == egress.PERSONAL_ADAPTER:
            raise EgressRefused("a personal adapter never leaves this device")
        if kind == UPDATE:
            described: dict[str, Any] = {"tensors": _check_update(payload, schema)}
            from safetensors.torch import save as safetensors_save  # noqa: PLC0415 (torch)

            data = safetensors_save({n: payload[n].detach().contiguous().cpu() for n in sorted(payload)})
        elif kind in SECAGG_KINDS:
            described = {"arrays": _check_update(payload, schema, np.ndarray)}
            data = numpy_save({n: np.ascontiguousarray(payload[n]) for n in sorted(payload)})
        elif kind == METRICS:
            metrics = _check_metrics(payload)
            described = {"metrics": metrics}
            data = json.dumps(metrics, sort_keys=True, separators=(",", ":")).encode()
        elif kind in (REGISTRATION, CHECKIN):
            described, data = _check_request(kind, payload)
        elif kind == EVAL_REPORT:
            report = _check_eval_report(payload)
            described = {"eval_report": report}
            data = json.dumps(report, sort_keys=True, separators=(",", ":")).encode()
        else:
            raise EgressRefused(f"kind {kind!r} may not leave this device; allowed: {list(ALLOWED_KINDS)}")
    except EgressRefused as refusal:
        _append(home, {"time": time.time(), "destination": destination, "kind": REFUSAL,
                       "requested_kind": kind, "reason": str(refusal)})
        raise
    _append(home, {"time": time.time(), "destination": destination, "kind": kind,
                   "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **described})
    return data


def record_refusal(home: str | Path, destination: str, requested_kind: str, reason: str) -> None:
    """Write down a refusal the device decided on itself (e.g. a task below its privacy floors):
    a "refusal" line, like the ledger's own, and nothing is sent."""
    _append(Path(home), {"time": time.time(), "destination": destination, "kind": REFUSAL,
                         "requested_kind": requested_kind, "reason": reason})


@dataclasses.dataclass(frozen=True)
class Summary:
    """Counts and bytes per kind of what left the device, plus refusals."""

    messages: int
    bytes: int
    by_kind: Mapping[str, tuple[int, int]]  # kind -> (messages, bytes)
    refusals: int
    unreadable: int

    @property
    def sentence(self) -> str:
        if self.messages == 0:
            head = "0 messages, 0 bytes; nothing left this device"
        elif set(self.by_kind) <= {UPDATE, METRICS}:
            head = (f"{self.messages} messages, {self.bytes} bytes, all model updates and metrics; "
                    f"no raw data left this device")
        elif not (odd := egress.unexpected(self.by_kind)):
            head = (f"{self.messages} messages, {self.bytes} bytes: {', '.join(egress.describe(self.by_kind))}; "
                    f"no raw data left this device")
        else:
            head = f"{self.messages} messages, {self.bytes} bytes, including unexpected kinds {odd}"
        if self.refusals:
            head += f"; {self.refusals} request{'s' * (self.refusals != 1)} refused"
        if self.unreadable:
            head += f"; {self.unreadable} unreadable ledger line{'s' * (self.unreadable != 1)}"
        return head


def summarize(home: str | Path) -> Summary:
    """Read `<home>/ledger.jsonl` (absent means nothing was sent); FileNotFoundError if no home."""
    home = Path(home)
    if not home.is_dir():
        raise FileNotFoundError(f"device home {home} does not exist")
    by_kind: dict[str, tuple[int, int]] = {}
    refusals = unreadable = 0
    path = home / LEDGER_FILE
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
    for line in filter(str.strip, lines):
        try:
            entry = json.loads(line)
            kind, nbytes = str(entry["kind"]), int(entry.get("bytes", 0))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            unreadable += 1
            continue
        if kind == REFUSAL:
            refusals += 1
            continue
        count, total = by_kind.get(kind, (0, 0))
        by_kind[kind] = (count + 1, total + nbytes)
    return Summary(
        messages=sum(c for c, _ in by_kind.values()), bytes=sum(b for _, b in by_kind.values()),
        by_kind=by_kind, refusals=refusals, unreadable=unreadable,
    )
