"""Load an exported model folder and run it with ONNX Runtime GenAI.

This package is what a phone ships: it imports nothing from pocketfed's training code, only the
standard library, numpy, onnxruntime-genai and `pocketfed.errors`.

Runtime settings, chosen by measurement (SmolLM2-135M + LoRA, int4 block 32 accuracy level 4,
prune_lm_head; this 2-core x86 box shared with other jobs, load average ~4; each configuration in
its own process, two interleaved rounds; decode tok/s at 128 / 1,024 tokens of context):

- threads and spinning by measurement of the CPU at load time: `load` samples /proc/stat for 0.1 s
  (the other processes' CPU use) and runs as many threads as there are free cores (at most 2), the
  worker threads spinning between parallel sections (fast wake-up; ORT's default) when there are
  two. Measured on this 2-core box (onnx-int4 + runs/demo's adapter, with huge pages, decode tok/s
  at 128 / 1,024 context and suggest p95, medians of 3 interleaved runs, each in its own process):
                                  idle CPU              one other core busy
      1 thread                    ~143 / ~94            138 / 97, 33 ms
      2 threads, sleeping                               124 / 93, 37 ms
      2 threads, spinning         195 / 138, 25 ms      63 / 49 (measured before huge pages)
  Spinning wins by 35% on an idle CPU and loses by half when another process wants a core, where a
  second, sleeping thread is slower than none (a futex wake-up per MatMul). `threads` / `spin`
  (the CLI's --threads, --spin/--no-spin) override the choice.
- graph_optimization_level = ORT_ENABLE_ALL (the GenAI default; the builder's graph is already fused).
- enable_cpu_mem_arena stays on: off cost +100 MB peak RSS (376 vs 276 MB) for no speed gain.
- past_present_share_buffer = true: the KV cache is one buffer of max_length positions updated in
  place, so decode does not copy the cache each step. Its size is fixed when a Generator is made,
  so we size it per request (prompt + max_tokens) instead of the model's 8k context, which would
  cost 30 layers x 2 x 3 heads x 8192 x 64 x 4 B = 377 MB of RSS.
- prefill in chunks of PREFILL_CHUNK = 64 tokens: ORT's arena keeps the peak of the largest step, so
  a 1,024-token prompt in one step left ~100 MB more resident than in 64-token steps (onnx-int4,
  peak RSS at 1,024 context: 360 MB in one step, 313 in 256-token chunks, 306 in 128, 290 in 64
  with the separate embedding table), at no cost in prefill time (2.88 s vs 2.73 s).
- after loading, the pages of model.onnx.data that loading left mapped are given back
  (`pocketfed.memory.release_mapped_file`): peak RSS at 1,024 context 292 -> 264 MB.
- huge pages (`pocketfed.memory.advise_huge_pages`), after loading for the prepacked weights and
  after each Session's generator for its KV cache buffer. Decode is not bandwidth-bound here (it
  reads ~100 MB a token at ~15 GB/s; one core streams 38 GB/s) but TLB-bound: every 4 kB of weights
  and cache is another page walk. Measured idle, 2 spinning threads, 3 interleaved runs each in its
  own process (medians): decode 180.6 -> 194.5 tok/s at 128 tokens of context, 122.2 -> 137.5 at
  1,024, suggest p95 27.8 -> 25.2 ms, peak RSS 270 MB both. It costs 0.01-0.1 s at load and about
  1.5 ms per MB of KV cache when a Session starts (24 ms for suggest's, 75 ms for 1,100 positions).
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 does the same for a whole process, but only if set before it
  starts; for torch training it measured no gain (device.fit, phone and watch plans).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pocketfed.errors import UserError
from pocketfed.memory import advise_huge_pages, release_mapped_file

MAX_THREADS = 2  # measured on 2 cores only; more threads for a 135M model are untested
SPIN_SAMPLE_S = 0.1
GRAPH_OPTIMIZATION = "ORT_ENABLE_ALL"
SHARE_KV_BUFFER = True
PREFILL_CHUNK = 64

ONNX_FORMATS = ("onnx-fp32", "onnx-int8", "onnx-int4")


@dataclass
class LoadedModel:
    """An exported model ready to run: the GenAI model, its tokenizer, and the manifest."""

    folder: Path
    manifest: dict[str, Any]
    og_model: Any  # onnxruntime_genai.Model
    tokenizer: Any  # onnxruntime_genai.Tokenizer
    context_length: int
    eos_ids: tuple[int, ...]
    threads: int = 1
    spin: bool = False
    _token_text: list[str] | None = None

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(np.asarray(ids, dtype=np.int32)))

    def token_text(self) -> list[str]:
        """Text of every vocabulary id, decoded once (about 0.15 s for 49k tokens)."""
        if self._token_text is None:
            self._token_text = [str(self.tokenizer.decode([i])) for i in range(self.vocab_size)]
        return self._token_text

    @property
    def vocab_size(self) -> int:
        return int(self.genai_config["model"]["vocab_size"])

    @property
    def genai_config(self) -> dict[str, Any]:
        return json.loads((self.folder / "genai_config.json").read_text())


def read_manifest(model_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    folder = Path(model_dir).expanduser()
    path = folder / "manifest.json"
    if not folder.is_dir():
        raise UserError(f"model folder {str(folder)!r} does not exist; give the --out folder of `pocketfed export`")
    if not path.is_file():
        raise UserError(f"model folder {str(folder)!r} has no manifest.json; is it an export of `pocketfed export`?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{str(path)!r} is not valid JSON; export the model again") from None
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise UserError(f"{str(path)!r} lacks the 'format' field; export the model again")
    return folder, manifest


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def other_cpu_load(sample_s: float = SPIN_SAMPLE_S) -> float | None:
    """CPUs' worth of time other processes used over `sample_s` seconds (None where /proc/stat is
    missing). Used to decide whether spinning worker threads would compete with someone."""

    def busy_idle() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, idle

    try:
        b0, i0 = busy_idle()
        own0 = sum(os.times()[:2])
        time.sleep(sample_s)
        b1, i1 = busy_idle()
        own1 = sum(os.times()[:2])
    except (OSError, ValueError, IndexError):
        return None
    total = (b1 - b0) + (i1 - i0)
    if total <= 0:
        return None
    cpus = os.cpu_count() or 1
    return max(0.0, cpus * (b1 - b0) / total - (own1 - own0) / sample_s)


def choose_settings(threads: int | None = None, spin: bool | None = None) -> tuple[int, bool]:
    """(threads, spin): given values are kept; missing ones are chosen as measured (module docstring):
    as many threads as there are free cores (at least one, at most MAX_THREADS), spinning when there
    is more than one; with no load figure (no /proc/stat), MAX_THREADS sleeping threads."""
    others = None
    if threads is None:
        threads = min(MAX_THREADS, usable_cpus())
        others = other_cpu_load() if threads > 1 else None
        if others is not None:
            threads = max(1, min(threads, int(usable_cpus() + 0.25 - others)))
    elif threads < 1:
        raise UserError(f"threads must be at least 1, not {threads}")
    elif spin is None and threads > 1:
        others = other_cpu_load()
    if spin is None:
        spin = others is not None and others + threads <= usable_cpus() + 0.25
    return threads, bool(spin and threads > 1)


def load(model_dir: str | Path, threads: int | None = None, spin: bool | None = None) -> LoadedModel:
    """Open an onnx-* export (reads manifest.json, checks the files it lists, loads the session).

    threads / spin: ORT's intra-op threads and whether they spin; None chooses (`choose_settings`)."""
    threads, spin = choose_settings(threads, spin)
    import onnxruntime_genai as og  # noqa: PLC0415  (heavy; only when a model is opened)

    folder, manifest = read_manifest(model_dir)
    fmt = manifest["format"]
    if fmt not in ONNX_FORMATS:
        raise UserError(
            f"{str(folder)!r} holds a {fmt!r} export, which runs in llama.cpp; "
            f"this runtime runs {', '.join(ONNX_FORMATS)} exports"
        )
    for name, size in dict(manifest.get("files", {})).items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != int(size):
            raise UserError(f"model file {str(p)!r} is missing or has the wrong size; export the model again")
    try:
        config = og.Config(str(folder))
        options: dict[str, Any] = {
            "intra_op_num_threads": threads,
            "inter_op_num_threads": 1,
            "graph_optimization_level": GRAPH_OPTIMIZATION,
            "session.intra_op.allow_spinning": "1" if spin else "0",
        }
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        og_model = og.Model(config)
        tokenizer = og.Tokenizer(og_model)
    except Exception as e:  # onnxruntime-genai raises plain RuntimeError/Exception for corrupt files
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"the model in {str(folder)!r} could not be loaded (corrupt file?): {first}") from None
    release_mapped_file(folder / "model.onnx.data")  # what loading left resident (see there)
    advise_huge_pages()  # the prepacked weights (see the module docstring)
    genai = json.loads((folder / "genai_config.json").read_text())["model"]
    eos = genai.get("eos_token_id", [])
    eos_ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
    return LoadedModel(
        folder=folder,
        manifest=manifest,
        og_model=og_model,
        tokenizer=tokenizer,
        context_length=int(genai.get("context_length", 2048)),
        eos_ids=eos_ids,
        threads=threads,
        spin=spin,
    )


class Session:
    """One KV cache over a growing token sequence, reused across calls that share a prefix.

    `feed(ids)` makes the cache hold exactly `ids` and returns the logits after the last one:
    it rewinds to the longest common prefix with what the cache holds and runs only the rest,
    so a keyboard that re-asks after each keystroke pays for the new tokens only. The logits of the
    last REMEMBERED sequences fed are kept (200 kB each for SmolLM2): asking for one again runs
    nothing (the cache is brought to `ids` by the next feed that runs). A keyboard asks again for the
    same text before the word being typed at each keystroke, and for "text + a word it suggested,
    checked for whether the word ends there" when the user takes that word.
    """

    REMEMBERED = 8

    def __init__(self, model: LoadedModel, max_length: int) -> None:
        import onnxruntime_genai as og  # noqa: PLC0415

        self.model = model
        self.max_length = min(int(max_length), model.context_length)
        params = og.GeneratorParams(model.og_model)
        params.set_search_options(max_length=self.max_length, do_sample=False,
                                  past_present_share_buffer=SHARE_KV_BUFFER)
        self.generator = og.Generator(model.og_model, params)
        advise_huge_pages()  # the KV cache buffer the generator just made (see the module docstring)
        self.tokens: list[int] = []  # what the KV cache holds
        self.steps = 0  # tokens run through the model (for tests and benchmarks)
        self._logits: dict[tuple[int, ...], np.ndarray] = {}  # last fed sequences -> their logits, oldest first

    def feed(self, ids: list[int]) -> np.ndarray:
        """Cache := ids (now or at the next feed that runs); returns next-token logits [vocab] (float32)."""
        if not ids:
            raise ValueError("feed needs at least one token")
        if len(ids) >= self.max_length:
            raise ValueError(f"{len(ids)} tokens do not fit a {self.max_length}-token cache")
        key = tuple(ids)
        known = self._logits.pop(key, None)
        if known is not None:
            self._logits[key] = known  # now the most recent
            return known
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # always run at least one token to get logits
        if common < len(self.tokens):
            self.generator.rewind_to(common)
        new = np.asarray(ids[common:], dtype=np.int32)
        for start in range(0, len(new), PREFILL_CHUNK):
            self.generator.append_tokens(new[start:start + PREFILL_CHUNK])
        self.steps += len(ids) - common
        self.tokens = list(ids)
        logits = np.asarray(self.generator.get_logits(), dtype=np.float32).reshape(-1)
        logits.flags.writeable = False  # handed out again from the memo
        self._logits[key] = logits
        if len(self._logits) > self.REMEMBERED:
            del self._logits[next(iter(self._logits))]
        return logits
