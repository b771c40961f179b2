"""LoRA through PEFT, and the adapter state that is the only thing crossing the wire.

An adapter state is a flat `dict[str, Tensor]` keyed by PEFT's own names (from
`get_peft_model_state_dict`), float32, on CPU. Updates are differences of two such states.

PEFT (and the transformers modules it pulls in, ~120 MB of a process's memory) is imported only by
the functions that need a PEFT model: the coordinator and the simulator's rounds use the state
arithmetic below without it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pocketfed.config import LoraConfig
from pocketfed.model.depth import adapted_layers, layers_of

if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel
    from transformers import PreTrainedModel

AdapterState = dict[str, torch.Tensor]


def peft_config(cfg: LoraConfig, layers: list[int] | None = None) -> PeftLoraConfig:
    """PEFT's config for `cfg`, LoRA on the decoder layers `layers` (None: all). Where an adapter
    state exists, `layers` comes from its names (`depth.layers_of`), so the folder matches its weights."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach(model: PreTrainedModel, cfg: LoraConfig, seed: int) -> PeftModel:
    """Wrap the (frozen) base model with LoRA on the top `cfg.layers` decoder layers (0 = all); the
    initial A matrices are drawn under `seed`, in module order.

    Sparse back-propagation (`pocketfed.model.depth`): nothing below the lowest adapted layer
    requires a gradient, so autograd records no graph there and keeps none of its activations, as
    long as the embeddings' output does not require a gradient. PEFT and transformers'
    checkpointing make it require one (`enable_input_require_grads`, for reentrant checkpointing,
    which we never use); a last forward hook detaches it again (the embeddings are frozen)."""
    from peft import get_peft_model

    n = int(model.config.num_hidden_layers)
    layers = adapted_layers(cfg.layers, n)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_config(cfg, layers if len(layers) < n else None))
    model.get_input_embeddings().register_forward_hook(lambda _module, _inputs, out: out.detach())
    return peft_model


def get_state(model: PeftModel) -> AdapterState:
    """A detached float32 copy of the adapter weights."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to(torch.float32).clone() for k, v in get_peft_model_state_dict(model).items()}


def set_state(model: PeftModel, state: AdapterState) -> None:
    """Load adapter weights in place; the key set must match exactly."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    current = get_peft_model_state_dict(model)
    if set(current) != set(state):
        missing = sorted(set(current) - set(state))[:3]
        extra = sorted(set(state) - set(current))[:3]
        raise ValueError(f"adapter keys do not match the model (missing {missing}, unexpected {extra})")
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"unexpected adapter keys: {result.unexpected_keys[:3]}")


def save_folder(state: AdapterState, folder: Path, cfg: LoraConfig, model_id: str) -> None:
    """Write `state` as a PEFT adapter folder for the base `model_id` (`write_folder`), from our config."""
    config = peft_config(cfg, layers_of(state) if cfg.layers else None)
    config.base_model_name_or_path = model_id
    write_folder(state, folder, config)


def write_folder(state: AdapterState, folder: Path, config: PeftLoraConfig) -> None:
    """Write `state` as a PEFT adapter folder (adapter_model.safetensors + adapter_config.json, what
    `PeftModel.save_pretrained` writes), atomically: loadable by `PeftModel.from_pretrained` on the
    base `config.base_model_name_or_path`. No model is needed: the state's keys are PEFT's saved names."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def add(a: AdapterState, b: AdapterState, scale: float = 1.0) -> AdapterState:
    return {k: a[k] + scale * b[k] for k in a}


def sub(a: AdapterState, b: AdapterState) -> AdapterState:
    return {k: a[k] - b[k] for k in a}


def zeros_like(a: AdapterState) -> AdapterState:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def num_bytes(a: AdapterState) -> int:
    return sum(v.numel() * v.element_size() for v in a.values())
