"""A Llama-shaped decoder with LoRA in plain torch: the model a device trains in its own process.

Why not transformers + PEFT here: a device's budget is its whole process's RSS, and the imports
alone are most of a watch's (VmHWM measured on the dev machine): Python 9 MB, + torch 223 MB,
+ transformers' Llama modeling 379 MB, + PEFT 389 MB. Transformers and PEFT cost ~155 MB of the
watch's 512 MB before any weight; this module costs nothing beyond torch. It is interchangeable
with the simulator's transformers + PEFT model, and tests pin that on `tiny`:
- same maths as `LlamaForCausalLM` (logits within 1e-5 in fp32, padded batches included);
- the adapter state has PEFT's keys (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`),
  PEFT's init (under the same seed the same draws in the same module order: A ~ kaiming-uniform(a=sqrt 5),
  B = 0) and scaling alpha / r, so a device's update loads wherever PEFT's does.

    x_0 = E[ids]                                             [B, T, h]
    x' = x + o_proj(attn(rms(x)));  x_next = x' + mlp(rms(x'))   per layer, then rms, then the head
    attn: q [B, H, T, d], k, v [B, H_kv, T, d], rotary on q and k, softmax(q k^T / sqrt d + mask) v
          (grouped-query: H / H_kv query heads share one key/value head)
    mlp(x) = down(silu(gate(x)) * up(x));  rms(x) = w * x / sqrt(mean(x^2) + eps)
    LoRA on a target linear W: y = x W^T + (alpha / r) (x A^T) B^T,  A [r, in], B [out, r]
The loss (mean next-token cross-entropy over unmasked labels) streams the head over vocabulary
slices (`lowmem.head_loss`): the head read, or rebuilt from bf16, twice a micro-batch; the logits
are kept for backward without checkpointing and recomputed slice by slice with it. Supported configs: Llama with SiLU, no
biases and the default rotary embedding (SmolLM2, `tiny`); anything else is refused by name.

Activations are float32 whatever the weights are stored in (fp32, bf16, int8): bf16 and int8 weights
are rebuilt as float32 a slice at a time (`lowmem._FrozenLinear`), because bfloat16 matrix products
have no fast path on CPUs without AVX512-BF16 or AMX (lowmem's docstring has the measurement).
With LoRA on the top L layers only (`attach_lora(..., layers=L)`), the layers below run under
no_grad: no graph, no activations kept, no backward through them (`pocketfed.model.depth`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pocketfed.device.lowmem import INT8_MODULES, KEEP_REBUILT, Precision, cast_linears, fill, head_loss, quantize_linears
from pocketfed.device.shape import ModelShape
from pocketfed.errors import UserError
from pocketfed.model.depth import adapted_layers

PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's parameter names


@dataclass(frozen=True)
class LeanConfig(ModelShape):
    """The model's shape, plus what its forward pass needs."""

    eps: float = 1e-6
    rope_theta: float = 10000.0

    @staticmethod
    def from_folder(folder: Path) -> "LeanConfig":
        c = json.loads((folder / "config.json").read_text())
        rope = c.get("rope_parameters") or {"rope_theta": c.get("rope_theta", 10000.0), **(c.get("rope_scaling") or {})}
        unsupported = {"model_type": c.get("model_type") not in ("llama", None), "hidden_act": c.get("hidden_act", "silu") != "silu",
                       "attention_bias": bool(c.get("attention_bias")), "mlp_bias": bool(c.get("mlp_bias")),
                       "rope type": rope.get("rope_type", rope.get("type", "default")) != "default"}
        if any(unsupported.values()):
            raise UserError(f"{folder / 'config.json'}: the device trainer supports Llama decoders with SiLU, no biases and "
                            f"the default rotary embedding; this config differs in {[k for k, v in unsupported.items() if v]}")
        shape = ModelShape.from_config(SimpleNamespace(**c))
        return LeanConfig(**dataclasses.asdict(shape), eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=float(rope["rope_theta"]))


def checkpoint(fn: Callable[..., torch.Tensor], *args: Any, keep_rebuilt: bool = False) -> torch.Tensor:
    """fn(*args), keeping none of the tensors fn's backward needs: the first time backward asks for
    one, fn runs again (same inputs, grad on) and its saved tensors, in the same order, answer; each
    is dropped once used. The non-reentrant scheme of torch.utils.checkpoint(use_reentrant=False),
    written out because that function reads torch._dynamo's config, whose import costs +80 MB RSS.
    keep_rebuilt: the run again keeps the weights it rebuilds for the backward (lowmem.KEEP_REBUILT)."""
    saved: list[torch.Tensor | None] = []
    count = itertools.count()

    def unpack(i: int) -> torch.Tensor:
        if not saved:
            again = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
            keep = KEEP_REBUILT.set(keep_rebuilt)  # backward follows at once: rebuilt weights may wait for it
            try:
                with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(saved.append, lambda _: None):
                    fn(*again)
            finally:
                KEEP_REBUILT.reset(keep)
        t, saved[i] = saved[i], None
        assert t is not None, "a checkpointed tensor was asked for twice (backward with retain_graph?)"
        return t

    with torch.autograd.graph.saved_tensors_hooks(lambda _: next(count), unpack):
        return fn(*args)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: LeanConfig):
        super().__init__()
        self.h, self.hkv, self.d = c.heads, c.kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden, c.heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.d).transpose(1, 2)  # [B, H, T, d]
        k = self.k_proj(x).view(b, t, self.hkv, self.d).transpose(1, 2)  # [B, H_kv, T, d]
        v = self.v_proj(x).view(b, t, self.hkv, self.d).transpose(1, 2)
        o = F.scaled_dot_product_attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v, attn_mask=mask,
                                           is_causal=mask is None, enable_gqa=self.h != self.hkv)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.h * self.d))


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up for backward and nothing else. Autograd's silu and mul
    would keep silu(gate) as well: a third [B, T, intermediate] tensor a layer (45 MB of SmolLM2's
    ~230 MB of activations at 4 x 64 tokens). Backward recomputes sigmoid(gate), with s = sigmoid(gate):
        d up   = g * silu(gate) = g * gate * s
        d gate = g * up * s * (1 + gate * (1 - s))        (silu'(x) = s (1 + x (1 - s)))"""

    @staticmethod
    def forward(ctx, gate, up):  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        s = torch.sigmoid(gate)
        d_up = g * (gate * s) if ctx.needs_input_grad[1] else None
        d_gate = (g * up) * (s * (1 + gate * (1 - s))) if ctx.needs_input_grad[0] else None
        return d_gate, d_up


class MLP(nn.Module):
    def __init__(self, c: LeanConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.up_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.down_proj = nn.Linear(c.intermediate, c.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


class Layer(nn.Module):  # attributes in transformers' order: LoRA init draws follow module order
    def __init__(self, c: LeanConfig):
        super().__init__()
        self.self_attn, self.mlp = Attention(c), MLP(c)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(c.hidden, c.eps), RMSNorm(c.hidden, c.eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, c: LeanConfig):
        super().__init__()
        # given a weight, Embedding skips its normal_() init, which on meta imports torch._dynamo (+80 MB)
        self.embed_tokens = nn.Embedding(c.vocab, c.hidden, _weight=torch.empty(c.vocab, c.hidden))
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden, c.eps)


class LeanLlama(nn.Module):
    """Parameter names are the safetensors file's (`model.layers.0...`, `lm_head.weight`)."""

    def __init__(self, c: LeanConfig):
        super().__init__()
        self.config, self.checkpointing = c, False
        self.keep_rebuilt = False  # under checkpointing: see lowmem.KEEP_REBUILT (the plan's keep_rebuilt)
        self.frozen_below = 0  # layers [0, frozen_below) carry no LoRA: run without a graph (attach_lora sets it)
        self.model, self.lm_head = Decoder(c), nn.Linear(c.hidden, c.vocab, bias=False)

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, h]. ids [B, T]; mask [B, T] (True = real token) or None."""
        c, t = self.config, ids.shape[1]
        x = self.model.embed_tokens(ids).float()  # [B, T, h]; float32 whatever the embeddings' storage
        inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float) / c.head_dim)
        freqs = torch.arange(t, dtype=torch.float)[:, None] * inv_freq  # [T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        attn = None
        if mask is not None and not bool(mask.all()):
            attn = torch.ones(t, t, dtype=torch.bool).tril() & mask[:, None, None, :]  # [B, 1, T, T]
            attn = attn | ~attn.any(-1, keepdim=True)  # a query with no visible key (left padding) sees all: no NaN
        with torch.no_grad():  # sparse back-propagation: no graph, no activations kept below the lowest LoRA
            for layer in self.model.layers[: self.frozen_below]:
                x = layer(x, cos, sin, attn)
        for layer in self.model.layers[self.frozen_below :]:
            if self.checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, attn, keep_rebuilt=self.keep_rebuilt)
            else:
                x = layer(x, cos, sin, attn)
        return self.model.norm(x)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden(ids, mask))  # [B, T, V]

    def loss(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of token t+1 given tokens <= t, over unmasked targets (as transformers')."""
        # Right padding (as data.federated.to_blocks pads): a real token sees only earlier, real ones
        # under the causal mask alone, so the fused causal kernel serves and no [B, 1, T, T] mask is made.
        right_padded = bool((mask.int().cummin(dim=1).values == mask.int()).all())
        h = self.hidden(ids, None if right_padded else mask)[:, :-1].reshape(-1, self.config.hidden)  # [N, h], N = B (T-1)
        labels = ids[:, 1:].masked_fill(~mask[:, 1:], -100).reshape(-1)  # [N]
        # streamed over the vocabulary (lowmem.head_loss; the head is bias-free and frozen by
        # construction): the head read (and, stored narrower, rebuilt) twice a micro-batch instead
        # of 2-3 times per chunk of 32 positions. Measured (device.fit): watch plan, 2 threads,
        # 64 -> 72 tokens/s; plain fp32 demo round, 1 thread, 0.95x -> 1.05x transformers + PEFT's
        # speed; the same losses
        keep = torch.is_grad_enabled() and not (self.checkpointing and self.training)
        return head_loss(h, labels, self.lm_head.weight, keep_logits=keep) / (labels != -100).sum()


class LoraLinear(nn.Module):
    """PEFT's LoRA Linear, one adapter: base_layer frozen, lora_A and lora_B trained in float32."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer, self.scaling = base, alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)  # type: ignore[arg-type]
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)  # type: ignore[arg-type]
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return (y + self.lora_B(self.lora_A(x)) * self.scaling).to(y.dtype)


def load(folder: Path, precision: Precision) -> LeanLlama:
    """The frozen base of `folder` stored in `precision`, read chunk by chunk (see lowmem); eval mode.
    It computes in float32 whatever the storage: bf16 and int8 weights are rebuilt a slice at a time
    (lowmem._FrozenLinear; bfloat16 matrix products have no fast path on CPUs without AVX512-BF16)."""
    config = LeanConfig.from_folder(folder)
    with torch.device("meta"):
        model = LeanLlama(config)
    if precision is Precision.int8:
        quantize_linears(model)
    if precision is not Precision.fp32:
        cast_linears(model, ("lm_head", *INT8_MODULES))  # under int8 only the head is still an nn.Linear
    fill(model, folder / "model.safetensors", precision.storage_dtype)
    if config.tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise UserError(f"{folder / 'model.safetensors'} lacks tensors the config calls for: {left[:3]}")
    return model.eval().requires_grad_(False)


def attach_lora(model: LeanLlama, rank: int, alpha: float, targets: list[str] | tuple[str, ...], seed: int,
                dropout: float = 0.0, layers: int = 0) -> None:
    """Wrap every target linear of the top `layers` decoder layers (0 = all) with LoRA, A drawn under
    `seed` exactly as `pocketfed.model.lora.attach` draws it; the layers below run without a graph."""
    adapted = adapted_layers(layers, len(model.model.layers))
    model.frozen_below = adapted[0]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for i in adapted:  # module order, as PEFT wraps them
            for module in list(model.model.layers[i].modules()):
                for name, child in list(module.named_children()):
                    if name in targets:
                        setattr(module, name, LoraLinear(child, rank, alpha, dropout))


def adapter_state(model: LeanLlama) -> dict[str, torch.Tensor]:
    """A detached float32 copy of the adapter, keyed as `pocketfed.model.lora.get_state` keys it."""
    return {PEFT_PREFIX + n: p.detach().float().clone() for n, p in model.named_parameters() if ".lora_" in n}


def set_adapter_state(model: LeanLlama, state: dict[str, torch.Tensor]) -> None:
    """Load a PEFT-keyed adapter state in place; the key sets must match exactly."""
    params = {PEFT_PREFIX + n: p for n, p in model.named_parameters() if ".lora_" in n}
    if set(params) != set(state):
        raise ValueError(f"adapter keys do not match the model (missing {sorted(set(params) - set(state))[:3]}, "
                         f"unexpected {sorted(set(state) - set(params))[:3]})")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


class AdamW:
    """torch.optim.AdamW's update (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"),
    written out because torch.optim's first step imports torch._dynamo: +80 MB RSS (measured). Per step t:
        p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    in the order of torch's single-tensor CPU path, so the two agree bit for bit (a test pins it)."""

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.wd, self.betas, self.eps, self.t = list(params), lr, weight_decay, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        (b1, b2), self.t = self.betas, self.t + 1
        c1, c2_sqrt = 1 - b1**self.t, (1 - b2**self.t) ** 0.5
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            p.mul_(1 - self.lr * self.wd)
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v.sqrt() / c2_sqrt).add_(self.eps), value=-self.lr / c1)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


class Tokenizer:
    """A model folder's `tokenizer.json` through the `tokenizers` library alone: the same encoder that
    transformers' fast tokenizer wraps (a test pins equal ids), without importing transformers.
    Offers what `pocketfed.data.federated.FederatedDataset` calls: `tok(text or texts)["input_ids"]`,
    `eos_token`, `eos_token_id`, `pad_token_id` (the EOS token where the folder names no pad, as
    `pocketfed.model.zoo.load_base` sets it)."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as Encoder

        if not (folder / "tokenizer.json").is_file():
            raise UserError(f"model folder {str(folder)!r} has no tokenizer.json (a fast tokenizer is needed)")
        self._enc = Encoder.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        text = lambda t: t.get("content") if isinstance(t, dict) else t  # noqa: E731  (AddedToken as a dict)
        self.eos_token: str = text(cfg.get("eos_token")) or ""
        self.eos_token_id = self._enc.token_to_id(self.eos_token) if self.eos_token else None
        if self.eos_token_id is None:
            raise UserError(f"{cfg_path}: names no eos_token known to {folder / 'tokenizer.json'}")
        pad = text(cfg.get("pad_token"))
        self.pad_token_id = self._enc.token_to_id(pad) if pad else self.eos_token_id

    def __call__(self, text: str | list[str], add_special_tokens: bool = False) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": self._enc.encode(text, add_special_tokens=add_special_tokens).ids}
        return {"input_ids": [e.ids for e in self._enc.encode_batch(text, add_special_tokens=add_special_tokens)]}
