"""A CompressedModel with random weights, for latency profiling.

Latency of a dense decoder does not depend on weight values, only on shapes,
formats and graph structure. Profiling builds many whole-model graphs through
the real exporter, so it needs CompressedModels of any spec in well under a
second each, without a checkpoint and without the quantizer's scale search.
Codes are drawn uniformly in each format's range; a tied base model keeps
its embedding and lm_head tied so the exported graph shares them as a real
export does.
"""

from __future__ import annotations

import math

import torch

from llmshrink.compressor.model import Block, CompressedModel, ModelMeta, QuantLinear
from llmshrink.compressor.quant import QuantizedWeight
from llmshrink.formats import QuantFormat, parse_format
from llmshrink.spec import SubnetSpec


def random_linear(n: int, k: int, fmt: QuantFormat, gen: torch.Generator) -> QuantLinear:
    """A ``k -> n`` QuantLinear in ``fmt`` with random weights (no bias)."""
    if fmt.is_float:
        return QuantLinear(torch.randn(n, k, generator=gen) * k ** -0.5, None, fmt)
    bits = fmt.weight_bits
    g = fmt.group_size or k
    scales = torch.rand(n, k // g, generator=gen) * 0.01 + 1e-3
    if not fmt.symmetric:
        codes = torch.randint(0, 2 ** bits, (n, k), generator=gen, dtype=torch.int16)
        zeros = torch.randint(0, 2 ** bits, (n, k // g), generator=gen, dtype=torch.int16)
    else:
        top = 2 ** (bits - 1) - 1
        codes = torch.randint(-top, top + 1, (n, k), generator=gen, dtype=torch.int16)
        zeros = None
    return QuantLinear.from_quantized(QuantizedWeight(codes, scales, zeros, fmt), None)


def random_model(spec: SubnetSpec, seed: int = 0) -> CompressedModel:
    """A :class:`CompressedModel` of ``spec`` with random weights (see module docstring)."""
    spec.validate()
    gen = torch.Generator().manual_seed(seed)
    base, h = spec.base, spec.hidden_size
    meta = ModelMeta(rms_norm_eps=1e-5, rope_attention_scaling=1.0, attention_scale=1.0 / math.sqrt(base.head_dim),
                     bos_token_id=None, eos_token_ids=(), max_position_embeddings=8192)
    blocks = []
    for i in spec.kept_layers():
        ls = spec.layers[i]
        q, kv = ls.num_heads * ls.head_dim, ls.num_kv_heads * ls.head_dim
        shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                  "gate_proj": (ls.intermediate_size, h), "up_proj": (ls.intermediate_size, h),
                  "down_proj": (h, ls.intermediate_size)}
        linears = {name: random_linear(n, k, ls.fmt(name), gen) for name, (n, k) in shapes.items()}
        inv_freq = 1.0 / 10000 ** (torch.arange(0, ls.head_dim, 2).float() / ls.head_dim)
        blocks.append(Block(ls.num_heads, ls.num_kv_heads, ls.head_dim, linears, torch.ones(h), torch.ones(h), inv_freq))
    emb_fmt, head_fmt = parse_format(spec.embedding), parse_format(spec.lm_head)
    lm_head = random_linear(base.vocab_size, h, head_fmt, gen)
    if base.tied_embeddings and emb_fmt == head_fmt:
        embedding = lm_head
    elif base.tied_embeddings and emb_fmt.is_float and head_fmt.is_float:
        embedding = QuantLinear(lm_head.weight, None, emb_fmt)
    else:
        embedding = random_linear(base.vocab_size, h, emb_fmt, gen)
    return CompressedModel(spec, meta, embedding, blocks, torch.ones(h), lm_head).eval()
