"""Export a run's model, personalized or not, to a quantized on-device runtime.

The whole job, top to bottom:

    0. check   the run folder, the adapters and the format, before loading anything heavy
    1. load    the base model the run was trained on, refusing adapters made for another base
    2. merge   the run's adapter, W + dW_global, or the personal one (trained from the global
               one, so it holds it), W + dW_personal
               (onnx-int4: no merge; the adapter's factors are read and kept unmerged, see int4_lora)
    3. quantize + 4. write   into a temp folder beside --out:
         onnx-int4  base -> HF folder -> onnxruntime-genai builder (graph, KV cache, config), then
                    release.int4_lora rewrites its MatMuls: Q4_1-style 4-bit base + unmerged LoRA,
                    8-bit tied embedding / lm_head
         onnx-*     merged weights -> HF folder -> onnxruntime-genai builder (MatMulNBits int8 / fp32)
         gguf-*  merged weights -> llama.cpp tensors, Q8_0/Q4_0 blocks, BPE tokenizer metadata
       then manifest.json, then one rename: a failed export leaves nothing half-written.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from pocketfed.errors import UserError
from pocketfed.release.formats import Format, parse_format
from pocketfed.release.manifest import build_manifest, write_manifest
from pocketfed.release.merge import RunInputs, load_base_for, lora_factors, merge, read_run

Progress = Callable[[str], None]  # called with the name of each step as it starts


def _prepare_out(out: Path) -> None:
    """Refuse an --out folder that holds something other than a previous export."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file())):
        raise UserError(f"--out {str(out)!r} already exists and is not a pocketfed export; choose another folder")


def check_out(out: str | Path, force: bool) -> None:
    """What `pocketfed export` checks before any work: --out is free, or holds an export that --force
    may replace (the library's `export` replaces one silently: a device rebuilds its model in place)."""
    out = Path(out).expanduser()
    _prepare_out(out)
    if (out / "manifest.json").is_file() and not force:
        raise UserError(f"--out {str(out)!r} already holds an export; pass --force to replace it, or choose another folder")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an older export at `out` is swapped out, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(
    run_dir: str | Path | RunInputs,
    fmt: str | Format,
    out: str | Path,
    personal: str | Path | None = None,
    progress: Progress = lambda step: None,
) -> Path:
    """Export the run's (optionally personalized) model to `out`; returns `out`. `run_dir` is a
    simulate folder, or inputs already read (`pocketfed.release.deployment.read_deployment`)."""
    # 0. check, cheaply
    fmt = fmt if isinstance(fmt, Format) else parse_format(fmt)
    out = Path(out).expanduser()
    run = run_dir if isinstance(run_dir, RunInputs) else read_run(run_dir, personal)
    _prepare_out(out)

    # 1. load
    progress("load")
    base = load_base_for(run)

    # 2. merge (or, for onnx-int4, save the base and read the adapters' factors)
    progress("merge")
    int4 = fmt == Format.onnx_int4
    model = base.model if int4 else merge(base.model, run.applied)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        # 3. quantize + 4. write
        progress("quantize")
        work = Path(tempfile.mkdtemp(prefix=".work-", dir=tmp))
        if fmt.family == "onnx":
            from pocketfed.release.onnx_build import build_onnx  # noqa: PLC0415

            hf_dir = work / "hf"
            model.save_pretrained(hf_dir, safe_serialization=True)
            base.tokenizer.save_pretrained(hf_dir)
            options = build_onnx(hf_dir, tmp, fmt, cache_dir=work / "cache")
            if int4:
                from pocketfed.release.int4_lora import SCHEME, rewrite  # noqa: PLC0415

                weights = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
                branch = rewrite(tmp, weights, lora_factors(model, run.applied))
                quantization = {"bits": 4, "scheme": SCHEME, **branch} | options
            else:
                quantization = {"bits": {"fp32": 32, "int8": 8}[fmt.quant], "symmetric": True} | options
        else:
            from pocketfed.release.gguf_writer import write_gguf  # noqa: PLC0415

            write_gguf(model.state_dict(), model.config, base.path, tmp / "model.gguf", fmt.quant, base.model_id)
            quantization = {"type": fmt.quant.upper(), "block_size": 32, "token_embd": "Q8_0", "norms": "F32"}
        shutil.rmtree(work)

        progress("write")
        write_manifest(tmp, build_manifest(run, base.model_id, fmt, quantization, tmp))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
