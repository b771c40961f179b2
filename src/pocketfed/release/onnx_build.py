"""Merged Hugging Face folder -> ONNX Runtime GenAI model folder (model.onnx + genai_config.json).

We call onnxruntime_genai's model builder, which writes a decoder with GroupQueryAttention and a KV
cache (past/present buffers shared in place by the GenAI runtime), and quantizes weight MatMuls to
MatMulNBits (int4/int8, block-wise, symmetric) when asked.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from pocketfed.errors import UserError
from pocketfed.release.formats import ONNX_COMMON_OPTIONS, Format, onnx_options


def build_onnx(hf_dir: Path, out_dir: Path, fmt: Format, cache_dir: Path) -> dict[str, int | str]:
    """Write the ONNX model for `fmt` into `out_dir`; returns the builder options used."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    precision = fmt.quant  # fp32 | int8 | int4
    options = onnx_options(fmt)
    pairs = [f"{k}={v}" for k, v in {**ONNX_COMMON_OPTIONS, **options}.items()]
    log = io.StringIO()
    # The builder prints progress and ORT's quantizer logs every node (and an ERROR line for the
    # int8 embedding Gather it leaves in float, which is expected): keep them off the console.
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            extra = parse_extra_options(None, str(hf_dir), str(out_dir), precision, "cpu", str(cache_dir), pairs)
            create_model(None, str(hf_dir), str(out_dir), precision, "cpu", str(cache_dir), **extra)
    except (NotImplementedError, ValueError, OSError) as e:
        raise UserError(f"the ONNX builder could not export this model: {str(e).splitlines()[0]}") from None
    finally:
        logging.disable(previous)
    return options
