"""Next-word suggestions, as a keyboard shows them: three distinct whole words.

A BPE model predicts sub-word tokens (" to", " y" + "ond" + "er"), so a word is a token that starts
a word (leading space, then letters) followed by continuation tokens (no leading space, letters),
and it ends where the model's next token is not a continuation. Its probability is

    P(word) = P(start) * P(cont_1 | ..) * ... * P(next token is not a continuation | word)

`suggest` returns the k most probable distinct words, found best-first:

    1. feed the text before the word being typed (a prompt ending without a space: the word being
       typed is completed; with a trailing space: the next word is predicted); the frontier is
       every word-start token agreeing with the typed part, scored by its log-probability;
    2. while the best entry is a finished word, emit it (if new, case-insensitively). Otherwise pop
       the best WIDTH unfinished entries (up to the first finished one); one batched decode step
       (`Session.feed_rows`) gives each its next-token distribution: push "the word ends here"
       (log P(end)), if the word already covers the typed part, and its best continuation tokens
       that agree with it;
    3. until k words, or MAX_STEPS decode steps; then the best finished words left are emitted,
       and so are single word-start tokens (whole vocabulary words) whose end was not checked.

Two rules keep junk out: a continuation token that the model finds less likely than the same
letters as a new word (" window" vs "window" after "yonder") would glue two words together, and is
not pushed; and a word the model more likely ends than continues is not extended ("yonder" +
"haus"): a longer real word has its own, better path. The typed letters
are kept as typed ("pr" -> "prince", not "Prince").

Since scores only fall as a word grows, words come out most probable first, and a word the model
finds unlikely (a junk expansion such as "YONDAKE") loses to real ones. Expanding WIDTH entries at
once changes none of that (a finished word is emitted only when it is the best entry left, and an
expansion only pushes entries that cost more than it), so, steps allowing, the words are those of
one expansion at a time; it only spends a step's weight reads on three branches instead of one:
after a new word, the end-of-word checks of the three best words are one step, not three. The prefix runs once and stays
in the KV cache (`Session`), so a keyboard re-asking after each keystroke pays only for the new
tokens, and branches share their common prefix.
"""

from __future__ import annotations

import heapq

import numpy as np

from pocketfed.runtime.model import LoadedModel, Session

POOL = 32  # word-start candidates put on the frontier, by logit
BRANCH = 4  # continuation tokens pushed per expansion
WIDTH = 3  # entries expanded per decode step (one batched step: the session's rows)
MAX_STEPS = 4  # decode steps per call, at most
MAX_WORD_TOKENS = 4
MAX_CONTEXT = 256  # tokens of text before the word kept in the cache
SUGGEST_CACHE = MAX_CONTEXT + MAX_WORD_TOKENS + 2  # KV cache positions a suggest session needs


class _Vocab:
    """Per-token word facts, computed once per model from the decoded vocabulary."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.starts = np.array([_is_word_start(t) for t in texts])  # [vocab] bool
        self.continues = np.array([_is_continuation(t) for t in texts])  # [vocab] bool
        # [vocab] str, "" for tokens that are not words: as <U25 for SmolLM2 instead of <U80 (its longest
        # token), 5 MB instead of 16 MB of a keyboard's resident memory
        wordish = self.starts | self.continues
        self.lower = np.array([t.strip().lower() if w else "" for t, w in zip(texts, wordish)])
        ids = {t: i for i, t in enumerate(texts)}
        # [vocab] id of " " + text (the same letters as a new word), or -1
        self.spaced = np.array([ids.get(" " + t, -1) if c else -1 for t, c in zip(texts, self.continues)])
        # what each decode step reads, indexed once here (a step's numpy work: ~0.5 ms less than masks)
        self.enders = np.flatnonzero(~self.continues)  # tokens after which a word has ended
        self.cont_ids = np.flatnonzero(self.continues)  # continuation tokens
        self.cont_spaced = self.spaced[self.cont_ids]  # their spaced twins, or -1
        self._order = np.argsort(self.lower, kind="stable")  # for `agreeing`: binary search, not a scan
        self._sorted = self.lower[self._order]

    def agreeing(self, typed: str) -> np.ndarray:
        """[vocab] bool: the token's word (lowercase) extends `typed`, or is a prefix of it. By binary
        search in the sorted words: a keystroke's ~3 ms of string scans over the vocabulary become ~0.1."""
        out = np.zeros(len(self.lower), dtype=bool)
        bounds = [(typed, typed + "\U0010ffff")] + [(typed[:i], typed[:i]) for i in range(1, len(typed))]
        for low, high in bounds:  # words in [low, high]: extensions of typed, then each shorter prefix exactly
            lo = np.searchsorted(self._sorted, low, side="left")
            hi = np.searchsorted(self._sorted, high, side="right")
            out[self._order[lo:hi]] = True
        return out


def _wordish(s: str) -> bool:
    return bool(s) and all(c.isalpha() or c in "'’-" for c in s)


def _is_word_start(text: str) -> bool:
    return text.startswith(" ") and len(text) > 1 and text[1].isalpha() and _wordish(text[1:])


def _is_continuation(text: str) -> bool:
    return not text[:1].isspace() and _wordish(text) and text[0] not in "-"


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
        session = Session(model, max_length=SUGGEST_CACHE, rows=WIDTH)
        model._suggest_session = session  # type: ignore[attr-defined]

    context, typed = _split(prefix)
    typed_lower = typed.lower()
    ctx = model.encode(context)[-MAX_CONTEXT:] if context else [int(model.eos_ids[0])]

    # 1. the frontier: word-start tokens that agree with what is typed, by log-probability
    logp = _log_softmax(session.feed(ctx))
    mask = vocab.starts.copy()
    if typed:
        mask &= vocab.agreeing(typed_lower)
    starts = _top(np.flatnonzero(mask), logp, POOL)
    # entries: (-log P, tie-break, token ids, word, finished)
    frontier: list[tuple[float, int, tuple[int, ...], str, bool]] = [
        (-float(logp[t]), i, (int(t),), vocab.texts[int(t)].strip(), False) for i, t in enumerate(starts)
    ]
    heapq.heapify(frontier)
    tie = len(frontier)

    # 2. + 3. best first: emit finished words, expand unfinished ones by one decode step
    words: list[str] = []
    seen: set[str] = set()
    steps = 0
    feed_rows = getattr(session, "feed_rows", None) or (lambda seqs: [session.feed(s) for s in seqs])
    while frontier and len(words) < k:
        if frontier[0][4]:  # the best entry is a finished word: emit it (if new)
            word = typed + frontier[0][3][len(typed):]  # keep the letters as the user typed them
            heapq.heappop(frontier)
            if word.lower() not in seen:
                seen.add(word.lower())
                words.append(word)
            continue
        if steps == MAX_STEPS:
            # out of budget: a word-start token that covers the typed part is a whole vocabulary
            # word; emit it as it is (its end probability unknown, <= 1); drop longer partial words
            cost, _, seq, word, _ = heapq.heappop(frontier)
            if len(seq) == 1 and _covers(word, typed_lower):
                heapq.heappush(frontier, (cost, tie, seq, word, True))
                tie += 1
            continue
        # the best WIDTH unfinished entries, up to the first finished one, expanded in one step
        batch = []
        while frontier and len(batch) < WIDTH and not frontier[0][4]:
            batch.append(heapq.heappop(frontier))
        steps += 1
        for (cost, _, seq, word, _), logits in zip(batch, feed_rows([ctx + list(seq) for _, _, seq, _, _ in batch])):
            nxt = _log_softmax(logits)
            p_end = float(np.exp(nxt[vocab.enders]).sum())
            covers = _covers(word, typed_lower)
            if covers:
                heapq.heappush(frontier, (cost - np.log(max(p_end, 1e-30)), tie, seq, word, True))
                tie += 1
            if len(seq) == MAX_WORD_TOKENS or (p_end > 0.5 and covers):
                continue
            cont, twin = vocab.cont_ids, vocab.cont_spaced
            if len(word) < len(typed):  # still inside the typed part: only agreeing tokens
                keep = vocab.agreeing(typed_lower[len(word):])[cont]
                cont, twin = cont[keep], twin[keep]
            # a continuation the model likes less than the same letters as a new word glues two words
            # together ("yonder" + "window"): not a word
            cont = cont[(twin < 0) | (nxt[np.maximum(twin, 0)] <= nxt[cont])]
            for t in _top(cont, nxt, BRANCH):
                heapq.heappush(frontier, (cost - float(nxt[t]), tie, seq + (int(t),), word + vocab.texts[int(t)], False))
                tie += 1
    return words


def _covers(word: str, typed_lower: str) -> bool:
    """The word holds at least the typed letters, and agrees with them."""
    return len(word) >= len(typed_lower) and word.lower().startswith(typed_lower)


def _top(ids: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """The k of `ids` with the highest `score`, best first (ties: lower position in ids first)."""
    if len(ids) > k:
        ids = ids[np.argpartition(-score[ids], k - 1)[:k]]
        ids = np.sort(ids)  # positions in ids are ascending token ids: ties keep that order below
    return ids[np.argsort(-score[ids], kind="stable")]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))
