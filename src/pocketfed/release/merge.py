"""Load a run's base model and adapters, check they belong together, merge them into plain weights.

Merging is PEFT's `merge_and_unload`: for every LoRA-wrapped linear layer

    W' = W + (alpha / r) * B @ A            W: [out, in], B: [out, r], A: [r, in]

A personal adapter (pocketfed.device.personal) is the global adapter trained further on the
device's own data, so it already holds the global one: when given, it is the adapter applied,
W' = W + dW_personal, and the manifest still names both (LoRA, Hu et al. 2021, arXiv:2106.09685).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from pocketfed.config import RunConfig, load_config
from pocketfed.errors import UserError
from pocketfed.files import sha256_file
from pocketfed.model.zoo import BaseModel, load_base
from pocketfed.release.int4_lora import LoraFactor


@dataclass(frozen=True)
class AdapterRef:
    role: str  # "global" | "personal"
    path: Path
    sha256: str  # of adapter_model.safetensors


@dataclass(frozen=True)
class RunInputs:
    run_dir: Path
    config: RunConfig
    adapters: tuple[AdapterRef, ...]  # the run's global adapter, then the personal one if given
    privacy: dict[str, float] | None  # {"epsilon": .., "delta": ..} from summary.json, if the run had DP

    @property
    def applied(self) -> tuple[AdapterRef, ...]:
        """The adapters folded into the model: the personal one alone when given (it was trained from
        the global one and contains it; adding both would count the global adapter twice)."""
        return tuple(a for a in self.adapters if a.role == "personal") or self.adapters


def _adapter_ref(role: str, folder: Path) -> AdapterRef:
    cfg = folder / "adapter_config.json"
    weights = folder / "adapter_model.safetensors"
    if not folder.is_dir() or not cfg.is_file() or not weights.is_file():
        raise UserError(
            f"{role} adapter folder {str(folder)!r} must hold adapter_config.json and adapter_model.safetensors"
        )
    return AdapterRef(role=role, path=folder, sha256=sha256_file(weights))


def _adapter_base_id(ref: AdapterRef) -> str:
    try:
        data = json.loads((ref.path / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{str(ref.path / 'adapter_config.json')!r} is not valid JSON: {e}") from None
    return str(data.get("base_model_name_or_path") or "")


def _read_privacy(run_dir: Path) -> dict[str, float] | None:
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return None
    try:
        data = json.loads(summary.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{str(summary)!r} is not valid JSON: {e}") from None
    privacy = data.get("privacy") if isinstance(data, dict) else None
    # the model's recipients' epsilon (summary.json before two epsilons called it "epsilon")
    eps = privacy.get("epsilon_recipients", privacy.get("epsilon")) if isinstance(privacy, dict) else None
    if eps is None:
        return None
    return {"epsilon": float(eps), "delta": float(privacy.get("delta") or 0.0)}  # type: ignore[union-attr]


def read_run(run_dir: str | Path, personal: str | Path | None = None) -> RunInputs:
    """Check a run folder (and optional personal adapter) without loading any weights."""
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise UserError(f"run folder {str(run)!r} does not exist; give the --out folder of `pocketfed simulate`")
    if not (run / "config.yaml").is_file():
        raise UserError(f"run folder {str(run)!r} has no config.yaml; is it the --out folder of `pocketfed simulate`?")
    config = load_config(run / "config.yaml")
    adapters = [_adapter_ref("global", run / "adapter")]
    if personal is not None:
        adapters.append(_adapter_ref("personal", Path(personal).expanduser()))
    return RunInputs(run_dir=run, config=config, adapters=tuple(adapters), privacy=_read_privacy(run))


def load_base_for(run: RunInputs) -> BaseModel:
    """Load the run's base model and refuse adapters that were trained on another one."""
    base = load_base(run.config.model.name, run.config.model.cache_dir)
    for ref in run.adapters:
        trained_on = _adapter_base_id(ref)
        if trained_on and trained_on != base.model_id:
            raise UserError(
                f"the {ref.role} adapter in {str(ref.path)!r} was trained on base model {trained_on!r}, "
                f"but the run's base model is {base.model_id!r}"
            )
    return base


def merge(model: PreTrainedModel, adapters: tuple[AdapterRef, ...]) -> PreTrainedModel:
    """Fold each adapter into the weights, in order (pass `RunInputs.applied`)."""
    for ref in adapters:
        try:
            peft_model = PeftModel.from_pretrained(model, str(ref.path), adapter_name=ref.role)
        except Exception as e:  # PEFT and safetensors raise assorted types for a bad adapter file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"could not load the {ref.role} adapter in {str(ref.path)!r}: {first}") from None
        model = peft_model.merge_and_unload()
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if not torch.isfinite(p).all():
                raise UserError("the merged model has non-finite weights; the adapter file is corrupt")
    return model


def lora_factors(model: PreTrainedModel, adapters: tuple[AdapterRef, ...]) -> list[LoraFactor]:
    """Each adapter's LoRA factors per wrapped linear, scaling as PEFT computes it (alpha / r, or
    alpha / sqrt(r) with rsLoRA, per-module rank/alpha patterns included). `model` is wrapped by
    PEFT while reading and unwrapped again (its weights are left as they were)."""
    peft_model = None
    for ref in adapters:
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(ref.path), adapter_name=ref.role)
            else:
                peft_model.load_adapter(str(ref.path), adapter_name=ref.role)
        except Exception as e:  # as in merge()
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"could not load the {ref.role} adapter in {str(ref.path)!r}: {first}") from None
    if peft_model is None:
        return []
    factors = []
    for name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if any(getattr(module, "use_dora", {}).get(ref.role, False) for ref in adapters):
            raise UserError("onnx-int4 keeps LoRA unmerged and does not support DoRA adapters; export onnx-int8")
        for ref in adapters:
            if ref.role not in module.lora_A:
                continue
            a = module.lora_A[ref.role].weight.detach().float().numpy()
            b = module.lora_B[ref.role].weight.detach().float().numpy()
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise UserError(f"the {ref.role} adapter has non-finite weights; the adapter file is corrupt")
            factors.append(LoraFactor(role=ref.role, module=name, a=a, b=b, scale=float(module.scaling[ref.role])))
    peft_model.unload()
    return factors
