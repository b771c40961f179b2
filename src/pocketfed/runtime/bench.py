"""Measure an exported model on this device: decode speed, time to first token, suggest latency,
peak memory, size on disk. Used by `pocketfed bench-runtime` and bench/bench_runtime.py (which runs
it in a fresh subprocess per model, so peak RSS is that model's alone).

Definitions (greedy, batch 1, threads and spinning as `runtime.load` chooses or as given):
- decode_tok_s@C: 1 / the median time of DECODE_TOKENS single-token steps after a C-token context
  is cached (the median: one step that a neighbour's burst delays does not move it);
- ttft_ms: a new KV cache + a 64-token prompt until the first token's logits, in ms (median of 3);
- suggest_p50_ms / p95: `suggest` on the prefixes a user typing TYPED_TEXT word by word would
  produce (the cache keeps the shared prefix, as on a keyboard), after one warm-up call;
- peak_rss_mb: VmHWM of this process (peak resident set); size_mb: the export folder's files.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pocketfed.memory import peak_rss_mb
from pocketfed.runtime.model import LoadedModel, Session, load
from pocketfed.runtime.suggest import SUGGEST_CACHE, WIDTH, suggest

DECODE_TOKENS = 64
TYPED_TEXT = (
    "I will be home in a minute and then we can talk about the plans for the weekend if you want "
    "to come over to my place for dinner with the family tonight or tomorrow"
)
FILLER = (
    "The quick brown fox jumps over the lazy dog while the morning sun rises slowly above the quiet "
    "village, and the people begin another ordinary day of work, talk and small kindnesses. "
)


def context_ids(model: LoadedModel, n: int) -> list[int]:
    """n token ids of ordinary English text (FILLER repeated)."""
    ids: list[int] = []
    while len(ids) < n:
        ids += model.encode(FILLER)
    return ids[:n]


SessionFactory = Callable[[int], Any]  # max_length -> an object with feed(ids) -> logits, like Session


def _sessions(model: LoadedModel, new_session: SessionFactory | None) -> SessionFactory:
    return new_session or (lambda n: Session(model, max_length=n))


def decode_tok_s(model: LoadedModel, context: int, steps: int = DECODE_TOKENS,
                 new_session: SessionFactory | None = None) -> float:
    ids = context_ids(model, context)
    session = _sessions(model, new_session)(context + steps + 2)
    logits = session.feed(ids)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        ids.append(int(np.argmax(logits)))
        logits = session.feed(ids)
        times.append(time.perf_counter() - start)
    return 1 / statistics.median(times)


def ttft_ms(model: LoadedModel, prompt_tokens: int = 64, repeats: int = 3,
            new_session: SessionFactory | None = None) -> float:
    ids = context_ids(model, prompt_tokens)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session = _sessions(model, new_session)(prompt_tokens + 65)
        int(np.argmax(session.feed(ids)))
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def suggest_latencies_ms(model: LoadedModel, new_session: SessionFactory | None = None) -> list[float]:
    words = TYPED_TEXT.split()
    session = new_session(SUGGEST_CACHE) if new_session else Session(model, SUGGEST_CACHE, rows=WIDTH)
    suggest(model, words[0] + " ", session=session)  # warm-up: builds the vocabulary tables
    times = []
    for i in range(2, len(words) + 1):
        prefix = " ".join(words[:i]) + " "
        start = time.perf_counter()
        suggest(model, prefix, session=session)
        times.append((time.perf_counter() - start) * 1000)
    return times


def perplexity(model: LoadedModel, text: str, tokens: int = 2000, window: int = 500,
               new_session: SessionFactory | None = None) -> float:
    """exp(mean NLL) of `text`'s first `tokens` tokens, in independent windows of `window` tokens
    (each window's first token is context only), one decode step per token through the KV cache."""
    return perplexity_ids(model, model.encode(text)[:tokens], window, new_session)


def perplexity_ids(model: Any, ids: list[int], window: int = 500, new_session: SessionFactory | None = None) -> float:
    """perplexity() over given token ids."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        session = _sessions(model, new_session)(len(chunk) + 2)
        for i in range(1, len(chunk)):
            logits = session.feed(chunk[:i]).astype(np.float64)
            m = logits.max()
            nll += m + np.log(np.exp(logits - m).sum()) - logits[chunk[i]]
            count += 1
    return float(np.exp(nll / count))


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def measure(model_dir: str | Path, contexts: tuple[int, ...] = (128, 1024), threads: int | None = None,
            spin: bool | None = None) -> dict[str, Any]:
    model = load(model_dir, threads, spin)
    row: dict[str, Any] = {"format": model.manifest["format"], "threads": model.threads, "spinning": model.spin}
    row |= measure_model(model, contexts)
    row["size_mb"] = round(folder_mb(Path(model_dir)), 1)
    return row


def measure_model(model: Any, contexts: tuple[int, ...] = (128, 1024),
                  new_session: SessionFactory | None = None) -> dict[str, Any]:
    """Speed and memory of any model with encode/token_text/eos_ids and a Session-like factory."""
    row: dict[str, Any] = {}
    for c in contexts:
        row[f"decode_tok_s@{c}"] = round(decode_tok_s(model, c, new_session=new_session), 1)
    row["ttft_ms"] = round(ttft_ms(model, new_session=new_session), 1)
    lat = sorted(suggest_latencies_ms(model, new_session=new_session))
    row["suggest_p50_ms"] = round(float(np.percentile(lat, 50)), 1)
    row["suggest_p95_ms"] = round(float(np.percentile(lat, 95)), 1)
    row["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return row


