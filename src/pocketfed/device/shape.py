"""The shape of a Llama-shaped decoder, read from its config: what the planner sizes and the lean
device model builds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pocketfed.errors import UserError


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a Llama-shaped decoder's config."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @staticmethod
    def from_config(config: Any) -> "ModelShape":
        try:
            heads = int(config.num_attention_heads)
            return ModelShape(
                vocab=int(config.vocab_size), hidden=int(config.hidden_size),
                intermediate=int(config.intermediate_size), layers=int(config.num_hidden_layers),
                heads=heads, kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
                tied=bool(getattr(config, "tie_word_embeddings", False)),
            )
        except AttributeError as e:
            raise UserError(f"the planner understands Llama-shaped decoders; this config lacks {e.name!r}") from None

    @staticmethod
    def from_folder(folder: Path) -> "ModelShape":
        """The shape from the folder's config.json alone (no transformers, no weights)."""
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"could not read {folder / 'config.json'}: {e}") from None
        return ModelShape.from_config(SimpleNamespace(**config))

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:  # decoder linears, all layers
        return self.layers * sum(a * b for a, b in self.module_dims().values())

    @property
    def other_params(self) -> int:  # embeddings, head (if untied), norms
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.hidden * (2 * self.layers + 1)

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def adapted(self, layers: int = 0) -> int:
        """How many decoder layers carry LoRA when `lora.layers` is `layers` (0 = all)."""
        return self.layers if layers <= 0 else min(layers, self.layers)

    def lora_params(self, rank: int, targets: list[str], layers: int = 0) -> int:
        dims = self.module_dims()
        return self.adapted(layers) * sum(rank * (dims[t][0] + dims[t][1]) for t in targets)

    def flops_per_token(self, checkpointing: bool, layers: int = 0) -> float:
        """Training FLOPs per token with a frozen base and LoRA on the top `layers` (0 = all):
        forward 2N over the whole model; backward through activations 2N_a (no weight gradients),
        where N_a counts the head and the adapted layers only (back-propagation stops below them,
        `pocketfed.model.depth`); plus 2N_a for the recomputed forward under checkpointing (the
        frozen layers below run once, outside checkpointing). With all layers adapted N_a = N."""
        per_layer = self.linear_params // self.layers
        head = self.vocab * self.hidden  # the head is a matmul; embeddings a lookup
        n = self.layers * per_layer + head
        n_a = self.adapted(layers) * per_layer + head
        return 2.0 * n + (4.0 if checkpointing else 2.0) * n_a
