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


# onnxruntime_genai.models.builder `extra_options` per precision. Weight MatMuls (the tied
# embedding / lm_head included, through `shared_embeddings`, 4-bit only) become MatMulNBits /
# GatherBlockQuantized; prune_lm_head computes logits for the last position only during prefill.
#
# Measured on SmolLM2-135M + a LoRA adapter (q,v; random small B), this 2-core box shared with other
# jobs (load average ~4), 1 intra-op thread, decode tok/s at 128 / 1024 context, TTFT for 64 tokens,
# peak RSS, Hamlet perplexity over 2,000 tokens (fp32 transformers: 41.92):
#   int4 bs32 al4 (builder default)       110 / 70 tok/s  TTFT 161 ms  RSS 498 MB   86 MB  ppl 55.70
#   int4 bs32 al4 + prune_lm_head          127 / 73        TTFT 124 ms  RSS 304 MB   86 MB  ppl 55.70
#   int4 bs64 al4 + prune_lm_head          131 / 85        TTFT 120 ms  RSS 280 MB   78 MB  ppl 64.03
#   int4 bs128 al4 + prune_lm_head         136 / 95        TTFT 110 ms  RSS 276 MB   80 MB  ppl 71.25
#   int4 bs32 k_quant                                                               88 MB  ppl 56.64
#   int4 bs32 asym, lm_head int8, unshared                                          210 MB  ppl 50.93
#   int4 bs32 k_quant_mixed (int8 lm_head + llama.cpp's sensitive layers), unshared 220 MB  ppl 47.19
#   int8 bs32 al4 + prune_lm_head                                                   270 MB  ppl 42.32 (+0.9%)
#   int8 bs128 al4 + prune_lm_head                                                  ppl 42.62 (+1.7%)
# prune_lm_head is free speed and -200 MB RSS at 1,024 tokens of prefill (no [1024, 49152] logits).
# block 32 keeps the least-bad int4 perplexity among the fast settings; int8 needs block 32 to stay
# within +1%. No int4 setting tried reached the +6% perplexity goal.
ONNX_COMMON_OPTIONS: dict[str, str] = {"hf_token": "false", "prune_lm_head": "true"}
ONNX_INT8_OPTIONS: dict[str, int | str] = {"block_size": 32, "accuracy_level": 4}
ONNX_INT4_OPTIONS: dict[str, int | str] = {"block_size": 32, "accuracy_level": 4}


def onnx_options(fmt: Format) -> dict[str, int | str]:
    """The builder's extra_options for an ONNX format (what the manifest records as `quantization`)."""
    extra = {Format.onnx_int8: ONNX_INT8_OPTIONS, Format.onnx_int4: ONNX_INT4_OPTIONS}.get(fmt, {})
    return dict(extra)
