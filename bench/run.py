"""`make bench`: run the benchmarks and write docs/BENCHMARKS.md, all of it.

Each bench module has `run() -> list[dict]`; a row's keys become its table's columns. A
benchmark that cannot run here (a missing optional package, say) is reported, not fatal.

docs/BENCHMARKS.md is this script's output and nothing else: edit the prose here, never there.
A section is, in order: the first paragraph of its bench module's docstring (what is measured),
the measurement (date, machine, duration, command, table: between `<!-- measured: MODULE -->` and
`<!-- /measured -->`), figures derived from that table (`derived`: the ratios README.md quotes,
recomputed on every write so they cannot drift from it), and the notes in `NOTES`.

    python bench/run.py                    measure every section
    python bench/run.py --only bench_dp    measure bench_dp; every other section keeps its recorded
                                           measurement (a section never measured says so)
    python bench/run.py --render           measure nothing: rewrite the file from the recorded
                                           measurements and the current prose
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

SECTIONS = [
    ("Simulation (issue 2)", "bench_sim"),
    ("Secure aggregation (issue 4)", "bench_secagg"),
    ("Differential privacy on Shakespeare (issue 4)", "bench_dp"),
    ("On-device inference (issue 5)", "bench_runtime"),
    ("Decoding against llama.cpp, idle and loaded (issue 17)", "bench_decode"),
    ("Device app (issue 14)", "bench_app"),
    ("Device budgets (issue 6)", "bench_budget"),
    ("Sparse back-propagation and the watch plan (issue 17)", "bench_depth"),
    ("Scale-out (issue 7)", "bench_scale"),
    ("Coordinator load (issue 3)", "bench_server"),
    ("Coordinator hardening: idle connections (issue 16)", "bench_connections"),
    ("Malicious devices: attacks x defenses (issue 16)", "bench_robust"),
]
MODULES = [m for _, m in SECTIONS]

HEADER = """# Benchmarks

Written by `make bench` (`.venv/bin/python bench/run.py`): every word of this file comes from
bench/run.py and the bench modules' docstrings, so edit those, not this. Each section says when and
on which machine it was measured; `bench/run.py --only MODULE` re-measures one section and keeps
the others. The machines are shared and noisy: compare ratios within a table, not across runs."""

NOTES = {
    "bench_secagg": """\
Issue 13's targets at 100 devices: `bytes_vs_plain` within 2x and `round_time_vs_unsigned` within
1.2 (the defences against an active server: signed adverts, the devices' directory and consistency
checks). Measured on an idle machine; two more `bench/bench_secagg.py --quick` runs right after gave
1.094 and 1.094 (full graph) and 1.081 and 1.076 (SecAgg+, 10% dropping). The server verifies each
advert once, on receipt; consistency signatures are verified by the devices only (until t are valid).
""",
    "bench_depth": """\
The watch plan's slow path (issue 17, item 2), found with torch.profiler on
`python -m pocketfed.device.fit --profile watch`: 85% of a step was `aten::mm` in bfloat16, most of
it the backward's grad @ W of the int8 linears (49 ms a call) and of the bf16 head. CPUs without
AVX512-BF16 or AMX have no fast bfloat16 GEMM in torch (the fallback runs ~50x slower than float32
for the untransposed product); the lean model now computes in float32 whatever the weights are
stored in, rebuilding int8 / bf16 weights a slice at a time (device/lowmem.py). On the AVX2 kernels
(`ATEN_CPU_CAPABILITY=avx2`) one watch step went from 76 s (6.7 tokens/s; the phone plan 144 in the
same minute: 0.05x) to 0.58-0.66x the phone plan's tokens per CPU-second (2026-11-28, one torch
thread, interleaved, machine shared with other jobs at load 12-25 on 2 cores).
`time_vs_full` compares a case with its own full-depth row of the same run (interleaved repeats).
Measured idle on 2026-11-29 (device rows: 2 torch threads, medians of 3; quality rows: the demo's
runs, `BENCH_DEPTH_RUNS`, L=all is runs/demo): top-L saves a third of a round's time (L=10 0.68x,
L=5 0.60x in this run; 0.65-0.75x and 0.55-0.72x in two runs of 2026-11-28) and costs 40% / 67%
held-out perplexity after the demo's 3 rounds (119.5 / 143.1 against 85.55). The loss is not a
tuning artefact: the best of a small sweep for top 10 (every linear adapted instead of q and v;
learning rate 2e-3, 4e-3 or 8e-3) reaches 90.08 at 0.76x the time, while full depth at the same
doubled learning rate reaches 78.28, and full depth at that rate with half the steps (half the
device-seconds, half the tokens) reaches 90.85: at equal time full depth with fewer steps matches
the best top-L. So `lora.layers` stays 0 (all layers), and issue 17's "half the device-seconds at
equal or better perplexity" is out of reach by depth: the forward through all 30 layers and the
head (SmolLM2's 49,152 x 576 head costs about 8 layers' work each way) stay, which puts top-L's
floor near 0.6x a full-depth round even at L = 1, before any loss of quality. The demo's learning
rate (2e-3) is itself not the best for 3 rounds: 4e-3 gives 78.28 against 85.55 at the same cost.
The loss now streams the head over vocabulary slices on every plan (`lowmem.head_loss`: the head
read, or rebuilt from bf16, once each way a micro-batch, where chunks of 32 positions read it once
each way per chunk): the plain fp32 demo round went from 147-169 to 180 tokens/s, the phone plan
from 172-176 to 191. The watch plan went from 60.1 tokens/s (0.35x the phone's 172.1, this morning)
to 94.3 in the same 512 MB budget (peak 459 MB): the head streamed (64 -> 72 tokens/s), a
checkpointed layer's recompute keeping the weights it rebuilt for its backward (the plan's
`keep_rebuilt`: one layer's linears in float32, 13.5 MB; -> 81-86), and checkpointed micro-batches
above 1 in the planner (the watch now 2 x 2; -> 90-101). Since the phone plan sped up too, the ratio
is 0.49x here and 0.55x in bench_budget's run of the same hour (101.4 against 183.2): issue 17's
0.5x goal is met at the edge, not with margin. The same training losses (device.fit: watch 4.1115
before and after). With L=10 the watch fits micro-batch 4. The energy model counts FLOPs, which
these changes do not alter: its device-seconds for a watch round stay 420.5.""",
    "bench_robust": """\
Issue 16's goals hold: without a defense the boosted replacement plants the backdoor (100% of
trigger prompts from round 3 on; clean perplexity +11%); the coordinate-wise median stops it (0% in
every round) at a perplexity 6.8% *lower* than the clean run's, and norm bounding + central DP with C
near the honest updates' norm stops it at no cost (C 2.5: 0%, +0.0%; C 4: 0%, -0.7%). C = 1 stops it
too but halves every honest update (their median norm here is ~2.3: the median norm bound, 3x it,
was 6.4-6.8 in rounds 2-5) and costs +26.9%. The default median norm bound (3x) alone also holds it
to 0% (-5.6%), and so does multi-Krum (+0.1%). Defenses that beat the clean run do so because the
clean run has no bound at all (`server.median_norm_bound` 0 there, as in the no-defense cell): a
bound also trims the honest devices' outliers. z = 0.02 is a token noise: those DP rows show what
the clip does against the attack, not a useful epsilon (for privacy see the DP section). All cells
are deterministic (seed 0; one torch thread each, two cells at a time: 18 min for the six first
cells with the machine shared, load 2-7).""",
    "bench_connections": """\
Before the hardening (HEAD 89f3e82 run from `git archive` with PYTHONPATH, 2026-11-28, load ~17):
the 40 stranger connections grew the coordinator by +151.2 MB and were all still open 40 s later
(the audit saw +150 MB, never closed). Now the header checks answer a stranger before any body is
read, and a registered key's forged body is streamed to a 0600 file, refused, deleted, and its
connection closed at `deploy.read_timeout_s` (15 s). Memory growth does not depend on load; the
closing times are the timeouts.""",
    "bench_app": """\
The issue's goals: suggestion p95 < 50 ms on smollm2-135m int4, and the app's whole-process peak RSS
within the phone profile (1,536 MB). `direct_p95_ms` is `runtime.suggest` called in-process on the
same texts, with the same threads and spinning; app and peer take turns in blocks of every text (3
each, medians of the blocks' percentiles; never both at once: two spinning thread pools on 2 cores
slow each other), so `app_vs_direct_p95` (what HTTP, the thread pool and the app add) holds however
loaded the machine is; `load_1m` says how loaded it was. On a shared machine wall times are inflated several-fold, CPU
times (`cpu_p95_ms`, all threads) much less: they are the guide to an idle device. `keystrokes` (a
request after every character, partial words completed) is a worst case the page avoids: it asks
when typing pauses for 120 ms. On an idle machine the runtime section's `suggest_p95_ms` is the
direct figure to compare with. Until 2026-11-28 the app added a constant 44 ms to every request
(p95 79.3 ms against 31.7 direct): its listening socket was made with proto 0, so asyncio left
Nagle's algorithm on and each response's body waited for the client's delayed ACK; the socket now
names IPPROTO_TCP (tests/unit/app/test_app_cli.py checks an accepted connection has TCP_NODELAY).
The run of 2026-11-28 15:xx read words p50 23.3 / p95 28.5 and keystrokes p50 30.7 / p95 69.2; the
evening's, after the runtime's huge pages, its memo of recent sequences (a keystroke within a word
asks again about the same text before it: no model step) and suggest's trimmed numpy work, read
keystrokes p50 19.0 / p95 50.9 and words p50 20.9 / p95 36.8 (load 1.4-1.5: its words p95 is 1.45x
the direct call's 25.4 in the same run, where the earlier run's was 1.17x). The run of 2026-11-29, after the runtime's
batched end-of-word checks ("Decoding against llama.cpp"), reads words p50 11.1 / p95 19.4 ms
(direct 14.8) and keystrokes p50 15.5 / p95 41.8 at load 1.2; peak RSS 367.5 MB.""",
    "bench_decode": """\
Against issue 17's goals (2026-11-29, the table above, idle VM right after a loaded test run,
medians of 3): idle, onnx-int4 decodes 168.4 / 121.8 tok/s at 128 / 1,024 tokens of context (goal
>= 120 at 1,024: met), 1.06x / 1.02x llama.cpp on the shipped Q4_1 file and 0.83x / 0.87x on our
gguf-q4_0 export (goal 1.3x: not met); suggestions p50 8.7 ms, p95 15.3 ms (goal p95 <= 20 ms:
met; llama.cpp on our export, running the same search with its branches batched the same way,
27.7 ms). With one core busy the runtime takes one thread: 128.1 / 91.1 tok/s, 0.63x / 0.77x
llama.cpp's single thread on our export, 0.96x / 0.97x on the Q4_1 file (goal 1.0x: not met);
suggestions p95 20.1 ms. Two earlier runs the same hour read 188.9 / 132.7 tok/s and p95 14.0 ms
idle (0.87x / 0.90x our export; llama.cpp's batched suggest p95 22.2 ms), and, with llama.cpp's
branches run one after another, 165.5 / 124.3 tok/s and p95 15.5 ms (0.83x / 0.89x).

Suggestions (2026-11-29): a suggestion after a new word used to cost 4 decode steps of ~5.5 ms (the
context token, then the end-of-word check of each of the 3 words shown, one after another, since
onnxruntime-genai's Generator holds one sequence). The runtime now runs the export's decoder in
plain onnxruntime with its own KV caches (`runtime.model.Session`): 3 rows in one buffer that
GroupQueryAttention updates in place, a row's prefix copied from another by a numpy slice, and
`feed_rows` running one new token on each row as a single batched step, which reads the weights
once for all three. `suggest` expands its 3 best frontier entries per step instead of 1 (best-first
still: a finished word is emitted only when it is the best entry left, so the words and their order
are those of one-at-a-time expansion; `test_batched_search_finds_the_words_of_one_expansion_at_a_time`),
at most 4 batched steps a call (was 8 single ones). On 148 prefixes (3 texts, after each word and 2
letters into the next) the words are the same on 147; on the last the old budget ran out on a junk
expansion ("yondrid") that the new one replaces with "yon". Measured (interleaved, each in its own
process, idle, 2 spinning threads, TYPED_TEXT twice): suggest p50 16.6-19.0 -> 7.7-9.2 ms, p95
22.4-25.5 -> 13.6-16.4 ms; decode per token unchanged (logits bit-identical to onnxruntime-genai's;
the same kernels). The three rows' cache costs 24 MB more than one (peak RSS 279 -> 294 MB). The
llama.cpp rows run the same search with the same batching, through llama.cpp's C API (three
sequence ids in one unified KV cache, prefixes shared with `llama_memory_seq_cp`, the branches in
one `llama_decode`; bench_decode's `_LlamaSession`, on the rows `runtime.model.assign_rows` picks for
ours): its suggest p95 went from 23.7 to 22.2 ms in runs of the same hour.
llama.cpp's batched path rounds differently from its one-token path (logits up to 0.63 apart on a
test sequence), so 2 of the 34 suggestions on TYPED_TEXT swap two close words against its
one-at-a-time search. Its context now runs batches on its own thread count too
(`n_threads_batch`; llama-cpp-python's default is every core, which under load took its 1-thread
suggest p95 to 190 ms in a first run).

Decoding per token is where the gap stays, and it is per core: at 1 thread ORT's MatMulNBits runs
~5 ms of a ~7 ms step (the Q8 lm_head alone 1.5 ms), where llama.cpp's whole step is ~5 ms (with one
core busy, 187-211 tok/s against our 126-132 in the day's runs); memory bandwidth is not the limit (~15 GB/s used of the
38 one core streams). An ORT profile of a decode step at 1 thread (2026-11-29, 100 steps at 128
tokens of context, per step with profiling on): MatMulNBits 7.1 ms over 151 nodes,
GroupQueryAttention 1.3 ms over 30, the block-sum / LoRA-A MatMuls 0.75 ms over 120,
SkipSimplifiedLayerNorm 0.4 ms, Concat 0.4 ms. Tried and dropped: gate/up fused into one
MatMulNBits (no gain; MLAS ran a 3072-row matmul slower than two of 1536), K padded to whole blocks
(no gain), an fp16 KV cache (ORT's CPU attention converts it every step: 141 / 71 tok/s),
`mlas.use_lut_gemm`, `set_denormal_as_zero`, `session.dynamic_block_base` 4 (2026-11-29: 144-165
against 150-171 tok/s without); ORT 1.32's fused `MatMulNBitsMlp` / `MatMulNBitsQkv` take no zero
points, which the Q4_1 base needs. Closing the rest needs an int4 kernel as fast per core as
ggml's on AVX2, or a lossier format: our gguf-q4_0 export, the peer's fastest file, costs +22%
perplexity where onnx-int4 costs +0.9% ("On-device inference"). llama.cpp's 2-thread rows under
load show why it defaults to cpu_count // 2 threads: its spinning workers collapse (p95 187-225 ms).""",
    "bench_runtime": """\
llama.cpp rows: `llama-cpp-python` 0.3.36 built here (`pip install '.[llama]'`, about 9 min of
compiling on 2 cores), `logits_all=True` so that perplexity can be read: its peak RSS includes an
n_ctx x vocab float32 logits buffer and is not comparable. The shipped Q4_1 file is the base model
without the adapter (the reference the issue's ~150 tok/s was measured on).

Threads: "1" is one ORT thread; "2, sleeping" and "2, spinning" are two threads whose idle worker
sleeps between parallel sections or spins (ORT's `session.intra_op.allow_spinning`).
`pocketfed.runtime.load` chooses: as many threads as there are free cores at start-up (at most 2),
spinning when there are two (spinning wins by ~35% on an idle CPU and loses by half when another
process holds a core, where one thread beats two sleeping ones; runtime/model.py's docstring).
Since 2026-11-28 the runtime backs its weights and KV cache with huge pages (the 1-thread row:
99.1 -> 127.3 tok/s at 128 tokens of context between two runs of this table). Since 2026-11-29 it
runs the export's decoder in plain onnxruntime (rows labelled "onnxruntime"; the same graph and
kernels as onnxruntime-genai, logits bit-identical) with its own KV-cache rows, so that a
suggestion's end-of-word checks run as one batched step ("Decoding against llama.cpp"): suggest
p95 26.9 -> 15.1 ms on the 2-spinning-thread row between this table's runs. llama.cpp's own workers spin. Decode tok/s is 1 / the median
step time over 64 steps, for every runtime.

Run-to-run spread, recorded on 2026-11-25 over three runs of this table on the 2-core machine:
onnx-int4 (2, spinning) against llama.cpp on the shipped Q4_1 file gave 0.99x / 0.97x (a mean over
32 steps, before the median), 1.44x / 1.26x and 1.13x / 1.05x at 128 / 1,024 tokens of context.""",
}

BEGIN, END = "<!-- measured: {} -->", "<!-- /measured -->"


def machine() -> str:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def table(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def parse_table(text: str) -> list[dict[str, str]]:
    """The first markdown table in `text`, as rows of strings (what `table` wrote, read back)."""
    lines = [x for x in text.splitlines() if x.startswith("|")]
    if len(lines) < 2:
        return []
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split(" | ")]  # noqa: E731
    cols = cells(lines[0])
    return [dict(zip(cols, cells(line))) for line in lines[2:]]


def intro(module: str) -> str:
    """The first paragraph of the module's docstring, on one line (read, not imported: no heavy deps)."""
    doc = ast.get_docstring(ast.parse((HERE / f"{module}.py").read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def derived(module: str, measured: str) -> list[str]:
    """Figures computed from a section's table: what README.md quotes, never typed by hand."""
    rows = parse_table(measured)
    if module == "bench_runtime":
        ours = [r for r in rows if r.get("runtime") == "onnxruntime onnx-int4" and r.get("threads") == "2, spinning"]
        ref = [r for r in rows if r.get("runtime", "").startswith("llama.cpp, shipped Q4_1")]
        try:
            ratios = [float(ours[0][c]) / float(ref[0][c]) for c in ("decode_tok_s@128", "decode_tok_s@1024")]
        except (IndexError, KeyError, ValueError, ZeroDivisionError):
            return []
        return [f"Derived from the table: onnx-int4 (2 threads, spinning) decodes at {ratios[0]:.2f}x / "
                f"{ratios[1]:.2f}x the speed of llama.cpp on the shipped Q4_1 file, at 128 / 1,024 tokens of context."]
    return []


def recorded(text: str) -> dict[str, str]:
    """module -> its measured block (without the markers) in an existing BENCHMARKS.md."""
    found = re.finditer(r"<!-- measured: (\w+) -->\n(.*?)\n<!-- /measured -->", text, flags=re.S)
    return {m.group(1): m.group(2) for m in found}


def measure(module: str) -> str:
    """Run one bench module -> its measured block: when, where, how long, the command, the table."""
    print(f"== {module}", flush=True)
    start = time.perf_counter()
    try:
        # The runtime bench merges a trained adapter when `make demo` has left one.
        trained = {"run_dir": "runs/demo"} if module == "bench_runtime" and Path("runs/demo/adapter").is_dir() else {}
        body = table(importlib.import_module(module).run(**trained))
    except ModuleNotFoundError as e:
        body = f"_not run: {e}_"
    except Exception:  # a broken benchmark is reported in the file, the others still run
        body = "_failed:_\n\n```\n" + traceback.format_exc()[-2000:] + "\n```"
    print(body, flush=True)
    return (f"Measured on {datetime.date.today()} ({time.perf_counter() - start:.0f} s) on {machine()}: "
            f"`.venv/bin/python bench/run.py --only {module}`\n\n{body}")


def render(measured: dict[str, str]) -> str:
    parts = [HEADER, ""]
    for title, module in SECTIONS:
        parts += [f"## {title}", "", intro(module), ""]
        if module in measured:
            parts += [BEGIN.format(module), measured[module], END, ""]
            parts += [line + "\n" for line in derived(module, measured[module])]
        else:
            parts += [f"_Not measured yet: `.venv/bin/python bench/run.py --only {module}`._", ""]
        if module in NOTES:
            parts += [NOTES[module], ""]
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/BENCHMARKS.md")
    ap.add_argument("--only", nargs="+", metavar="MODULE", choices=MODULES,
                    help="measure these sections only; the others keep what the file recorded")
    ap.add_argument("--render", action="store_true", help="measure nothing; rewrite from the recorded measurements")
    args = ap.parse_args()
    out = Path(args.out)
    measured = recorded(out.read_text()) if out.is_file() else {}
    for module in [] if args.render else args.only or MODULES:
        measured[module] = measure(module)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(render(measured))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
