"""The ``ort`` flavour: a CompressedModel as an ONNX decoder for ONNX Runtime.

Uses the com.microsoft contrib ops onnxruntime-genai's builder uses, so the
graph runs on ORT's fastest CPU kernels: MatMulNBits (2/4/8-bit weights,
accuracy_level 4 for int8 activations), DynamicQuantizeMatMul (W8A8),
GroupQueryAttention with rotary, SkipSimplifiedLayerNormalization. Every
layer may differ; dropped layers are absent.

Inputs / outputs (``j`` counts kept layers)::

    input_ids        int64 [batch, seq]
    attention_mask   int64 [batch, past + seq]      (all ones; no padding)
    logits_to_keep   int64 [1]                      (logits for the last k positions; k = seq for all)
    past_key_values.{j}.key / .value   float [batch, kv_heads_j, past, head_dim_j]
    ->
    logits           float [batch, logits_to_keep, vocab]
    present.{j}.key / .value           float [batch, kv_heads_j, past + seq, head_dim_j]

One layer::

    x ─► (Skip)SimplifiedLayerNorm ─► q,k,v (packed if one format) ─► GroupQueryAttention(rotary)
      └──────────── residual ───────────────────────────────────────┐        │
                                                                    ▼        ▼
         SkipSimplifiedLayerNorm(residual, o_proj(attn)) ─► gate, up ─► silu(gate)·up ─► down ─► next layer
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from llmshrink.compressor.model import CompressedModel, QuantLinear
from llmshrink.errors import UsageError
from llmshrink.exporters.graph import FLOAT, INT32, INT64, MS_DOMAIN, GraphBuilder
from llmshrink.exporters.pack import matmul_nbits_arrays
from llmshrink.formats import QuantFormat, parse_format
from llmshrink.registry import Registry

DEFAULT_MAX_LENGTH = 2048

LinearEmitter = Callable[[GraphBuilder, str, QuantLinear, str], str]
ORT_KERNELS: Registry[LinearEmitter] = Registry("ORT CPU kernel")


def ort_kernel(fmt: QuantFormat) -> str:
    """The ORT kernel that runs ``fmt``: ``MatMul``, ``MatMulNBits`` or ``DynamicQuantizeMatMul``."""
    if fmt.weight_bits == 32:
        return "MatMul"
    if fmt.weight_bits == 16:
        raise UsageError(f"{fmt} has no ONNX Runtime CPU kernel.", "Use fp32, w8a8 or w{2,4,8}g* formats for the ort flavour.")
    if fmt.act == "int8-static":
        raise UsageError(f"{fmt} (static int8 activation scales) is a TensorRT pattern; the ort flavour has none.",
                         "Use w8a8 (dynamic activation scales, DynamicQuantizeMatMul) for the ort flavour.")
    return "DynamicQuantizeMatMul" if fmt.group_size is None else "MatMulNBits"


def _init_name(node: str) -> str:
    return node.lstrip("/").replace("/", ".")


def _add_bias(g: GraphBuilder, y: str, lin: QuantLinear, name: str) -> str:
    if lin.bias is None:
        return y
    b = g.const(_init_name(name) + ".bias", lin.bias.numpy().astype(np.float32))
    return g.one("Add", [y, b], name.rsplit("/", 1)[0] + "/Add")


def _emit_matmul(g: GraphBuilder, x: str, lin: QuantLinear, name: str) -> str:
    w = g.const(_init_name(name) + ".weight", lin.weight.numpy().T.astype(np.float32), dedupe=True)
    return _add_bias(g, g.one("MatMul", [x, w], name), lin, name)


def _emit_nbits(g: GraphBuilder, x: str, lin: QuantLinear, name: str) -> str:
    fmt, arrays = lin.fmt, matmul_nbits_arrays(lin.quantized)
    base = _init_name(name)
    # dedupe: a tied lm_head and embedding quantized alike share one copy of the weights
    inputs = [x, g.const(f"{base}.weight_Q{fmt.weight_bits}", arrays["B"], dedupe=True),
              g.const(f"{base}.weight_scales", arrays["scales"], dedupe=True)]
    if "zero_points" in arrays:
        inputs.append(g.const(f"{base}.weight_zp", arrays["zero_points"], dedupe=True))
    y = g.one("MatMulNBits", inputs, name, domain=MS_DOMAIN, K=lin.in_features, N=lin.out_features,
              bits=fmt.weight_bits, block_size=fmt.group_size, accuracy_level=4 if fmt.act == "int8-block" else 0)
    return _add_bias(g, y, lin, name)


def _emit_dqmm(g: GraphBuilder, x: str, lin: QuantLinear, name: str) -> str:
    q = lin.quantized
    base = _init_name(name)
    # Weights go in as uint8 with zero point 128 (codes -127..127 -> 1..255, exactly the same values):
    # ORT's u8s8 kernel on AVX2 CPUs without VNNI sums pairs of u8*s8 products in saturating int16
    # (vpmaddubsw), which clips large activations times large weights; u8u8 widens first and is exact
    # on every x86 CPU.
    w = g.const(f"{base}.weight_uint8", (q.codes.numpy().T.astype(np.int16) + 128).astype(np.uint8))
    s = g.const(f"{base}.weight_scale", q.scales.numpy().reshape(-1).astype(np.float32))
    zp = g.const(f"{base}.weight_zp", np.full(q.scales.numel(), 128, dtype=np.uint8))
    inputs = [x, w, s, zp]
    if lin.bias is not None:
        inputs.append(g.const(f"{base}.bias", lin.bias.numpy().astype(np.float32)))
    return g.one("DynamicQuantizeMatMul", inputs, name, domain=MS_DOMAIN)


ORT_KERNELS.register("MatMul", _emit_matmul)
ORT_KERNELS.register("MatMulNBits", _emit_nbits)
ORT_KERNELS.register("DynamicQuantizeMatMul", _emit_dqmm)


def emit_linear(g: GraphBuilder, x: str, lin: QuantLinear, name: str) -> str:
    """Emit one linear layer with the kernel its format maps to; return the output name."""
    return ORT_KERNELS.get(ort_kernel(lin.fmt))(g, x, lin, name)


def _packed(lins: list[QuantLinear]) -> QuantLinear | None:
    """q, k, v as one linear (concatenated rows) when they share a format, as genai packs them."""
    fmt = lins[0].fmt
    if any(lin.fmt != fmt for lin in lins) or any((lin.bias is None) != (lins[0].bias is None) for lin in lins):
        return None
    import torch

    bias = torch.cat([lin.bias for lin in lins]) if lins[0].bias is not None else None
    if lins[0].quantized is None:
        return QuantLinear(torch.cat([lin.weight for lin in lins]), bias, fmt)
    from llmshrink.compressor.quant import QuantizedWeight

    qs = [lin.quantized for lin in lins]
    zeros = torch.cat([q.zeros for q in qs]) if qs[0].zeros is not None else None
    return QuantLinear.from_quantized(
        QuantizedWeight(torch.cat([q.codes for q in qs]), torch.cat([q.scales for q in qs]), zeros, fmt), bias)


def _emit_embedding(g: GraphBuilder, ids: str, cm: CompressedModel) -> str:
    """Gather for float tables; GatherBlockQuantized for w4g*/w8g* tables.

    The quantized table is stored exactly as MatMulNBits stores a [vocab,
    hidden] weight (viewed as [vocab, hidden*bits/8]), so a tied lm_head in
    the same format shares it through GraphBuilder's deduplication.
    """
    emb = cm.embedding
    if emb.quantized is None:
        head = cm.lm_head
        if (head.quantized is None and head.fmt.weight_bits == 32 and emb.fmt.weight_bits == 32
                and head.bias is None and head.weight.shape == emb.weight.shape and bool((head.weight == emb.weight).all())):
            # Tied fp32 table: store the lm_head's [H, V] weight once and gather from its
            # transpose (ORT folds the Transpose at load), as onnxruntime-genai does.
            shared = g.const("lm_head.MatMul.weight", head.weight.numpy().T.astype(np.float32), dedupe=True)
            table = g.one("Transpose", [shared], "/model/embed_tokens/Transpose", perm=[1, 0])
        else:
            table = g.const("model.embed_tokens.weight", emb.weight.numpy())
        return g.one("Gather", [table, ids], "/model/embed_tokens/Gather")
    arrays = matmul_nbits_arrays(emb.quantized)
    vocab = emb.out_features
    shared_b = g.const(f"model.embed_tokens.weight_Q{emb.fmt.weight_bits}", arrays["B"], dedupe=True)
    shape = g.const("/model/constants/INT64/embed_rows", np.array([vocab, -1], np.int64))
    data = g.one("Reshape", [shared_b, shape], "/model/embed_tokens/Reshape")
    scales = g.const("model.embed_tokens.weight_scales", arrays["scales"], dedupe=True)
    scales = g.one("Reshape", [scales, shape], "/model/embed_tokens/ScalesReshape")
    inputs = [data, ids, scales]
    if "zero_points" in arrays:
        zp = g.const("model.embed_tokens.weight_zp", arrays["zero_points"], dedupe=True)
        inputs.append(g.one("Reshape", [zp, shape], "/model/embed_tokens/ZpReshape"))
    return g.one("GatherBlockQuantized", inputs, "/model/embed_tokens/GatherBlockQuantized", domain=MS_DOMAIN,
                 bits=emb.fmt.weight_bits, block_size=emb.fmt.group_size, gather_axis=0, quantize_axis=1)


def _skip_norm(g: GraphBuilder, residual: str, delta: str, weight: str, name: str, eps: float) -> tuple[str, str]:
    """SkipSimplifiedLayerNormalization: (normalized, residual + delta).

    Outputs 1 and 2 (mean, inverse std) stay unnamed, as onnxruntime-genai's
    builder leaves them: a named output is computed and written, which cost
    4 us per node (0.26 ms per SmolLM2 decode step, 3 % of an int4 step).
    """
    outs = g.node("SkipSimplifiedLayerNormalization", [residual, delta, weight], name,
                  outputs=[f"{name}/output_0", "", "", f"{name}/output_3"], domain=MS_DOMAIN, epsilon=eps)
    return outs[0], outs[3]


def rotary_cache(inv_freq: np.ndarray, scaling: float, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """GQA's cos/sin caches ``[max_length, head_dim/2]`` for the kept rotary frequencies."""
    freqs = np.outer(np.arange(max_length, dtype=np.float32), inv_freq.astype(np.float32))
    return (np.cos(freqs) * scaling).astype(np.float32), (np.sin(freqs) * scaling).astype(np.float32)


def check_spec(spec) -> None:
    """Raise UsageError if ``spec`` has a shape or format ORT's CPU kernels cannot run.

    GroupQueryAttention with rotary caches needs head_dim % 16 == 0; fp16
    linears have no CPU kernel. Cheap: call it before loading any weights.
    """
    for i in spec.kept_layers():
        ls = spec.layers[i]
        if ls.head_dim % 16:
            raise UsageError(f"Layer {i} has head_dim {ls.head_dim}; ONNX Runtime's GroupQueryAttention "
                             "with rotary needs a multiple of 16.", "Choose head sizes in steps of 16.")
    for name in sorted(spec.formats_used() - {spec.embedding}):  # sorted: the same complaint on every run
        ort_kernel(parse_format(name))


def build_ort_graph(cm: CompressedModel, *, max_length: int = DEFAULT_MAX_LENGTH) -> onnx.ModelProto:
    """Build the ``ort``-flavour decoder graph of ``cm`` (see module docstring)."""
    check_spec(cm.spec)
    meta, g = cm.meta, GraphBuilder("llmshrink_decoder")
    vocab = cm.embed.shape[0]
    ids = g.input("input_ids", INT64, ["batch_size", "sequence_length"])
    mask = g.input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
    keep = g.input("logits_to_keep", INT64, [1])
    one_vec = g.const("/model/constants/INT64/[1]", np.array([1], np.int64))
    one = g.const("/model/constants/INT64/1", np.array(1, np.int64))
    # GroupQueryAttention wants seqlens_k = total length - 1 (int32, per batch row) and the total length.
    sub = "/model/attn_mask_reformat/attn_mask_subgraph"
    total = g.one("ReduceSum", [mask, one_vec], f"{sub}/ReduceSum", keepdims=0)
    seqlens_k = g.one("Cast", [g.one("Sub", [total, one_vec], f"{sub}/Sub")], f"{sub}/Sub/Cast", to=INT32)
    shape = g.one("Shape", [mask], f"{sub}/Shape")
    total_len = g.one("Cast", [g.one("Gather", [shape, one], f"{sub}/Gather", axis=0)], f"{sub}/Gather/Cast", to=INT32)

    x = _emit_embedding(g, ids, cm)
    residual, delta = x, None
    for j, b in enumerate(cm.blocks):
        p = f"/model/layers.{j}"
        w_in = g.const(f"model.layers.{j}.input_layernorm.weight", b.input_norm.numpy())
        if delta is None:
            h = g.one("SimplifiedLayerNormalization", [residual, w_in], f"{p}/input_layernorm/LayerNorm",
                      epsilon=meta.rms_norm_eps, axis=-1, stash_type=1)
        else:
            h, residual = _skip_norm(g, residual, delta, w_in, f"{p}/input_layernorm/SkipLayerNorm", meta.rms_norm_eps)
        qkv = [b.q_proj, b.k_proj, b.v_proj]
        packed = _packed(qkv)
        if packed is not None:
            q, k, v = emit_linear(g, h, packed, f"{p}/attn/qkv_proj/MatMul"), "", ""
        else:
            q, k, v = (emit_linear(g, h, lin, f"{p}/attn/{n}/MatMul") for lin, n in zip(qkv, ("q_proj", "k_proj", "v_proj"), strict=True))
        cos, sin = rotary_cache(b.inv_freq.numpy(), meta.rope_attention_scaling, max_length)
        cos = g.const(f"model.layers.{j}.attn.cos_cache", cos, dedupe=True)
        sin = g.const(f"model.layers.{j}.attn.sin_cache", sin, dedupe=True)
        past_k = g.input(f"past_key_values.{j}.key", FLOAT, ["batch_size", b.num_kv_heads, "past_sequence_length", b.head_dim])
        past_v = g.input(f"past_key_values.{j}.value", FLOAT, ["batch_size", b.num_kv_heads, "past_sequence_length", b.head_dim])
        attn, *_ = g.node("GroupQueryAttention", [q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin],
                          f"{p}/attn/GroupQueryAttention",
                          outputs=[f"{p}/attn/GroupQueryAttention/output_0", f"present.{j}.key", f"present.{j}.value"],
                          domain=MS_DOMAIN, num_heads=b.num_heads, kv_num_heads=b.num_kv_heads,
                          scale=float(meta.attention_scale), do_rotary=1, rotary_interleaved=0, local_window_size=-1)
        for kv in ("key", "value"):
            g.output(f"present.{j}.{kv}", FLOAT, ["batch_size", b.num_kv_heads, "total_sequence_length", b.head_dim])
        o = emit_linear(g, attn, b.o_proj, f"{p}/attn/o_proj/MatMul")
        w_post = g.const(f"model.layers.{j}.post_attention_layernorm.weight", b.post_norm.numpy())
        h, residual = _skip_norm(g, residual, o, w_post, f"{p}/post_attention_layernorm/SkipLayerNorm", meta.rms_norm_eps)
        gate = emit_linear(g, h, b.gate_proj, f"{p}/mlp/gate_proj/MatMul")
        up = emit_linear(g, h, b.up_proj, f"{p}/mlp/up_proj/MatMul")
        sig = g.one("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")
        act = g.one("Mul", [gate, sig], f"{p}/mlp/act_fn/Mul")
        delta = emit_linear(g, g.one("Mul", [act, up], f"{p}/mlp/Mul"), b.down_proj, f"{p}/mlp/down_proj/MatMul")
    w_final = g.const("model.norm.weight", cm.final_norm.numpy())
    n = len(cm.blocks)
    h = g.node("SkipSimplifiedLayerNormalization", [residual, delta, w_final], f"/model/layers.{n}/final_norm_layernorm/SkipLayerNorm",
               outputs=1, domain=MS_DOMAIN, epsilon=meta.rms_norm_eps)[0]
    # Only the last `logits_to_keep` positions go through the lm_head: a prompt
    # needs one row of logits to pick the next token, and the lm_head of a
    # 49k vocabulary is a large share of a prefill.
    big = g.const("/model/constants/INT64/[max]", np.array([np.iinfo(np.int64).max], np.int64))
    start = g.one("Neg", [keep], "/model/logits_to_keep/Neg")
    h = g.one("Slice", [h, start, big, one_vec], "/model/logits_to_keep/Slice")
    emit_linear(g, h, cm.lm_head, "/lm_head/MatMul")
    g.nodes[-1].output[0] = "logits"  # the graph output keeps its conventional name
    g.output("logits", FLOAT, ["batch_size", "sequence_length", vocab])
    g.outputs.insert(0, g.outputs.pop())  # logits first, as onnxruntime-genai orders them
    return g.model(doc=f"llmshrink ort flavour; spec {cm.spec.fingerprint()}; max_length {max_length}")
