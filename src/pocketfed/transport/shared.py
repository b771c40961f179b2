"""The model a simulated device trains, built on one copy of the base weights.

Both backends train every virtual device on the simulator's base weights without copying them:
the in-process backend on the simulator's own tensors, the Ray backend's workers on zero-copy views
of the one copy in Ray's object store (`SharedWeights`, numpy arrays: the object store hands them
out without copying). Where the lean Llama (`pocketfed.device.leanmodel`: SmolLM2, `tiny`) supports
the model, devices train it, as a real device process does: no transformers or PEFT on the
training path, and its loss keeps one [N, V] tensor of logits instead of transformers' logits,
shifted copy and log-softmax. Other models train in transformers + PEFT. The two agree to float32
rounding (tests/unit/device/test_task.py).

The simulator itself holds the same model (`load_simulator`): it evaluates, personalizes and saves
through it, so where the lean Llama fits, `pocketfed simulate` imports neither transformers nor PEFT
on its way through the rounds (~120 MB less in the coordinating process; PEFT writes the adapter
folder's config at the end).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocketfed.config import LoraConfig
from pocketfed.device import leanmodel
from pocketfed.device.leanmodel import LeanConfig
from pocketfed.device.lowmem import Precision
from pocketfed.device.planner import Backend, backend_for
from pocketfed.device.shape import ModelShape
from pocketfed.device.task import DeviceModel, wrap_lean, wrap_peft


@dataclasses.dataclass(frozen=True)
class SharedWeights:
    """A base model as plain data for the object store: each distinct tensor once, as numpy.

    arrays[i] is one tensor; names[i] every module path it is registered under (tied weights,
    e.g. embed_tokens and lm_head, share one array). Buffers (rotary inv_freq) travel alike."""

    config: dict[str, Any]  # the transformers config as a dict (no transformers import to unpickle it)
    arrays: list[np.ndarray]
    param_names: list[list[str]]
    buffer_names: list[list[str]]  # aligned with arrays after the parameters
    lean: LeanConfig | None = None  # set when the lean Llama can train this model (float32 weights)


def share_base(model: torch.nn.Module, folder: Path | None = None) -> SharedWeights:
    """The frozen base weights of `model` (a plain or PEFT-wrapped causal LM), deduplicated.

    PEFT wraps target layers in place ("q_proj" -> "q_proj.base_layer"); the original names are
    restored and the LoRA tensors left out, so a worker builds the plain model and attaches LoRA
    itself. `folder`, the model's folder, lets workers train the lean Llama if it supports it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    lean_model = isinstance(inner, leanmodel.LeanLlama)

    def groups(named) -> tuple[list[np.ndarray], list[list[str]]]:
        by_ptr: dict[int, int] = {}
        arrays: list[np.ndarray] = []
        names: list[list[str]] = []
        for name, t in named:
            if "lora_" in name:
                continue
            name = name.replace(".base_layer", "")
            key = t.data_ptr()
            if key not in by_ptr:
                by_ptr[key] = len(arrays)
                arrays.append(t.detach().cpu().numpy())
                names.append([])
            names[by_ptr[key]].append(name)
        return arrays, names

    p_arrays, p_names = groups(inner.named_parameters(remove_duplicate=False))
    b_arrays, b_names = groups(inner.named_buffers(remove_duplicate=False))
    lean = None
    fp32 = all(a.dtype == np.float32 for a in p_arrays)
    if lean_model and fp32:
        lean = inner.config
    elif folder is not None and backend_for(folder) is Backend.lean and fp32:
        lean = LeanConfig.from_folder(folder)
    config = {} if lean_model else inner.config.to_dict()  # only build_base reads it (models the lean Llama can't train)
    return SharedWeights(config, p_arrays + b_arrays, p_names, b_names, lean)


def _views(shared: SharedWeights) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": frozen weights are never written
        return [torch.from_numpy(a) for a in shared.arrays]


def build_lean(shared: SharedWeights) -> leanmodel.LeanLlama:
    """The lean Llama (torch only) whose frozen weights are views of `shared`'s arrays (no copy); eval mode.

    Its parameter names are transformers' (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`);
    tied weights stay one tensor. The rotary buffers are not needed: the lean model computes them."""
    assert shared.lean is not None
    with torch.device("meta"):
        model = leanmodel.LeanLlama(shared.lean)
    for t, names in zip(_views(shared), shared.param_names):
        value = torch.nn.Parameter(t, requires_grad=False)
        for name in names:
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent)._parameters[leaf] = value  # type: ignore[assignment]
    still_meta = [n for n, t in model.named_parameters() if t.is_meta]
    if still_meta:
        raise RuntimeError(f"shared base model lacks tensors: {still_meta[:3]}")
    return model.eval().requires_grad_(False)


def build_base(shared: SharedWeights) -> torch.nn.Module:
    """A frozen eval-mode transformers model whose weights are views of `shared`'s arrays (no copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(shared.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config),
                                                 dtype=torch.float32)
    tensors = _views(shared)
    n_params = len(shared.param_names)
    for i, names in enumerate(shared.param_names + shared.buffer_names):
        value: torch.Tensor = torch.nn.Parameter(tensors[i], requires_grad=False) if i < n_params else tensors[i]
        for name in names:
            parent, _, leaf = name.rpartition(".")
            module = model.get_submodule(parent)
            if i < n_params:
                module._parameters[leaf] = value  # type: ignore[assignment]
            else:
                module._buffers[leaf] = value
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise RuntimeError(f"shared base model lacks tensors: {still_meta[:3]}")
    model.eval()
    return model


def device_model(shared: SharedWeights, lora_cfg: LoraConfig, seed: int) -> DeviceModel:
    """A worker's model: LoRA (A drawn under `seed`, as `lora.attach` draws it) on the shared base,
    in the lean Llama where `shared.lean` says it fits, else in transformers + PEFT."""
    if shared.lean is None:
        from pocketfed.model import lora

        return wrap_peft(lora.attach(build_base(shared), lora_cfg, seed=seed))
    return _with_lora(build_lean(shared), lora_cfg, seed)


def _with_lora(model: leanmodel.LeanLlama, lora_cfg: LoraConfig, seed: int) -> DeviceModel:
    leanmodel.attach_lora(model, lora_cfg.rank, lora_cfg.alpha, lora_cfg.target_modules, seed, lora_cfg.dropout,
                          lora_cfg.layers)
    return wrap_lean(model)


@dataclasses.dataclass
class SimulatorModel:
    """The simulator's model (LoRA attached) and what came with it."""

    model: DeviceModel  # evaluated, personalized and saved by the simulator; trained by the in-process backend
    tokenizer: Any  # `leanmodel.Tokenizer` beside the lean Llama, else transformers' tokenizer
    model_id: str  # a stable id (`zoo.resolve`)
    path: Path  # the folder the weights came from
    shape: ModelShape


def load_simulator(name: str, cache_dir: str, lora_cfg: LoraConfig, seed: int) -> SimulatorModel:
    """The base model `name` (a zoo name or folder, `zoo.resolve`) in float32 with LoRA (A drawn under
    `seed`, as `lora.attach` draws it): the lean Llama and the `tokenizers` library where the lean
    Llama supports the model, else transformers + PEFT (`zoo.load_base`, `lora.attach`)."""
    from pocketfed.model.zoo import resolve

    folder, model_id = resolve(name, cache_dir)
    shape = ModelShape.from_folder(folder)
    if backend_for(folder) is Backend.lean:
        model = _with_lora(leanmodel.load(folder, Precision.fp32), lora_cfg, seed)
        return SimulatorModel(model, leanmodel.Tokenizer(folder), model_id, folder, shape)
    from pocketfed.model import lora
    from pocketfed.model.zoo import load_base

    base = load_base(name, cache_dir)
    return SimulatorModel(wrap_peft(lora.attach(base.model, lora_cfg, seed)), base.tokenizer, model_id, folder, shape)
