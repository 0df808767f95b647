"""The ``trt`` flavour: a CompressedModel as a standard-ONNX decoder TensorRT 10 accepts.

Only default-domain opset-21 operators: no contrib ops. Linear layers are
fp16 MatMuls, fp32 MatMuls, W4A16 (symmetric blockwise INT4 weights
through ``DequantizeLinear`` with ``block_size`` along K, the pattern
TensorRT fuses into its INT4 weight-only GEMM) or W8A8 (``w8a8s``: the fp16
input through QuantizeLinear/DequantizeLinear with its calibrated per-tensor
scale, int8 weights through a per-output-channel DequantizeLinear — the
explicit-quantization pattern TensorRT runs as an INT8 GEMM). Matmul inputs and the KV
cache are fp16; the residual stream, the RMS norms and the softmax run in
fp32. The same graph runs in ONNX Runtime CPU, which is how it is checked
against the torch model here.

Interface as the ``ort`` flavour (``input_ids``, ``attention_mask``,
``logits_to_keep``, ``past_key_values.{j}.*`` -> ``logits``, ``present.{j}.*``)
except that the cache is float16 and grows by concatenation.

One attention block::

    h ─► q,k,v ─► rope(q), rope(k) ─► k,v = concat(past, new) ─► present
         q ─► [B, kv, rep, S, hd] · kᵀ [B, kv, 1, hd, T] ─► ×scale + causal mask ─► softmax(fp32)
           ─► · v [B, kv, 1, T, hd] ─► [B, S, heads·hd] ─► o_proj
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from llmshrink.compressor.model import CompressedModel, QuantLinear
from llmshrink.errors import UsageError
from llmshrink.exporters.graph import FLOAT, INT64, GraphBuilder
from llmshrink.formats import QuantFormat, parse_format
from llmshrink.registry import Registry

FP16 = TensorProto.FLOAT16
INT4 = TensorProto.INT4
TRT_FORMATS = ("fp32", "fp16", "w4g32", "w4g64", "w4g128", "w8a8s")

LinearEmitter = Callable[[GraphBuilder, str, QuantLinear, str], str]
TRT_KERNELS: Registry[LinearEmitter] = Registry("TensorRT linear pattern")


def trt_pattern(fmt: QuantFormat) -> str:
    """The TensorRT pattern that runs ``fmt``: ``fp16``, ``fp32``, ``w4a16`` or ``w8a8``."""
    if fmt.name in ("fp32", "fp16"):
        return fmt.name
    if fmt.weight_bits == 4 and fmt.group_size and fmt.symmetric and fmt.act == "none":
        return "w4a16"
    if fmt.act == "int8-static":
        return "w8a8"
    hint = " (w8a8 quantizes activations dynamically; TensorRT needs static scales: w8a8s)" if fmt.name == "w8a8" else ""
    raise UsageError(f"{fmt} has no TensorRT pattern in the trt flavour{hint}.", f"Use {', '.join(TRT_FORMATS)}.")


def check_spec(spec) -> None:
    """Raise UsageError if ``spec`` uses a format the trt flavour cannot express."""
    for name in sorted(spec.formats_used() - {spec.embedding}):  # sorted: the same complaint on every run
        trt_pattern(parse_format(name))
    if not parse_format(spec.embedding).is_float:
        raise UsageError(f"Embedding format {spec.embedding} has no TensorRT pattern (Gather on INT4/INT8 tables).",
                         "Use fp16 or fp32 for the embedding in the trt flavour.")


def _base(name: str) -> str:
    return name.lstrip("/").replace("/", ".")


def _emit_fp16(g: GraphBuilder, x: str, lin: QuantLinear, name: str) -> str:
    w = g.const(_base(name) + ".weight", lin.weight.numpy().T.astype(np.float16))
    return _bias(g, g.one("MatMul", [x, w], name), lin, name)


def _emit_fp32(g: GraphBuilder, x: str, lin: QuantLinear, name: str) -> str:
    w = g.const(_base(name) + ".weight", lin.weight.numpy().T.astype(np.float32))
    x32 = g.one("Cast", [x], name + "/InputCast", to=FLOAT)
    y = g.one("MatMul", [x32, w], name)
    return _bias(g, g.one("Cast", [y], name + "/OutputCast", to=FP16), lin, name)


def _emit_w4a16(g: GraphBuilder, x: str, lin: QuantLinear, name: str) -> str:
    q = lin.quantized
    group = lin.fmt.group_size
    codes = q.codes.numpy().T.astype(np.int8)  # [K, N], values in [-8, 7]
    packed = _pack_int4(codes)
    w = _base(name) + ".weight_int4"
    g.initializers[w] = helper.make_tensor(w, INT4, list(codes.shape), packed.tobytes(), raw=True)
    scales = q.scales.numpy().T.astype(np.float16)  # [K / group, N]
    s = g.const(_base(name) + ".weight_scale", scales)
    deq = g.one("DequantizeLinear", [w, s], name + "/DequantizeLinear", axis=0, block_size=group)
    return _bias(g, g.one("MatMul", [x, deq], name), lin, name)


def _emit_w8a8(g: GraphBuilder, x: str, lin: QuantLinear, name: str) -> str:
    """INT8 GEMM: activations through Q/DQ with the calibrated per-tensor scale, weights int8 per channel.

    Zero points are int8 zeros (they fix QuantizeLinear's output type; TensorRT requires them zero).
    """
    if lin.act_scale is None:
        raise UsageError(f"{name}: a w8a8s layer without a calibrated activation scale.",
                         "Materialize with calibration tokens (calibrate_activations) before exporting.")
    base, q = _base(name), lin.quantized
    s_x = g.scalar(base + ".input_scale", float(lin.act_scale), np.float16)
    zp = g.scalar("/model/constants/INT8/scalar0", 0, np.int8, dedupe=True)
    xq = g.one("QuantizeLinear", [x, s_x, zp], name + "/InputQuantizeLinear")
    xd = g.one("DequantizeLinear", [xq, s_x, zp], name + "/InputDequantizeLinear")
    w = g.const(base + ".weight_int8", q.codes.numpy().T.astype(np.int8))  # [K, N], codes in [-127, 127]
    s_w = g.const(base + ".weight_scale", q.scales.numpy().reshape(-1).astype(np.float16))  # [N]
    wd = g.one("DequantizeLinear", [w, s_w], name + "/DequantizeLinear", axis=1)
    return _bias(g, g.one("MatMul", [xd, wd], name), lin, name)


def _pack_int4(codes: np.ndarray) -> np.ndarray:
    """ONNX INT4 raw data: two's-complement nibbles, element 2i in the low nibble of byte i."""
    flat = (codes.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def _bias(g: GraphBuilder, y: str, lin: QuantLinear, name: str) -> str:
    if lin.bias is None:
        return y
    b = g.const(_base(name) + ".bias", lin.bias.numpy().astype(np.float16))
    return g.one("Add", [y, b], name.rsplit("/", 1)[0] + "/Add")


TRT_KERNELS.register("fp16", _emit_fp16)
TRT_KERNELS.register("fp32", _emit_fp32)
TRT_KERNELS.register("w4a16", _emit_w4a16)
TRT_KERNELS.register("w8a8", _emit_w8a8)


def emit_linear(g: GraphBuilder, x: str, lin: QuantLinear, name: str) -> str:
    """fp16 in, fp16 out, with the pattern of the layer's format."""
    return TRT_KERNELS.get(trt_pattern(lin.fmt))(g, x, lin, name)


class _Consts:
    """Small shared constants, created once."""

    def __init__(self, g: GraphBuilder) -> None:
        c = lambda n, v: g.const(f"/model/constants/{n}", v, dedupe=True)  # noqa: E731
        self.axes_last = c("INT64/[-1]", np.array([-1], np.int64))
        self.zero = c("INT64/0", np.array(0, np.int64))
        self.one = c("INT64/1", np.array(1, np.int64))
        self.one_vec = c("INT64/[1]", np.array([1], np.int64))
        self.big = c("INT64/[max]", np.array([np.iinfo(np.int64).max], np.int64))
        self.neg_inf = c("FLOAT/-inf", np.array(-np.inf, np.float32))
        self.f_zero = c("FLOAT/0", np.array(0.0, np.float32))


def _rms_norm(g: GraphBuilder, x32: str, weight: np.ndarray, eps: float, name: str, k: _Consts) -> str:
    """fp32 RMSNorm: x / sqrt(mean(x²) + eps) * w (opset 21 has no RMSNormalization)."""
    sq = g.one("Mul", [x32, x32], f"{name}/Mul")
    var = g.one("ReduceMean", [sq, k.axes_last], f"{name}/ReduceMean", keepdims=1)
    eps_c = g.const(f"{_base(name)}.eps", np.array(eps, np.float32), dedupe=True)
    std = g.one("Sqrt", [g.one("Add", [var, eps_c], f"{name}/Add")], f"{name}/Sqrt")
    w = g.const(f"{_base(name)}.weight", weight.astype(np.float32))
    return g.one("Mul", [g.one("Div", [x32, std], f"{name}/Div"), w], f"{name}/MulWeight")


def _rotate(g: GraphBuilder, x: str, cos: str, sin: str, half: int, name: str) -> str:
    """x·cos + rotate_half(x)·sin on [B, heads, S, hd] fp16 (HF Llama, non-interleaved)."""
    h = g.const(f"/model/constants/INT64/[{half}]", np.array([half], np.int64), dedupe=True)
    last = g.const("/model/constants/INT64/[3]", np.array([3], np.int64), dedupe=True)
    zero = g.const("/model/constants/INT64/[0]", np.array([0], np.int64), dedupe=True)
    big = g.const("/model/constants/INT64/[max]", np.array([np.iinfo(np.int64).max], np.int64), dedupe=True)
    x1 = g.one("Slice", [x, zero, h, last], f"{name}/Slice1")
    x2 = g.one("Slice", [x, h, big, last], f"{name}/Slice2")
    rot = g.one("Concat", [g.one("Neg", [x2], f"{name}/Neg"), x1], f"{name}/Concat", axis=-1)
    return g.one("Add", [g.one("Mul", [x, cos], f"{name}/MulCos"), g.one("Mul", [rot, sin], f"{name}/MulSin")], f"{name}/Add")


def _heads(g: GraphBuilder, t: str, n: int, hd: int, name: str) -> str:
    """[B, S, n*hd] -> [B, n, S, hd]."""
    shape = g.const(f"/model/constants/INT64/[0,0,{n},{hd}]", np.array([0, 0, n, hd], np.int64), dedupe=True)
    return g.one("Transpose", [g.one("Reshape", [t, shape], f"{name}/Reshape")], f"{name}/Transpose", perm=[0, 2, 1, 3])


def build_trt_graph(cm: CompressedModel, *, max_length: int = 2048) -> onnx.ModelProto:
    """Build the ``trt``-flavour decoder graph of ``cm`` (see module docstring)."""
    check_spec(cm.spec)
    meta, g = cm.meta, GraphBuilder("llmshrink_decoder_trt")
    k = _Consts(g)
    ids = g.input("input_ids", INT64, ["batch_size", "sequence_length"])
    mask = g.input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
    keep = g.input("logits_to_keep", INT64, [1])

    # Positions: the new tokens sit at past .. total-1.
    p = "/model/positions"
    total = g.one("Gather", [g.one("Shape", [mask], f"{p}/MaskShape"), k.one], f"{p}/Total", axis=0)
    seq = g.one("Gather", [g.one("Shape", [ids], f"{p}/IdsShape"), k.one], f"{p}/Seq", axis=0)
    past = g.one("Sub", [total, seq], f"{p}/Past")
    pos = g.one("Range", [past, total, k.one], f"{p}/Range")  # [S]
    key_pos = g.one("Range", [k.zero, total, k.one], f"{p}/KeyRange")  # [T]
    # Causal mask [S, T]: 0 where key <= query position, -inf elsewhere.
    allowed = g.one("LessOrEqual", [g.one("Unsqueeze", [key_pos, g.const("/model/constants/INT64/[0]", np.array([0], np.int64), dedupe=True)], f"{p}/KeyUnsq"),
                                    g.one("Unsqueeze", [pos, k.axes_last], f"{p}/QueryUnsq")], f"{p}/Causal")
    causal = g.one("Where", [allowed, k.f_zero, k.neg_inf], f"{p}/CausalMask")

    emb_dtype = np.float16 if parse_format(cm.spec.embedding).weight_bits == 16 else np.float32
    embed = g.const("model.embed_tokens.weight", cm.embed.numpy().astype(emb_dtype))
    x = g.one("Cast", [g.one("Gather", [embed, ids], "/model/embed_tokens/Gather")], "/model/embed_tokens/Cast", to=FLOAT)
    for j, b in enumerate(cm.blocks):
        lp = f"/model/layers.{j}"
        nh, nkv, hd = b.num_heads, b.num_kv_heads, b.head_dim
        rep = nh // nkv
        h = _rms_norm(g, x, b.input_norm.numpy(), meta.rms_norm_eps, f"{lp}/input_layernorm", k)
        h16 = g.one("Cast", [h], f"{lp}/input_layernorm/Cast", to=FP16)
        # Rotary tables for this layer's kept frequencies, gathered at the positions: [S, hd].
        freqs = np.outer(np.arange(max_length, dtype=np.float32), b.inv_freq.numpy().astype(np.float32))
        emb = np.concatenate([freqs, freqs], axis=1)
        cos_t = g.const(f"model.layers.{j}.attn.cos_table", (np.cos(emb) * meta.rope_attention_scaling).astype(np.float16), dedupe=True)
        sin_t = g.const(f"model.layers.{j}.attn.sin_table", (np.sin(emb) * meta.rope_attention_scaling).astype(np.float16), dedupe=True)
        cos = g.one("Gather", [cos_t, pos], f"{lp}/attn/rotary/GatherCos", axis=0)
        sin = g.one("Gather", [sin_t, pos], f"{lp}/attn/rotary/GatherSin", axis=0)

        q = _heads(g, emit_linear(g, h16, b.q_proj, f"{lp}/attn/q_proj/MatMul"), nh, hd, f"{lp}/attn/q")
        kk = _heads(g, emit_linear(g, h16, b.k_proj, f"{lp}/attn/k_proj/MatMul"), nkv, hd, f"{lp}/attn/k")
        v = _heads(g, emit_linear(g, h16, b.v_proj, f"{lp}/attn/v_proj/MatMul"), nkv, hd, f"{lp}/attn/v")
        q = _rotate(g, q, cos, sin, hd // 2, f"{lp}/attn/q_rotary")
        kk = _rotate(g, kk, cos, sin, hd // 2, f"{lp}/attn/k_rotary")
        past_k = g.input(f"past_key_values.{j}.key", FP16, ["batch_size", nkv, "past_sequence_length", hd])
        past_v = g.input(f"past_key_values.{j}.value", FP16, ["batch_size", nkv, "past_sequence_length", hd])
        k_all = g.node("Concat", [past_k, kk], f"{lp}/attn/k_cache/Concat", outputs=[f"present.{j}.key"], axis=2)[0]
        v_all = g.node("Concat", [past_v, v], f"{lp}/attn/v_cache/Concat", outputs=[f"present.{j}.value"], axis=2)[0]
        g.output(k_all, FP16, ["batch_size", nkv, "total_sequence_length", hd])
        g.output(v_all, FP16, ["batch_size", nkv, "total_sequence_length", hd])
        # Grouped attention by broadcasting: q [B, kv, rep, S, hd] against k, v [B, kv, 1, T, hd].
        q5 = g.one("Reshape", [q, g.const(f"/model/constants/INT64/[0,{nkv},{rep},-1,{hd}]", np.array([0, nkv, rep, -1, hd], np.int64), dedupe=True)], f"{lp}/attn/q5")
        two = g.const("/model/constants/INT64/[2]", np.array([2], np.int64), dedupe=True)
        k5 = g.one("Transpose", [g.one("Unsqueeze", [k_all, two], f"{lp}/attn/k5")], f"{lp}/attn/kT", perm=[0, 1, 2, 4, 3])
        v5 = g.one("Unsqueeze", [v_all, two], f"{lp}/attn/v5")
        scores = g.one("Cast", [g.one("MatMul", [q5, k5], f"{lp}/attn/QK")], f"{lp}/attn/QK/Cast", to=FLOAT)
        scale = g.const(f"model.layers.{j}.attn.scale", np.array(meta.attention_scale, np.float32), dedupe=True)
        scores = g.one("Add", [g.one("Mul", [scores, scale], f"{lp}/attn/Scale"), causal], f"{lp}/attn/Mask")
        probs = g.one("Cast", [g.one("Softmax", [scores], f"{lp}/attn/Softmax", axis=-1)], f"{lp}/attn/Softmax/Cast", to=FP16)
        ctx = g.one("MatMul", [probs, v5], f"{lp}/attn/PV")  # [B, kv, rep, S, hd]
        ctx = g.one("Reshape", [ctx, g.const(f"/model/constants/INT64/[0,{nh},-1,{hd}]", np.array([0, nh, -1, hd], np.int64), dedupe=True)], f"{lp}/attn/ctx4")
        ctx = g.one("Transpose", [ctx], f"{lp}/attn/ctx/Transpose", perm=[0, 2, 1, 3])
        ctx = g.one("Reshape", [ctx, g.const(f"/model/constants/INT64/[0,0,{nh * hd}]", np.array([0, 0, nh * hd], np.int64), dedupe=True)], f"{lp}/attn/ctx3")
        o = emit_linear(g, ctx, b.o_proj, f"{lp}/attn/o_proj/MatMul")
        x = g.one("Add", [x, g.one("Cast", [o], f"{lp}/attn/o_proj/Cast", to=FLOAT)], f"{lp}/attn/Residual")
        h = _rms_norm(g, x, b.post_norm.numpy(), meta.rms_norm_eps, f"{lp}/post_attention_layernorm", k)
        h16 = g.one("Cast", [h], f"{lp}/post_attention_layernorm/Cast", to=FP16)
        gate = emit_linear(g, h16, b.gate_proj, f"{lp}/mlp/gate_proj/MatMul")
        up = emit_linear(g, h16, b.up_proj, f"{lp}/mlp/up_proj/MatMul")
        act = g.one("Mul", [gate, g.one("Sigmoid", [gate], f"{lp}/mlp/act_fn/Sigmoid")], f"{lp}/mlp/act_fn/Mul")
        down = emit_linear(g, g.one("Mul", [act, up], f"{lp}/mlp/Mul"), b.down_proj, f"{lp}/mlp/down_proj/MatMul")
        x = g.one("Add", [x, g.one("Cast", [down], f"{lp}/mlp/down_proj/Cast", to=FLOAT)], f"{lp}/mlp/Residual")
    h = _rms_norm(g, x, cm.final_norm.numpy(), meta.rms_norm_eps, "/model/norm", k)
    start = g.one("Neg", [keep], "/model/logits_to_keep/Neg")
    h = g.one("Slice", [h, start, k.big, k.one_vec], "/model/logits_to_keep/Slice")
    h16 = g.one("Cast", [h], "/model/norm/Cast", to=FP16)
    logits16 = emit_linear(g, h16, cm.lm_head, "/lm_head/MatMul")
    g.node("Cast", [logits16], "/lm_head/Cast", outputs=["logits"], to=FLOAT)
    g.output("logits", FLOAT, ["batch_size", "logits_to_keep", cm.embed.shape[0]])
    g.outputs.insert(0, g.outputs.pop())
    return g.model(doc=f"llmshrink trt flavour; spec {cm.spec.fingerprint()}; max_length {max_length}")
