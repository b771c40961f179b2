"""A device whose data is below the coordinator's data.min_train_tokens is told which key decides,
its value, its own count, and that the operator can lower it (it cannot fix the setting itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pocketfed.config import DataConfig
from pocketfed.data import textdir
from pocketfed.data.federated import FederatedDataset
from pocketfed.device.agent import device_dataset
from pocketfed.errors import UserError
from pocketfed.model.zoo import tokenizer_dir

TRIAL = Path(__file__).resolve().parents[3] / "configs" / "trial-data" / "ana"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tokenizer_dir())


def test_too_little_data_names_the_key_both_numbers_and_who_can_change_it(tokenizer):
    pieces = textdir.read_device(TRIAL)
    cfg = DataConfig(dataset="textdir", seq_len=64, min_train_tokens=512)
    # counted independently: the train split's tokens with no minimum
    n = FederatedDataset("textdir", {"d": pieces}, tokenizer, DataConfig(dataset="textdir", seq_len=64,
                                                                          min_train_tokens=0)).train_token_counts(["d"])[0]
    assert 100 < n < 512  # the trial's notes: a few paragraphs
    with pytest.raises(UserError) as e:
        device_dataset(pieces, TRIAL, "d", tokenizer, cfg)
    msg = str(e.value)
    assert f"the coordinator's data.min_train_tokens (512) is above this device's {n} training tokens" in msg
    assert "the operator can lower it" in msg and f"--set data.min_train_tokens={n}" in msg


def test_enough_data_is_the_dataset(tokenizer):
    pieces = textdir.read_device(TRIAL)
    ds = device_dataset(pieces, TRIAL, "d", tokenizer, DataConfig(dataset="textdir", seq_len=64, min_train_tokens=128))
    assert ds.device_ids == ["d"] and len(ds.device("d").train) > 0
