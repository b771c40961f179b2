"""Next-word suggestions, as a keyboard shows them: three distinct whole words.

A BPE model predicts sub-word tokens (" to", " tom" + "orrow"), so a word is a token that starts a
word (leading space, then letters) followed by continuation tokens (no leading space, letters):

    1. feed the text before the word being typed; take the POOL most likely word-start tokens
       (those matching the typed part of the word, if any);
    2. expand each, best first, greedily: append the most likely next token while it continues the
       word (up to MAX_WORD_TOKENS tokens); while the word is shorter than the typed part, only
       tokens that agree with it are allowed;
    3. keep the words that extend the typed part, case-insensitively distinct, until there are k.

Step 2 costs one decode step per candidate (to learn where the word ends); the prefix itself runs
once and stays in the KV cache (`Session`), so a keyboard re-asking after each keystroke pays only
for the new tokens. Candidates are expanded until k distinct words are found, at most MAX_EXPAND.
"""

from __future__ import annotations

import numpy as np

from pocketfed.runtime.model import LoadedModel, Session

POOL = 32  # word-start candidates considered, by logit
MAX_EXPAND = 8  # candidates expanded at most (each costs >= 1 decode step)
MAX_WORD_TOKENS = 4
MAX_CONTEXT = 256  # tokens of text before the word kept in the cache
SUGGEST_CACHE = MAX_CONTEXT + MAX_WORD_TOKENS + 2  # KV cache positions a suggest session needs


class _Vocab:
    """Per-token word facts, computed once per model from the decoded vocabulary."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.starts = np.array([_is_word_start(t) for t in texts])  # [vocab] bool
        self.continues = np.array([_is_continuation(t) for t in texts])  # [vocab] bool
        self.lower = np.array([t.strip().lower() for t in texts])  # [vocab] str


def _wordish(s: str) -> bool:
    return bool(s) and all(c.isalpha() or c in "'’-" for c in s)


def _is_word_start(text: str) -> bool:
    return text.startswith(" ") and len(text) > 1 and text[1].isalpha() and _wordish(text[1:])


def _is_continuation(text: str) -> bool:
    return not text[:1].isspace() and _wordish(text) and text[0] not in "-"


def _agrees(word: np.ndarray, typed: str) -> np.ndarray:
    """word[i] extends `typed`, or is a prefix of it (elementwise, lowercase)."""
    prefixes = [typed[:i] for i in range(1, len(typed) + 1)]
    return np.char.startswith(word, typed) | np.isin(word, prefixes)


def _split(prefix: str) -> tuple[str, str]:
    """'To be or not to b' -> ('To be or not to', 'b');  'To be or ' -> ('To be or', '')."""
    if not prefix or prefix[-1].isspace():
        return prefix.rstrip(), ""
    cut = len(prefix)
    while cut > 0 and not prefix[cut - 1].isspace():
        cut -= 1
    return prefix[:cut].rstrip(), prefix[cut:]


def suggest(model: LoadedModel, prefix: str, k: int = 3, session: Session | None = None) -> list[str]:
    """Up to `k` distinct next words (or completions of the word being typed), most likely first.

    `session` (default: one kept on the model) holds the KV cache reused across calls."""
    vocab: _Vocab | None = getattr(model, "_suggest_vocab", None)
    if vocab is None:
        vocab = _Vocab(model.token_text())
        model._suggest_vocab = vocab  # type: ignore[attr-defined]
    if session is None:
        session = getattr(model, "_suggest_session", None)
    if session is None:
        session = Session(model, max_length=SUGGEST_CACHE)
        model._suggest_session = session  # type: ignore[attr-defined]

    context, typed = _split(prefix)
    typed_lower = typed.lower()
    ctx = model.encode(context)[-MAX_CONTEXT:] if context else [int(model.eos_ids[0])]

    # 1. candidates: word-start tokens that agree with what is typed, best first
    logits = session.feed(ctx)
    mask = vocab.starts.copy()
    if typed:
        mask[mask] = _agrees(vocab.lower[mask], typed_lower)
    scores = np.where(mask, logits, -np.inf)
    pool = np.argpartition(-scores, POOL)[:POOL]
    pool = pool[np.argsort(-scores[pool])]
    pool = pool[np.isfinite(scores[pool])]

    # 2. + 3. expand greedily to a word boundary; keep distinct words that extend the typed part
    words: list[str] = []
    seen: set[str] = set()
    for cand in pool[:MAX_EXPAND]:
        seq = [int(cand)]
        word = vocab.texts[int(cand)].strip()
        for _ in range(MAX_WORD_TOKENS - 1):
            logits = session.feed(ctx + seq)
            if len(word) < len(typed):  # still inside the typed part: only agreeing tokens
                allowed = vocab.continues.copy()
                allowed[allowed] = _agrees(vocab.lower[allowed], typed_lower[len(word):])
                nxt = int(np.argmax(np.where(allowed, logits, -np.inf)))
                if not allowed[nxt]:
                    break
            else:
                nxt = int(np.argmax(logits))
                if not vocab.continues[nxt]:
                    break
            seq.append(nxt)
            word += vocab.texts[nxt]
        key = word.lower()
        if key.startswith(typed_lower) and key not in seen:
            seen.add(key)
            words.append(word)
            if len(words) == k:
                break
    return words
