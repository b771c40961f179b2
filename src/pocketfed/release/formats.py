"""Export formats and the quantization settings each one uses, in one place.

The ONNX settings were chosen by measurement (bench/bench_runtime.py, SmolLM2-135M with an adapter,
2 CPU cores); the figures are in the comment above `ONNX_COMMON_OPTIONS` and docs/BENCHMARKS.md.
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
# embedding / lm_head included, through `shared_embeddings`) become MatMulNBits /
# GatherBlockQuantized; prune_lm_head computes logits for the last position only during prefill.
# onnx-int4 is then rewritten by release.int4_lora (Q4_1-style base, block-offset residual as extra
# inputs, 8-bit Q8_0 embedding / lm_head, LoRA unmerged as more inputs); its builder options only fix the
# graph's shape (block 32, accuracy_level 4).
#
# Earlier measurements (builder quantization of the merged model; SmolLM2-135M + a random q,v LoRA,
# 1 intra-op thread, decode tok/s at 128 / 1024 context, TTFT for 64 tokens, peak RSS, size,
# Hamlet perplexity over 2,000 tokens; fp32 transformers: 41.92):
#   int4 bs32 al4 (builder default)       110 / 70 tok/s  TTFT 161 ms  RSS 498 MB   86 MB  ppl 55.70
#   int4 bs32 al4 + prune_lm_head          127 / 73        TTFT 124 ms  RSS 304 MB   86 MB  ppl 55.70
#   int4 bs64 al4 + prune_lm_head          131 / 85        TTFT 120 ms  RSS 280 MB   78 MB  ppl 64.03
#   int4 bs128 al4 + prune_lm_head         136 / 95        TTFT 110 ms  RSS 276 MB   80 MB  ppl 71.25
#   int4 bs32 k_quant                                                               88 MB  ppl 56.64
#   int4 bs32 asym, lm_head int8, unshared                                          210 MB  ppl 50.93
#   int4 bs32 k_quant_mixed (int8 lm_head + llama.cpp's sensitive layers), unshared 220 MB  ppl 47.19
#   int8 bs32 al4 + prune_lm_head                                                   270 MB  ppl 42.32 (+0.9%)
#   int8 bs128 al4 + prune_lm_head                                                  ppl 42.62 (+1.7%)
#
# onnx-int4 as now written (runs/demo's trained q,v adapter; this 2-core box shared with two other
# jobs, so speed is compared within one process: ORT session, 1 thread, one decode step at 128
# context, 20th-percentile ms over 5 interleaved rounds of 20):
#   builder int4 of the merged model (before)          9.95 ms/token   Hamlet ppl 52.88 (demo run)
#   Q4_1-style, residual dropped, no zp (lossy)        8.9  ms/token   (+21% ppl, simulated)
#   Q4_1-style + residual as an fp32 MatMul branch      ~25% slower than the line above (exact)
#   Q4_1-style + residual as extra K inputs (shipped)  10.7 ms/token   Hamlet ppl 39.27 (demo run)
#     block sums by Reshape + ReduceSum instead of a 0/1 MatMul: 11.3 ms/token
#   accuracy_level 0 (fp32 activations): exact, but 6 tok/s (the 8-bit lm_head has no fast fp32 path)
#   lm_head 4-bit Q4_1 instead of Q8_0: +7.5% ppl (simulated); Q8_0 lm_head costs ~0.5 ms/token
#   float zero points (exact Q4_1 without the residual): 55x slower MatMulNBits (dequantizes per call)
# The LoRA adapter inside MatMulNBits (h = x A^T as extra inputs, s*B as 2-level 4-bit weights; now)
# against an fp32 side branch (MatMul A, MatMul B, Add per linear; before), idle box, decode tok/s at
# 128 / 1,024 context, best of 3:  2 spinning threads 161 / 107 vs 144 / 92;  2 sleeping 101 / 91 vs
# 95 / 89.  Hamlet ppl 39.35 vs 39.23 (+0.3%: the int8 rounding of h; with fp32 activations the two
# graphs agree to 0.004%).
# Full benchmark rows (decode tok/s, TTFT, suggest latency, RSS, ppl vs fp32): docs/BENCHMARKS.md.
ONNX_COMMON_OPTIONS: dict[str, str] = {"hf_token": "false", "prune_lm_head": "true"}
ONNX_INT8_OPTIONS: dict[str, int | str] = {"block_size": 32, "accuracy_level": 4}
ONNX_INT4_OPTIONS: dict[str, int | str] = {"block_size": 32, "accuracy_level": 4}


def onnx_options(fmt: Format) -> dict[str, int | str]:
    """The builder's extra_options for an ONNX format (what the manifest records as `quantization`)."""
    extra = {Format.onnx_int8: ONNX_INT8_OPTIONS, Format.onnx_int4: ONNX_INT4_OPTIONS}.get(fmt, {})
    return dict(extra)
