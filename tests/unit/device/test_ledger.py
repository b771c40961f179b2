"""Egress ledger: a hostile task's requests are refused and recorded; good messages are recorded first."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as safetensors_load

from pocketfed.device import ledger

SCHEMA: ledger.Schema = {
    "layers.0.q_proj.lora_A": ((8, 16), "float32"),
    "layers.0.q_proj.lora_B": ((16, 8), "float32"),
}


def _update() -> dict[str, torch.Tensor]:
    return {"layers.0.q_proj.lora_A": torch.ones(8, 16), "layers.0.q_proj.lora_B": torch.zeros(16, 8)}


def _entries(home: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (home / ledger.LEDGER_FILE).read_text().splitlines()]


def test_good_update_is_recorded_with_sha256_and_bytes(tmp_path: Path) -> None:
    data = ledger.check_and_record(tmp_path, "https://server/round/3", "update", _update(), SCHEMA)
    (entry,) = _entries(tmp_path)  # on disk before the caller can send `data`
    assert entry["kind"] == "update" and entry["destination"] == "https://server/round/3"
    assert entry["bytes"] == len(data)
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["tensors"] == [["layers.0.q_proj.lora_A", [8, 16], "float32"],
                                ["layers.0.q_proj.lora_B", [16, 8], "float32"]]
    sent = safetensors_load(data)
    assert torch.equal(sent["layers.0.q_proj.lora_A"], torch.ones(8, 16))
    assert len(data) > (8 * 16 + 16 * 8) * 4  # the tensors plus the safetensors header


def test_good_metrics_are_recorded(tmp_path: Path) -> None:
    data = ledger.check_and_record(tmp_path, "server", "metrics", {"loss": 2.5, "num_tokens": 1024}, SCHEMA)
    assert json.loads(data) == {"loss": 2.5, "num_tokens": 1024.0}
    (entry,) = _entries(tmp_path)
    assert entry["metrics"] == {"loss": 2.5, "num_tokens": 1024.0} and entry["bytes"] == len(data)


HOSTILE = [
    ("metrics", {"loss": 1.0, "train_loss": "the user typed: my password is hunter2"}, "carries text"),
    ("metrics", {"user_text_length": 12.0}, "not in the allow-list"),
    ("metrics", {"loss": math.nan}, "not a finite real number"),
    ("metrics", {"loss": [1.0, 2.0]}, "not a finite real number"),
    ("update", {**_update(), "embed_tokens.weight": torch.zeros(4, 16)}, "not in the task's adapter schema"),
    ("update", {**_update(), "layers.0.q_proj.lora_A": torch.ones(8, 17)}, "the schema says (8, 16)"),
    ("update", {**_update(), "layers.0.q_proj.lora_A": torch.ones(8, 16, dtype=torch.float64)}, "float64"),
    ("update", {"layers.0.q_proj.lora_A": torch.ones(8, 16)}, "lacks schema tensors"),
    ("personal_adapter", _update(), "personal adapter never leaves"),
    ("raw_text", {"text": torch.zeros(1)}, "may not leave this device"),
]


@pytest.mark.parametrize("kind, payload, reason", HOSTILE,
                         ids=["text-metric", "unknown-metric", "nan", "list", "extra-tensor",
                              "wrong-shape", "wrong-dtype", "missing-tensor", "personal", "raw"])
def test_hostile_requests_are_refused_and_recorded(tmp_path: Path, kind: str, payload: dict[str, Any],
                                                   reason: str) -> None:
    with pytest.raises(ledger.EgressRefused, match=reason.replace("(", r"\(").replace(")", r"\)")):
        ledger.check_and_record(tmp_path, "server", kind, payload, SCHEMA)
    (entry,) = _entries(tmp_path)
    assert entry["kind"] == "refusal" and entry["requested_kind"] == kind
    assert reason in entry["reason"]
    assert "hunter2" not in (tmp_path / ledger.LEDGER_FILE).read_text()  # the text is not copied
    assert "sha256" not in entry


def test_summarize_counts_and_sentence(tmp_path: Path) -> None:
    sizes = [len(ledger.check_and_record(tmp_path, "server", "update", _update(), SCHEMA)) for _ in range(2)]
    sizes.append(len(ledger.check_and_record(tmp_path, "server", "metrics", {"loss": 1.0}, SCHEMA)))
    with pytest.raises(ledger.EgressRefused):
        ledger.check_and_record(tmp_path, "server", "personal_adapter", _update(), SCHEMA)
    summary = ledger.summarize(tmp_path)
    assert summary.messages == 3 and summary.bytes == sum(sizes) and summary.refusals == 1
    assert summary.by_kind == {"update": (2, sizes[0] + sizes[1]), "metrics": (1, sizes[2])}
    assert summary.sentence == (f"3 messages, {sum(sizes)} bytes, all model updates and metrics; "
                                f"no raw data left this device; 1 request refused")
    assert len(_entries(tmp_path)) == 4  # appended, never rewritten


def test_summarize_empty_odd_and_missing(tmp_path: Path) -> None:
    assert ledger.summarize(tmp_path).sentence == "0 messages, 0 bytes; nothing left this device"
    (tmp_path / ledger.LEDGER_FILE).write_text('{"kind": "raw_text", "bytes": 9}\nnot json\n')
    odd = ledger.summarize(tmp_path)
    assert "unexpected kinds ['raw_text']" in odd.sentence and "1 unreadable ledger line" in odd.sentence
    assert "no raw data" not in odd.sentence
    with pytest.raises(FileNotFoundError):
        ledger.summarize(tmp_path / "nowhere")


def test_secagg_kinds_are_checked_recorded_and_summarized(tmp_path: Path) -> None:
    import numpy as np

    from pocketfed.protocol import secagg_wire as sw

    keys = {"enc_public": np.arange(32, dtype=np.uint8), "mask_public": np.zeros(32, np.uint8),
            "signature": np.ones(64, np.uint8)}
    data = ledger.check_and_record(tmp_path, "server", ledger.SECAGG_KEYS, keys, sw.keys_schema())
    assert sw.parse_keys(data) == (bytes(range(32)), bytes(32), bytes([1] * 64))
    masked_schema = {"masked": ((5,), "uint32")}
    ledger.check_and_record(tmp_path, "server", ledger.MASKED_UPDATE, {"masked": np.ones(5, np.uint32)}, masked_schema)
    ledger.check_and_record(tmp_path, "server", "metrics", {"loss": 1.0}, {})
    hostile = [
        (ledger.MASKED_UPDATE, {"masked": np.ones(5, np.uint32), "embed_tokens.weight": np.zeros(4, np.float32)},
         masked_schema, "not in the task's adapter schema"),
        (ledger.MASKED_UPDATE, {"masked": np.ones(6, np.uint32)}, masked_schema, "the schema says (5,)"),
        (ledger.SECAGG_KEYS, {**keys, "enc_public": np.zeros(33, np.uint8)}, sw.keys_schema(), "the schema says (32,)"),
        (ledger.SECAGG_SHARES, {"share/0": torch.zeros(168, dtype=torch.uint8)}, sw.shares_schema([0]), "not a ndarray"),
        ("metrics", {"loss": "my password is hunter2"}, {}, "carries text"),
    ]
    for kind, payload, schema, reason in hostile:
        with pytest.raises(ledger.EgressRefused, match=reason.replace("(", r"\(").replace(")", r"\)")):
            ledger.check_and_record(tmp_path, "server", kind, payload, schema)
    entries = _entries(tmp_path)
    assert [e["kind"] for e in entries] == ["secagg_keys", "masked_update", "metrics"] + ["refusal"] * len(hostile)
    assert entries[1]["arrays"] == [["masked", [5], "uint32"]]
    s = ledger.summarize(tmp_path)
    assert s.messages == 3 and s.refusals == len(hostile)
    assert s.sentence.startswith("3 messages, ")
    assert "model updates (masked), key-agreement messages, metrics; no raw data left this device; 5 requests refused" in s.sentence


def test_kinds_come_from_the_one_egress_list() -> None:
    """The ledger enforces `pocketfed.egress`'s list, the one the runtime's privacy lock trusts."""
    from pocketfed import egress

    assert ledger.ALLOWED_KINDS is egress.ALLOWED_KINDS and ledger.LEDGER_FILE == egress.LEDGER_FILE
    assert (ledger.UPDATE, ledger.METRICS, ledger.REFUSAL) == ("update", "metrics", "refusal")
    assert set(egress.DESCRIPTIONS) == set(egress.ALLOWED_KINDS)  # every kind that may leave says what it is
    assert egress.describe(["metrics", "unmask_shares", "secagg_keys", "masked_update", "raw_text"]) == [
        "model updates (masked)", "key-agreement messages", "metrics"]
    assert egress.unexpected(["update", "raw_text", "personal_adapter", "refusal"]) == [
        "personal_adapter", "raw_text", "refusal"]


KEY_HEX = "ab" * 32
TOKEN = "tok_" + "x" * 39  # 43 characters, as `pocketfed enroll` prints


def test_registration_and_checkins_are_recorded_the_token_only_hashed(tmp_path: Path) -> None:
    reg = {"name": "device-0a1b2c3d", "public_key": KEY_HEX, "enrollment_token": TOKEN, "wire_version": 1}
    data = ledger.check_and_record(tmp_path, "https://server", ledger.REGISTRATION, reg, {})
    assert json.loads(data) == reg  # the exact request body: the server needs the token itself
    elig = {"charging": True, "idle": True, "unmetered": False, "free_memory_mb": 2048}
    sent = ledger.check_and_record(tmp_path, "https://server", ledger.CHECKIN, {"eligibility": elig, "wire_version": 1}, {})
    assert json.loads(sent) == {"eligibility": {**elig, "profile": ""}, "wire_version": 1}  # "": no profile
    first, second = _entries(tmp_path)
    assert first["kind"] == "registration" and first["name"] == "device-0a1b2c3d" and first["public_key"] == KEY_HEX
    assert first["enrollment_token_sha256"] == hashlib.sha256(TOKEN.encode()).hexdigest()
    assert first["bytes"] == len(data) and first["sha256"] == hashlib.sha256(data).hexdigest()
    assert TOKEN not in (tmp_path / ledger.LEDGER_FILE).read_text()  # a log a person may share: no credential
    assert second["kind"] == "checkin" and second["eligibility"] == {**elig, "profile": ""}
    s = ledger.summarize(tmp_path)
    assert s.by_kind == {"registration": (1, len(data)), "checkin": (1, len(sent))}
    assert s.sentence == f"2 messages, {len(data) + len(sent)} bytes: registration, check-ins; no raw data left this device"


@pytest.mark.parametrize("kind, payload, reason", [
    (ledger.REGISTRATION, {"name": "device-1", "public_key": KEY_HEX, "notes": "my diary"}, "'notes'"),
    (ledger.REGISTRATION, {"name": "my diary: today I", "public_key": KEY_HEX}, "'name'"),
    (ledger.CHECKIN, {"eligibility": {"charging": True, "idle": True, "unmetered": True, "free_memory_mb": 1,
                                      "location": "52.52,13.40"}}, "'eligibility.location'"),
    (ledger.CHECKIN, {"eligibility": {"charging": "my password", "idle": True, "unmetered": True,
                                      "free_memory_mb": 1}}, "'eligibility.charging'"),
], ids=["extra-field", "text-name", "extra-eligibility", "text-eligibility"])
def test_registration_and_checkins_outside_their_wire_message_are_refused(tmp_path: Path, kind, payload, reason) -> None:
    with pytest.raises(ledger.EgressRefused, match=reason):
        ledger.check_and_record(tmp_path, "server", kind, payload, {})
    (entry,) = _entries(tmp_path)
    assert entry["kind"] == "refusal" and entry["requested_kind"] == kind
    text = (tmp_path / ledger.LEDGER_FILE).read_text()
    assert "diary" not in text and "52.52" not in text and "password" not in text  # the values are not copied


def test_a_refusal_the_device_decides_is_recorded_and_nothing_counts_as_sent(tmp_path: Path) -> None:
    ledger.record_refusal(tmp_path, "https://server", "task", "round 3: the task's noise multiplier 0 is below ...")
    (entry,) = _entries(tmp_path)
    assert entry["kind"] == "refusal" and entry["requested_kind"] == "task" and "round 3" in entry["reason"]
    s = ledger.summarize(tmp_path)
    assert s.messages == 0 and s.refusals == 1
    assert s.sentence == "0 messages, 0 bytes; nothing left this device; 1 request refused"
