"""Stream a greedy continuation of a prompt, token by token."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pocketfed.errors import UserError
from pocketfed.runtime.model import LoadedModel, Session


def generate(model: LoadedModel, prompt: str, max_tokens: int = 64) -> Iterator[str]:
    """Yield the text of each new token (greedy), stopping at EOS or after `max_tokens`."""
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    ids = model.encode(prompt) or [int(model.eos_ids[0])]
    if len(ids) + max_tokens > model.context_length:
        raise UserError(
            f"the prompt ({len(ids)} tokens) plus --max-tokens {max_tokens} exceed the model's "
            f"{model.context_length}-token context"
        )
    session = Session(model, max_length=len(ids) + max_tokens + 1)
    from tokenizers.decoders import DecodeStream  # noqa: PLC0415 (with the model's tokenizer)

    stream = DecodeStream(skip_special_tokens=True)  # text per token, holding back split UTF-8 characters
    logits = session.feed(ids)
    for step in range(max_tokens):
        nxt = int(np.argmax(logits))
        if nxt in model.eos_ids:
            return
        text = stream.step(model.tokenizer, nxt)
        if text:
            yield text
        ids.append(nxt)
        if step + 1 < max_tokens:
            logits = session.feed(ids)
