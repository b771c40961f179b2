"""LoRA through PEFT, and the adapter state that is the only thing crossing the wire.

An adapter state is a flat `dict[str, Tensor]` keyed by PEFT's own names (from
`get_peft_model_state_dict`), float32, on CPU. Updates are differences of two such states.
"""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from pocketfed.config import LoraConfig

AdapterState = dict[str, torch.Tensor]


def peft_config(cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach(model: PreTrainedModel, cfg: LoraConfig, seed: int) -> PeftModel:
    """Wrap the (frozen) base model with LoRA; the initial A matrices are drawn under `seed`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_config(cfg))
    return peft_model


def get_state(model: PeftModel) -> AdapterState:
    """A detached float32 copy of the adapter weights."""
    return {k: v.detach().to(torch.float32).clone() for k, v in get_peft_model_state_dict(model).items()}


def set_state(model: PeftModel, state: AdapterState) -> None:
    """Load adapter weights in place; the key set must match exactly."""
    current = get_peft_model_state_dict(model)
    if set(current) != set(state):
        missing = sorted(set(current) - set(state))[:3]
        extra = sorted(set(state) - set(current))[:3]
        raise ValueError(f"adapter keys do not match the model (missing {missing}, unexpected {extra})")
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"unexpected adapter keys: {result.unexpected_keys[:3]}")


def add(a: AdapterState, b: AdapterState, scale: float = 1.0) -> AdapterState:
    return {k: a[k] + scale * b[k] for k in a}


def sub(a: AdapterState, b: AdapterState) -> AdapterState:
    return {k: a[k] - b[k] for k in a}


def zeros_like(a: AdapterState) -> AdapterState:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def num_bytes(a: AdapterState) -> int:
    return sum(v.numel() * v.element_size() for v in a.values())
