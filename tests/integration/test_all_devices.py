"""`--devices all`: every Shakespeare role is a device; only the sampled (and held-out) ones are
ever tokenized."""

from __future__ import annotations

import json

import pytest

from pocketfed.cli import _overrides
from pocketfed.data.federated import FederatedDataset
from pocketfed.simulate import simulate
from tests.conftest import tiny_config

pytestmark = pytest.mark.integration


def test_devices_all_maps_to_whole_population():
    assert _overrides([], None, "all", 100, None, None)["sim"] == {"devices": 0, "per_round": 100}


def test_all_roles_as_devices_tokenizes_only_sampled(tmp_path, monkeypatch):
    tokenized: list[str] = []
    real = FederatedDataset._device

    def spy(self, device_id):
        tokenized.append(device_id)
        return real(self, device_id)

    monkeypatch.setattr(FederatedDataset, "_device", spy)
    # min_train_tokens=1: every role with a line is a device (1,319), not only the ~400 large ones.
    cfg = tiny_config(data={"min_train_tokens": 1}, sim={"devices": 0, "per_round": 5, "rounds": 2, "heldout": 2},
                      eval={"variants": ["federated"], "every_round": False})
    result = simulate(cfg, tmp_path / "all")
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["devices"]["population"] + summary["devices"]["heldout"] == 1319
    sampled = {d for row in result.history for d in row["devices"]}
    assert 5 < len(sampled) <= 10
    assert len(tokenized) == len(set(tokenized))  # cached: each device tokenized once
    assert len(tokenized) == len(sampled) + 2  # the sampled devices and the held-out ones, nothing else
