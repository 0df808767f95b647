"""Measure ONNX Runtime CPU op latencies *in context*, with the exporter's own emitters.

Each measurement builds a small graph out of the very node patterns the ``ort``
flavour emits (``emit_linear``, GroupQueryAttention, SkipSimplifiedLayerNorm)
and times it like the shipped model runs: 2 threads (or as asked), warm-up,
median of repeated runs. "In context" means the weights stream from memory as
in the real model: a linear is measured inside a chain of many distinct
layers whose weights together exceed the last-level cache, and attention reads
one KV cache per layer, as many as a real model has. A cache-hot single op
would be several times too fast on a CPU with a 32 MB L3.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from llmshrink.compressor.model import QuantLinear
from llmshrink.exporters.graph import FLOAT, MS_DOMAIN, GraphBuilder
from llmshrink.formats import parse_format

CACHE_BYTES = 96 << 20  # weights per chain: ~3x a 32 MB L3, so nothing stays cache-hot
MAX_CHAIN = 160
MIN_CHAIN = 8


@dataclass(frozen=True)
class Timing:
    """Median and spread of one op, from a chain of ``count`` copies."""

    median_s: float
    std_s: float
    runs: int
    count: int


def _session(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _time(sess, feeds: dict, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        sess.run(None, feeds)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        out.append(time.perf_counter() - t0)
    return out


def fanout_count(k: int, n: int, fmt: str) -> int:
    """How many distinct K->N linears a measurement needs for their weights to exceed CACHE_BYTES."""
    per = k * n * parse_format(fmt).bits_per_weight() / 8
    return int(min(MAX_CHAIN, max(MIN_CHAIN, np.ceil(CACHE_BYTES / per))))


def time_linear(k: int, n: int, fmt: str, rows: int, *, threads: int = 2, runs: int = 20, warmup: int = 3,
                seed: int = 0) -> Timing:
    """Per-op time of a K->N linear in ``fmt`` on ``rows`` tokens.

    ``fanout_count`` distinct copies read the same input (as a layer's linears
    read one normalized activation) and their weights together exceed the
    cache, so each op streams its weights from memory as in a real model.
    Each output is reduced to a scalar so that copying outputs out of the
    session does not count; the reduction reads rows x N floats, negligible
    next to the K x N weights.
    """
    from llmshrink.exporters.onnx_ort import emit_linear

    count = fanout_count(k, n, fmt)
    g = GraphBuilder("linear_fanout")
    x = g.input("x", FLOAT, [rows, k])
    gen = torch.Generator().manual_seed(seed)
    f = parse_format(fmt)
    for i in range(count):
        lin = QuantLinear(torch.randn(n, k, generator=gen) * 0.05, None, f)
        y = emit_linear(g, x, lin, f"/fanout/{i}/MatMul")
        g.output(g.one("ReduceSum", [y], f"/fanout/{i}/ReduceSum", keepdims=0), FLOAT, [])
    sess = _session(g.model().SerializeToString(), threads)
    feeds = {"x": np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)}
    times = np.asarray(_time(sess, feeds, runs, warmup)) / count
    return Timing(float(np.median(times)), float(times.std()), runs, count)


def time_attention(num_heads: int, kv_heads: int, head_dim: int, context: int, new_tokens: int, *,
                   layers: int = 30, threads: int = 2, runs: int = 20, warmup: int = 3, seed: int = 0) -> Timing:
    """Per-layer time of GroupQueryAttention with rotary: ``new_tokens`` after ``context`` cached ones.

    ``layers`` copies each read their own KV cache (as a real model's layers
    do) and share one packed qkv input; decode is new_tokens=1, a prompt is
    context=0.
    """
    g = GraphBuilder("attention")
    total = context + new_tokens
    width = (num_heads + 2 * kv_heads) * head_dim
    qkv = g.input("qkv", FLOAT, [1, new_tokens, width])
    seqlens = g.const("seqlens_k", np.array([total - 1], np.int32))
    total_len = g.const("total_len", np.array(total, np.int32))
    freqs = np.outer(np.arange(max(total, 1), dtype=np.float32), 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim))
    cos = g.const("cos", np.cos(freqs).astype(np.float32))
    sin = g.const("sin", np.sin(freqs).astype(np.float32))
    rng = np.random.default_rng(seed)
    feeds = {"qkv": rng.standard_normal((1, new_tokens, width)).astype(np.float32)}
    for j in range(layers):
        pk = g.input(f"past_k{j}", FLOAT, [1, kv_heads, context, head_dim])
        pv = g.input(f"past_v{j}", FLOAT, [1, kv_heads, context, head_dim])
        feeds[pk] = rng.standard_normal((1, kv_heads, context, head_dim)).astype(np.float32)
        feeds[pv] = rng.standard_normal((1, kv_heads, context, head_dim)).astype(np.float32)
        out = g.node("GroupQueryAttention", [qkv, "", "", pk, pv, seqlens, total_len, cos, sin], f"/attn/{j}",
                     outputs=3, domain=MS_DOMAIN, num_heads=num_heads, kv_num_heads=kv_heads,
                     scale=float(head_dim ** -0.5), do_rotary=1, rotary_interleaved=0, local_window_size=-1)
        g.output(out[0], FLOAT, [1, new_tokens, num_heads * head_dim])
    sess = _session(g.model().SerializeToString(), threads)
    times = np.asarray(_time(sess, feeds, runs, warmup)) / layers
    return Timing(float(np.median(times)), float(times.std()), runs, layers)


def time_layer_glue(hidden: int, mlp: int, tokens: int, *, layers: int = 30, threads: int = 2, runs: int = 20,
                    warmup: int = 3, seed: int = 0) -> Timing:
    """Per-layer time of everything in a layer but the linears and attention.

    Two SkipSimplifiedLayerNormalization (hidden) and the SwiGLU glue
    (Sigmoid, Mul, Mul over the MLP width), chained over ``layers`` layers.
    """
    g = GraphBuilder("glue")
    rng = np.random.default_rng(seed)
    x = g.input("x", FLOAT, [1, tokens, hidden])
    gate = g.input("gate", FLOAT, [1, tokens, mlp])
    up = g.input("up", FLOAT, [1, tokens, mlp])
    residual, delta = x, x
    for j in range(layers):
        w = g.const(f"w{j}", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        for part in ("in", "post"):
            outs = g.node("SkipSimplifiedLayerNormalization", [residual, delta, w], f"/l{j}/{part}/SkipLayerNorm",
                          outputs=4, domain=MS_DOMAIN, epsilon=1e-5)
            delta, residual = outs[0], outs[3]
        act = g.one("Mul", [gate, g.one("Sigmoid", [gate], f"/l{j}/Sigmoid")], f"/l{j}/Silu")
        g.output(g.one("Mul", [act, up], f"/l{j}/Mul"), FLOAT, [1, tokens, mlp])
    g.output(delta, FLOAT, [1, tokens, hidden])
    sess = _session(g.model().SerializeToString(), threads)
    feeds = {k: rng.standard_normal(shape).astype(np.float32)
             for k, shape in (("x", (1, tokens, hidden)), ("gate", (1, tokens, mlp)), ("up", (1, tokens, mlp)))}
    times = np.asarray(_time(sess, feeds, runs, warmup)) / layers
    return Timing(float(np.median(times)), float(times.std()), runs, layers)
