"""Which decoder layers carry LoRA: all of them, or the top L (sparse back-propagation).

With LoRA on the top L of n layers only, nothing below layer n - L has a trainable weight, so
back-propagation can stop at layer n - L: the frozen layers beneath it run forward once, keep no
activations and cost no backward FLOPs. PockEngine (Zhu et al., "PockEngine: Sparse and Efficient
Fine-tuning in a Pocket", MICRO 2023) prunes the backward graph of on-device fine-tuning this way.
The maths of the adapted layers is unchanged: their gradients equal full-depth training's for the
same adapter (a test pins it).

    adapted_layers(L, n) = [n - L, ..., n - 1]    (L = 0 or L >= n: all n layers)

Every party learns the adapted layers from the adapter itself: its PEFT names carry the layer
index (`base_model.model.model.layers.29.self_attn.q_proj.lora_A.weight`), so the wire schema, the
codec, secure aggregation and the release merge follow from the names (`layers_of`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pocketfed.errors import UserError

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def adapted_layers(layers: int, num_layers: int) -> list[int]:
    """The indices of the layers that carry LoRA: the top `layers` of `num_layers` (0 = all)."""
    if layers < 0:
        raise UserError(f"lora.layers must be 0 (all layers) or positive, got {layers}")
    if layers > num_layers:
        raise UserError(f"lora.layers = {layers} exceeds the model's {num_layers} layers; "
                        f"use 0 (all layers) or a number from 1 to {num_layers}")
    return list(range(num_layers - layers if layers else 0, num_layers))


def layers_of(names: Iterable[str]) -> list[int]:
    """The sorted layer indices that adapter tensor names (PEFT keys) refer to."""
    return sorted({int(m.group(1)) for n in names if (m := _LAYER.search(n))})
