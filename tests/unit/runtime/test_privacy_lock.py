"""The privacy lock reads the ledger with the device's own list of kinds (`pocketfed.egress`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pocketfed import egress
from pocketfed.runtime import privacy_lock
from pocketfed.runtime.privacy_lock import host_id


def _model(tmp_path: Path) -> Path:
    """The smallest export folder the lock reads: a manifest made here, without DP figures."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "gguf-q4_0", "made_on": host_id()}))
    return folder


def _secagg_round_ledger(home: Path) -> None:
    """What a device's real ledger holds after one secure-aggregation round, written by the ledger itself."""
    from pocketfed.device import ledger

    u8 = lambda n: np.zeros(n, np.uint8)  # noqa: E731
    for kind, payload in [
        (ledger.SECAGG_KEYS, {"enc_public": u8(32), "mask_public": u8(32)}),
        (ledger.SECAGG_SHARES, {"share/1": u8(168), "share/2": u8(168)}),
        (ledger.MASKED_UPDATE, {"masked": np.ones(5, np.uint32)}),
        (ledger.UNMASK_SHARES, {"share/1": u8(40)}),
    ]:
        schema = {k: (v.shape, str(v.dtype)) for k, v in payload.items()}
        ledger.check_and_record(home, "https://server/round/0", kind, payload, schema)
    ledger.check_and_record(home, "https://server/round/0", ledger.METRICS, {"loss": 2.5, "num_tokens": 64.0}, {})
    with pytest.raises(ledger.EgressRefused):  # a refusal is recorded too, and never left
        ledger.check_and_record(home, "server", "personal_adapter", {"w": torch.zeros(1)}, {})


def test_a_secure_aggregation_round_gives_no_warning(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _secagg_round_ledger(home)
    kinds = [json.loads(x)["kind"] for x in (home / egress.LEDGER_FILE).read_text().splitlines()]
    assert kinds == ["secagg_keys", "secagg_shares", "masked_update", "unmask_shares", "metrics", "refusal"]
    line = privacy_lock(_model(tmp_path), home)
    assert "WARNING" not in line, line
    assert line == ("privacy lock: made on this device; your personal data was not shared (ledger: 5 messages left "
                    "this device, only model updates (masked), key-agreement messages and metrics: "
                    "masked_update x1, metrics x1, secagg_keys x1, secagg_shares x1, unmask_shares x1; "
                    "1 refused and kept)")


@pytest.mark.parametrize("kind", egress.ALLOWED_KINDS)
def test_every_kind_the_ledger_allows_is_trusted(tmp_path: Path, kind: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / egress.LEDGER_FILE).write_text(json.dumps({"kind": kind, "bytes": 10}) + "\n")
    line = privacy_lock(_model(tmp_path), home)
    assert "WARNING" not in line and f"{kind} x1" in line and egress.DESCRIPTIONS[kind] in line


def test_an_unknown_kind_still_warns(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _secagg_round_ledger(home)
    with (home / egress.LEDGER_FILE).open("a") as f:
        f.write(json.dumps({"kind": "raw_text_upload", "bytes": 9}) + "\n")
    line = privacy_lock(_model(tmp_path), home)
    assert "WARNING: the ledger shows other messages left this device (raw_text_upload)" in line
    assert "not shared" not in line
