"""Issue 17, item 5: decoding and suggestions on SmolLM2-135M, our onnx-int4 against llama.cpp, in the
same run, on an idle CPU and with one core busy.

Runtimes, each in its own process (a fresh process per measurement: peak RSS is that runtime's own):
- onnx-int4: runs/demo's adapter exported by `pocketfed export --format onnx-int4`, with the threads
  and spinning `runtime.load` chooses at start-up (as a device does: it samples the CPU for 0.1 s);
- llama.cpp (llama-cpp-python 0.3.36, `pip install '.[llama]'`): our gguf-q4_0 export of the same run,
  and the shipped Q4_1 base file (no adapter), each at 1 and at 2 threads; the peer's figure is its
  best thread count for that condition and metric (llama-cpp-python's own default is cpu_count // 2).

Conditions: `idle`; `one core busy` (a `while True: pass` process beside the runtime, as a phone
always runs other apps). The cases run interleaved, REPS times (BENCH_DECODE_REPS, default 3), so the
machine's noise hits them alike; the table gives medians. Metrics as `pocketfed.runtime.bench` defines
them (decode tok/s at 128 and 1,024 tokens of context, suggestion p50/p95 while typing a sentence), the
same code driving both runtimes: llama.cpp runs suggest through a Session with the same `feed` /
`feed_rows` contract (a KV cache cut back to the shared prefix, only new tokens run; up to 3
branches of a shared prefix in one batched step, which suggest uses for its 3 best entries), built
on llama.cpp's C API as ours is on onnxruntime: sequence ids in one unified KV cache. Ratio rows: onnx-int4 over the best
llama.cpp (decode: higher is better; suggest: llama.cpp's time over ours, so > 1 means we are faster).
Issue 17's goals: >= 1.3x llama.cpp idle, >= 1.0x loaded, >= 120 tok/s at 1,024 context idle, suggest
p95 <= 20 ms idle.

Run alone: `.venv/bin/python bench/bench_decode.py`; `run()` returns rows for bench/run.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

DEMO_RUN = "runs/demo"
REPS = int(os.environ.get("BENCH_DECODE_REPS", "3"))
CONDITIONS = ("idle", "one core busy")
METRICS = ("decode_tok_s@128", "decode_tok_s@1024", "suggest_p50_ms", "suggest_p95_ms")
LLAMA_CTX = 1100  # positions: the 1,024-token context plus the decoded tokens
LLAMA_BATCH = 512  # tokens per llama_decode while prefilling


# ---- llama.cpp under pocketfed.runtime.bench's contracts --------------------------------------


class _LlamaModel:
    """Duck-types pocketfed.runtime.LoadedModel (encode, token_text, eos_ids) for suggest."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.eos_ids = (int(llm.token_eos()),)
        self._texts: list[str] | None = None

    def encode(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=False))

    def token_text(self) -> list[str]:
        if self._texts is None:
            self._texts = [self.llm.detokenize([i]).decode("utf-8", errors="replace") for i in range(self.llm.n_vocab())]
        return self._texts


class _LlamaSession:
    """Session.feed / feed_rows on llama.cpp's C API, as `pocketfed.runtime.Session` does them on ours:
    ROWS sequences (llama.cpp sequence ids) in one unified KV cache of a context of their own on
    the same weights; a sequence keeps its common prefix with what it holds (`llama_memory_seq_rm`
    beyond it), takes what another sequence holds (`llama_memory_seq_cp`: in a unified cache the
    cells are shared, not copied), runs the rest, and the last token of each sequence asked for runs
    in one `llama_decode` batch. llama-cpp-python's `Llama` holds one sequence, hence the C API."""

    ROWS = 3

    def __init__(self, llm: Any) -> None:
        import llama_cpp

        self.lib, self.llm = llama_cpp, llm
        params = llm.context_params  # the Llama's own context is a small one, unused (see _child)
        params.n_ctx, params.n_batch, params.n_ubatch = LLAMA_CTX, LLAMA_BATCH, LLAMA_BATCH
        params.n_seq_max, params.kv_unified = self.ROWS, True
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not make a context")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_batch = int(params.n_batch)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.tokens: list[list[int]] = [[] for _ in range(self.ROWS)]

    def __del__(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)

    def _decode(self, entries: list[tuple[int, int, int]], logits: bool) -> None:
        """entries: (sequence, position, token); logits for every entry, or for none."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (seq, pos, tok) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, pos, 1, seq, logits
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _bring(self, row: int, ids: list[int]) -> None:
        from pocketfed.runtime.model import _common, longest_prefix

        common = _common(self.tokens[row], ids)
        self.lib.llama_memory_seq_rm(self.mem, row, common, -1)
        donor, have = longest_prefix(self.tokens, ids)
        if have > common:
            self.lib.llama_memory_seq_cp(self.mem, donor, row, common, have)
            common = have
        for start in range(common, len(ids), self.n_batch):
            self._decode([(row, p, ids[p]) for p in range(start, min(len(ids), start + self.n_batch))], logits=False)
        self.tokens[row] = list(ids)

    def feed(self, ids: list[int]) -> Any:
        return self.feed_rows([ids])[0]

    def feed_rows(self, seqs: list[list[int]]) -> list[Any]:
        import numpy as np

        from pocketfed.runtime.model import assign_rows

        order = assign_rows(self.tokens, seqs)  # the rows ours would use
        for row, ids in order:
            self._bring(row, ids[:-1])
        self._decode([(row, len(ids) - 1, ids[-1]) for row, ids in order], logits=True)
        out = {}
        for i, (row, ids) in enumerate(order):
            self.tokens[row] = list(ids)
            last = self.lib.llama_get_logits_ith(self.ctx, i)
            out[tuple(ids)] = np.ctypeslib.as_array(last, shape=(self.llm.n_vocab(),)).copy()
        return [out[tuple(ids)] for ids in seqs]  # in the order asked (order is by row)


def _child(kind: str, path: str, threads: int) -> dict[str, Any]:
    from pocketfed.runtime.bench import measure_model

    if kind == "onnx":
        from pocketfed.runtime import load

        model = load(path)  # threads and spinning as a device chooses them now
        row = measure_model(model)
        row["settings"] = f"{model.threads} threads, {'spinning' if model.spin else 'sleeping'}"
        return row
    from llama_cpp import Llama

    # the weights, and a small context of its own that no session uses: each _LlamaSession makes its own
    llm = Llama(model_path=path, n_ctx=64, n_batch=64, n_ubatch=64, n_threads=threads, n_threads_batch=threads,
                logits_all=False, verbose=False)  # n_threads_batch: batches too (its default is every core)
    row = measure_model(_LlamaModel(llm), new_session=lambda n: _LlamaSession(llm))
    row["settings"] = f"{threads} threads"
    return row


def _measure(kind: str, path: str, threads: int, busy: bool) -> dict[str, Any]:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        if spinner:
            time.sleep(0.5)  # the spinner is running before the runtime samples the CPU
        out = subprocess.run([sys.executable, __file__, "--child", kind, path, str(threads)],
                             capture_output=True, text=True, timeout=900)
    finally:
        if spinner:
            spinner.kill()
            spinner.wait()
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {path} ({threads} threads): {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(ours: float, peer: float, metric: str) -> float:
    return round(ours / peer if metric.startswith("decode") else peer / ours, 2)


def run(run_dir: str | None = None) -> list[dict[str, Any]]:
    from pocketfed.model.zoo import SMOLLM2_GGUF, _smollm2_package_dir
    from pocketfed.release.export import export

    if importlib.util.find_spec("llama_cpp") is None:
        raise RuntimeError("llama_cpp is not installed: `.venv/bin/pip install '.[llama]'` (compiles ~9 min)")
    run_dir = run_dir or DEMO_RUN
    if not (Path(run_dir) / "adapter").is_dir():
        raise RuntimeError(f"{run_dir} holds no trained adapter: run `make demo` first")
    work = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    onnx = export(run_dir, "onnx-int4", work / "onnx-int4")
    gguf = export(run_dir, "gguf-q4_0", work / "gguf-q4_0") / "model.gguf"
    shipped = _smollm2_package_dir() / SMOLLM2_GGUF
    cases = [("onnx-int4 (ours)", "onnx", str(onnx), 0),
             *[(f"llama.cpp gguf-q4_0 (our export), {t} threads", "llama", str(gguf), t) for t in (1, 2)],
             *[(f"llama.cpp shipped Q4_1 (base), {t} threads", "llama", str(shipped), t) for t in (1, 2)]]
    got: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rep in range(REPS):
        for condition in CONDITIONS:
            order = cases if rep % 2 == 0 else cases[::-1]  # alternate who goes first
            for name, kind, path, threads in order:
                row = _measure(kind, path, threads, condition != "idle")
                got.setdefault((condition, name), []).append(row)
                print(json.dumps({"rep": rep, "condition": condition, "case": name} | row), flush=True)
    rows: list[dict[str, Any]] = []
    for condition in CONDITIONS:
        med = {name: {m: statistics.median(r[m] for r in got[(condition, name)]) for m in METRICS}
               for name, *_ in cases}
        for name, *_ in cases:
            runs = got[(condition, name)]
            rows.append({"condition": condition, "runtime": name, "settings": runs[0]["settings"],
                         **{m: round(med[name][m], 1) for m in METRICS},
                         "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs)),
                         "runs": len(runs)})
        ours = med[cases[0][0]]
        for peer in ("gguf-q4_0", "Q4_1"):
            names = [n for n, *_ in cases if peer in n]
            best = {m: (max if m.startswith("decode") else min)(med[n][m] for n in names) for m in METRICS}
            rows.append({"condition": condition, "runtime": f"onnx-int4 vs llama.cpp {peer} (best of 1, 2 threads)",
                         "settings": "ratio", **{m: _ratio(ours[m], best[m], m) for m in METRICS}})
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        for r in run(sys.argv[1] if len(sys.argv) > 1 else None):
            print(r)
