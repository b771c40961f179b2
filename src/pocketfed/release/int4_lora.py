"""onnx-int4 graph surgery: a Q4_1-style 4-bit base with the LoRA adapters kept unmerged.

The onnxruntime-genai builder writes the decoder (GroupQueryAttention, KV cache, genai_config.json)
from the *unmerged* base; this module then rewrites its weight MatMuls. It is hand-written because
no library we know quantizes to float-offset Q4_1 blocks for ORT's MatMulNBits, nor keeps a LoRA
adapter unmerged inside a quantized MatMul.

Maths, for one linear y = x W^T, W: [N, K], blocks of 32 weights along K (b = k // 32, kb = K / 32):

    Q4_1 block (llama.cpp):  w = d*q + m,   q in 0..15,   m = block min,   d = (max - min) / 15
    MatMulNBits (4-bit):     w = d*(q - z), z in 0..15 (uint4 zero point)
    so we take z = round(-m / d) and keep the residual block offset r = m + d*z  (|r| <= d/2):

        y[n] = sum_k d(q - z) x[k]  +  sum_b r[n, b] s[b],        s[b] = sum of x over block b
             = MatMulNBits([x, s];  [q | q_r], [d | d_r], [z | z_r])       one node, K + kb inputs

    i.e. the block sums of x ride along as kb extra inputs whose weights are r, itself stored as
    Q4_1-style 4-bit blocks of 32, whose rounding (<= d_r: half a step, plus its own dropped offset
    residual) is the only loss left. The LoRA adapters (PEFT: dW = s B A, s = alpha / r) ride along
    the same way: h = x @ A^T is computed by the block-sum MatMul too, and (s B) becomes the weights
    of h, in two symmetric 4-bit levels (s B = d1 (q1 - 8) + d2 (q2 - 8), the second level holding
    the first one's rounding error, so |error| <= d2 / 2 ~ max|s B| / 200):

        [s | h | h] = x @ [S | A^T | A^T]          (S: [K, kb] 0/1 block-sum matrix; pads omitted)
        y = MatMulNBits([x, s, h, h];  [q | q_r | q_1 | q_2], ...)       K + kb + 2R inputs, one node

    A = [A_q; A_k; A_v] for the packed qkv projection, B zero-padded to its rows of the output. A
    decode step so runs 3 nodes per linear (MatMul, Concat, MatMulNBits) instead of 6 with an fp32
    side branch (MatMul A, MatMul B, Add): fewer thread-pool wake-ups, measured in formats.py.

SmolLM2-135M's base is dequantized from a Q4_1 GGUF, so its weights lie on this grid and the only
losses are r's 4-bit rounding (Hamlet perplexity +0.09%, simulated in PyTorch) and the int8
activations of accuracy_level 4, which round h too (+0.3% Hamlet perplexity on runs/demo against an
fp32 side branch). For other bases this is asymmetric 4-bit block-32 quantization.
Measured alternatives: ORT's CPU MatMulNBits accepts *float* zero points (z = -m/d, exact), but that
path dequantizes per call (1.4 ms vs 26 us for a 576x1536 matmul); r dropped costs +21% perplexity;
r as an fp32 side branch (MatMul per linear) was exact but cost 25% of decode speed; block sums
by Reshape + ReduceSum instead of a MatMul with a 0/1 matrix cost 5% more.

The tied embedding / lm_head becomes 8-bit, block 32, symmetric (w = d*q, q int8 stored as q + 128,
MatMulNBits' default 8-bit zero point is 128): Q8_0's own layout, so also exact for SmolLM2. The
embedding lookup is a GatherBlockQuantized (bits=8) over its own copy of those bytes (see rewrite()).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pocketfed.errors import UserError

BLOCK = 32
SCHEME = ("linears: Q4_1-style asymmetric 4-bit, block 32 (fp16 scale, uint4 zero point; the float block offset's "
          "residual as 4-bit extra inputs on block sums); embedding / lm_head: 8-bit symmetric block 32 (Q8_0); "
          "LoRA unmerged: h = x A^T in fp32 as more extra inputs, s*B their two-level 4-bit weights "
          "(ranks in lora_ranks)")
# PEFT / HF module -> the builder's MatMul group (q, k and v share one packed qkv MatMul)
_GROUP = {"q_proj": "attn/qkv_proj", "k_proj": "attn/qkv_proj", "v_proj": "attn/qkv_proj",
          "o_proj": "attn/o_proj", "gate_proj": "mlp/gate_proj", "up_proj": "mlp/up_proj", "down_proj": "mlp/down_proj"}
_QKV = ("q_proj", "k_proj", "v_proj")
_LAYER = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)$")


@dataclass(frozen=True)
class LoraFactor:
    """One adapter on one linear: dW = scale * B @ A;  A: [r, in], B: [out, r]."""

    role: str  # "global" | "personal"
    module: str  # "model.layers.3.self_attn.q_proj"
    a: np.ndarray
    b: np.ndarray
    scale: float


def quantize_q4_1(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """w: [N, K] -> q [N, kb, 32] uint8, d [N, kb], z [N, kb] uint8, r [N, kb] (float32), such that
    w == d*(q - z) + r  per block (up to float rounding; exactly on a Q4_1 grid)."""
    n, k = w.shape
    blocks = w.reshape(n, k // BLOCK, BLOCK).astype(np.float32)  # [N, kb, 32]
    m = blocks.min(axis=-1)
    span = blocks.max(axis=-1) - m
    d16 = (span / 15).astype(np.float16)  # Q4_1 stores d in fp16; round up where rounding down would clip q
    d = np.where(15 * d16.astype(np.float32) < span * (1 - 1e-6), np.nextafter(d16, np.float16(np.inf)), d16)
    d = d.astype(np.float32)
    safe = np.where(d > 0, d, 1.0)
    q = np.clip(np.rint((blocks - m[..., None]) / safe[..., None]), 0, 15).astype(np.uint8)
    z = np.where(d > 0, np.clip(np.rint(-m / safe), 0, 15), 0).astype(np.uint8)
    r = (m + d * z).astype(np.float32)
    return q, d, z, r


def quantize_q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w: [V, K] -> uint8 [V, K] (= int8 q + 128), d [V, kb]: w == d*q (Q8_0; exact for a Q8_0 source)."""
    v, k = w.shape
    blocks = w.reshape(v, k // BLOCK, BLOCK).astype(np.float32)
    d = (np.abs(blocks).max(axis=-1) / 127).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(blocks / np.where(d > 0, d, 1.0)[..., None]), -128, 127)
    return (q + 128).astype(np.uint8).reshape(v, k), d


def represented(w: np.ndarray) -> np.ndarray:
    """The weights the rewritten MatMulNBits computes with for w [N, K]: d*(q - z) + r_hat per block,
    r_hat = r after its own 4-bit rounding, offset residual dropped (max |r - r_hat| <= d_r). For tests."""
    n, k = w.shape
    q, d, z, r = quantize_q4_1(w)
    rq, rd, rz, _ = quantize_q4_1(np.pad(r, ((0, 0), (0, -r.shape[1] % BLOCK))))
    r_hat = (rd[..., None] * (rq.astype(np.float32) - rz[..., None])).reshape(n, -1)[:, : k // BLOCK]
    return (d[..., None] * (q.astype(np.float32) - z[..., None]) + r_hat[..., None]).reshape(n, k)


LORA_LEVELS = 2  # 4-bit levels for s*B; one level alone: |error| <= max|s B| / 14


def quantize_lora_b(b: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """b: [N, R] (already scaled by s) -> LORA_LEVELS of (q [N, nb, 32] uint8, d [N, nb]), symmetric
    4-bit (zero point 8) blocks of 32 along R, each level quantizing what the ones before left over:
    b ~= sum of d * (q - 8)."""
    n, r = b.shape
    left = np.pad(b.astype(np.float32), ((0, 0), (0, -r % BLOCK))).reshape(n, -1, BLOCK)
    levels = []
    for _ in range(LORA_LEVELS):
        d = np.abs(left).max(axis=-1) / 7
        q = np.clip(np.rint(left / np.where(d > 0, d, 1.0)[..., None]), -7, 7)
        levels.append(((q + 8).astype(np.uint8), d.astype(np.float32)))
        left = left - d[..., None] * q
    return levels


def represented_lora_b(b: np.ndarray) -> np.ndarray:
    """The s*B [N, R] the rewritten MatMulNBits computes with (for tests)."""
    n, r = b.shape
    total = sum(d[..., None] * (q.astype(np.float32) - 8) for q, d in quantize_lora_b(b))
    return total.reshape(n, -1)[:, :r]


def _pack_uint4(x: np.ndarray) -> np.ndarray:
    """[..., 2j] | [..., 2j+1] << 4 along the last axis (padded to even length)."""
    if x.shape[-1] % 2:
        x = np.concatenate([x, np.zeros(x.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (x[..., 0::2] | (x[..., 1::2] << 4)).astype(np.uint8)


def rewrite(folder: Path, base_weights: dict[str, np.ndarray], factors: list[LoraFactor]) -> dict[str, int]:
    """Rewrite `folder`/model.onnx (a builder int4 export of the unmerged base) in place.

    base_weights: HF state-dict names -> fp32 arrays (linears [out, in], "model.embed_tokens.weight").
    Returns {"lora_ranks": {role: rank}} of the adapters now in the graph, unmerged.
    """
    import onnx  # noqa: PLC0415  (export-time only)
    from onnx import helper, numpy_helper

    path = folder / "model.onnx"
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}

    def put(name: str, array: np.ndarray) -> None:
        tensor = numpy_helper.from_array(array, name)
        if name in inits:
            inits[name].CopyFrom(tensor)
        else:
            graph.initializer.append(tensor)
            inits[name] = graph.initializer[-1]

    def attr(node: onnx.NodeProto, name: str, value: int) -> None:
        for a in node.attribute:
            if a.name == name:
                a.i = value
                return
        node.attribute.append(helper.make_attribute(name, value))

    # The builder's weight MatMuls, by the name of their packed-weight initializer.
    nbits = {n.input[1]: n for n in graph.node if n.op_type == "MatMulNBits"}
    ranks: dict[str, int] = {}
    lora_by_group: dict[str, list[tuple[int, LoraFactor]]] = {}  # group -> (row offset in the output, factor)
    for f in factors:
        ranks[f.role] = max(ranks.get(f.role, 0), f.a.shape[0])
        match = _LAYER.search(f.module)
        if match is None or match.group(2) not in _GROUP:
            raise UserError(f"the adapter targets {f.module!r}; onnx-int4 supports LoRA on {', '.join(_GROUP)}")
        layer, proj = int(match.group(1)), match.group(2)
        offset = 0
        if proj in _QKV:
            for p in _QKV[: _QKV.index(proj)]:
                offset += base_weights[f"model.layers.{layer}.self_attn.{p}.weight"].shape[0]
        lora_by_group.setdefault(f"model.layers.{layer}.{_GROUP[proj].replace('/', '.')}", []).append((offset, f))

    new_nodes_before: dict[str, list[onnx.NodeProto]] = {}  # MatMulNBits node name -> nodes to put before it
    layers = 1 + max(int(m.group(1)) for k in base_weights if (m := re.search(r"layers\.(\d+)\.", k)))
    for i in range(layers):
        for group in ("attn/qkv_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"):
            prefix = f"model.layers.{i}.{group.replace('/', '.')}"
            node = nbits.get(f"{prefix}.MatMul.weight_Q4")
            if node is None:
                raise UserError(f"the ONNX builder did not write the expected int4 MatMul for {prefix}; "
                                "onnx-int4 export supports Llama-shaped models")
            hf = f"model.layers.{i}.{'self_attn' if group.startswith('attn') else 'mlp'}"
            names = _QKV if group == "attn/qkv_proj" else (group.split("/")[1],)
            w = np.concatenate([base_weights[f"{hf}.{p}.weight"] for p in names], axis=0)  # [N, K]
            n, k = w.shape
            kb = k // BLOCK
            q, d, z, r = quantize_q4_1(w)
            # the residual offsets r [N, kb] become kb more inputs, quantized like the weights
            rq, rd, rz, _ = quantize_q4_1(np.pad(r, ((0, 0), (0, -kb % BLOCK))))
            blocks, scales, zeros = [q, rq], [d, rd], [z, rz]
            augment = np.kron(np.eye(kb, dtype=np.float32), np.ones((BLOCK, 1), np.float32))  # [K, kb]: sums
            aug_name, k_total = f"block_sum/{k}", k + kb
            lora = lora_by_group.pop(prefix, [])
            if lora:  # [s | h | h] = x @ [S | A^T | A^T]; each part from a block boundary
                a_t = np.concatenate([f.a.astype(np.float32) for _, f in lora], axis=0).T  # [K, R]
                b = np.zeros((n, a_t.shape[1]), np.float32)  # [N, R]
                col = 0
                for offset, f in lora:
                    b[offset:offset + f.b.shape[0], col:col + f.b.shape[1]] = f.scale * f.b
                    col += f.b.shape[1]
                parts = [augment]
                for bq, bd in quantize_lora_b(b):
                    parts.append(np.zeros((k, -sum(x.shape[1] for x in parts) % BLOCK), np.float32))
                    parts.append(a_t)
                    blocks.append(bq)
                    scales.append(bd)
                    zeros.append(np.full(bd.shape, 8, np.uint8))
                augment = np.concatenate(parts, axis=1)
                aug_name, k_total = f"{prefix}.lora_and_block_sum", k + augment.shape[1]
            put(f"{prefix}.MatMul.weight_Q4", _pack_uint4(np.concatenate(blocks, axis=1)))  # [N, blocks, 16]
            put(f"{prefix}.MatMul.weight_scales", np.concatenate(scales, axis=1))  # [N, blocks]
            put(f"{prefix}.MatMul.weight_zp", _pack_uint4(np.concatenate(zeros, axis=1)).reshape(-1))
            del node.input[3:]
            node.input.append(f"{prefix}.MatMul.weight_zp")
            attr(node, "K", k_total)
            # x_aug = [x, block sums of x (, h, h)]   [.., k_total]
            x, at = node.input[0], f"/{prefix}/offsets"
            put(aug_name, augment)
            new_nodes_before[node.name] = [
                helper.make_node("MatMul", [x, aug_name], [f"{at}/sums"], name=f"{at}/MatMul_sums"),
                helper.make_node("Concat", [x, f"{at}/sums"], [f"{at}/x_aug"], name=f"{at}/Concat", axis=-1),
            ]
            node.input[0] = f"{at}/x_aug"
    if lora_by_group:
        raise UserError(f"the adapter targets layers the model does not have: {sorted(lora_by_group)[:3]}")

    # Tied embedding / lm_head: 8-bit Q8_0 blocks, stored twice (+28 MB on disk for SmolLM2): the
    # lm_head's copy is prepacked by MatMulNBits and released; the embedding's own [V, hidden] table
    # feeds GatherBlockQuantized directly, so it stays in the mapped file and only the rows looked up
    # become resident. Sharing one table (through the builder's Reshape, which ORT constant-folds
    # into a third copy) measured 28 MB more peak RSS.
    lm_head = nbits.get("lm_head.MatMul.weight_Q4")
    gather = next((x for x in graph.node if x.op_type == "GatherBlockQuantized"), None)
    if lm_head is None or gather is None:
        raise UserError("the ONNX builder did not share the embedding with the lm_head; onnx-int4 needs tied embeddings")
    data, scales = quantize_q8_0(base_weights["model.embed_tokens.weight"])
    vocab, hidden = data.shape
    put("lm_head.MatMul.weight_Q8", data.reshape(vocab, hidden // BLOCK, BLOCK))
    put("lm_head.MatMul.weight_scales", scales)
    lm_head.input[1] = "lm_head.MatMul.weight_Q8"
    attr(lm_head, "bits", 8)
    reshape = next(x for x in graph.node if gather.input[0] in x.output)  # weight_Q4 -> [V, K*bits/8]
    graph.node.remove(reshape)
    put("model.embed_tokens.weight_Q8", data.reshape(vocab, hidden))
    gather.input[0] = "model.embed_tokens.weight_Q8"
    attr(gather, "bits", 8)
    graph.initializer.remove(inits.pop("lm_head.MatMul.weight_Q4"))

    nodes = list(graph.node)
    del graph.node[:]
    for x in nodes:
        graph.node.extend(new_nodes_before.get(x.name, []))
        graph.node.append(x)
    used = {name for x in graph.node for name in x.input}
    for x in [x for x in graph.node if x.op_type == "Constant" and x.output[0] not in used]:
        graph.node.remove(x)
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)

    data_file = folder / "model.onnx.data"
    data_file.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data_file.name, size_threshold=1024)
    return {"lora_ranks": ranks}
