"""Shared fixtures: the `tiny` model and a small config for fast runs."""

from __future__ import annotations

import pytest

from pocketfed.config import RunConfig, load_config


def tiny_config(**sections) -> RunConfig:
    """configs/tiny.yaml's shape, in code, with per-test overrides: tiny_config(sim={"rounds": 3})."""
    base = {
        "model": {"name": "tiny"},
        "data": {"seq_len": 32, "min_train_tokens": 512, "max_eval_tokens": 128},
        "train": {"steps": 2, "batch_size": 4, "lr": 5e-3},
        "sim": {"devices": 4, "rounds": 2, "heldout": 2, "seed": 0},
        "eval": {"personalize_steps": 1, "centralized_steps": 2},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return load_config(None, base)


@pytest.fixture
def tiny_base():
    """A fresh `tiny` base model per test (PEFT wraps models in place; ~0.3 s to load)."""
    from pocketfed.model.zoo import load_base

    return load_base("tiny")
