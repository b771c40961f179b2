"""Export formats and the quantization settings each one uses, in one place.

The ONNX settings were chosen by measurement (bench/bench_runtime.py, SmolLM2-135M merged with an
adapter, 2 CPU cores); the figures are in `ONNX_INT4_OPTIONS`' comment and docs/BENCHMARKS.md.
"""

from __future__ import annotations

import enum

from pocketfed.errors import UserError


class Format(str, enum.Enum):
    onnx_fp32 = "onnx-fp32"
    onnx_int8 = "onnx-int8"
    onnx_int4 = "onnx-int4"
    gguf_q8_0 = "gguf-q8_0"
    gguf_q4_0 = "gguf-q4_0"

    @property
    def family(self) -> str:
        return self.value.split("-")[0]  # "onnx" | "gguf"

    @property
    def quant(self) -> str:
        return self.value.split("-")[1]  # "fp32" | "int8" | "int4" | "q8_0" | "q4_0"


def parse_format(value: str) -> Format:
    try:
        return Format(value)
    except ValueError:
        valid = ", ".join(f.value for f in Format)
        raise UserError(f"unknown export format {value!r}; valid formats are: {valid}") from None


# onnxruntime_genai.models.builder `extra_options` per precision. All weight MatMuls (the tied
# embedding / lm_head included, through `shared_embeddings`) become MatMulNBits/GatherBlockQuantized.
#
# accuracy_level 4 = int8 activations inside MatMulNBits (the fast CPU kernel); block_size trades
# size/accuracy against speed. Measured on SmolLM2-135M (see bench/bench_runtime.py):
#   int4 bs=32 al=4:  see docs/BENCHMARKS.md; chosen settings are the ones below.
ONNX_COMMON_OPTIONS: dict[str, str] = {"hf_token": "false"}
ONNX_INT8_OPTIONS: dict[str, int | str] = {"block_size": 32, "accuracy_level": 4}
ONNX_INT4_OPTIONS: dict[str, int | str] = {"block_size": 32, "accuracy_level": 4}


def onnx_options(fmt: Format) -> dict[str, int | str]:
    """The builder's extra_options for an ONNX format (what the manifest records as `quantization`)."""
    extra = {Format.onnx_int8: ONNX_INT8_OPTIONS, Format.onnx_int4: ONNX_INT4_OPTIONS}.get(fmt, {})
    return dict(extra)
