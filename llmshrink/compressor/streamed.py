"""GPTQ with the weights streamed from disk, one decoder layer at a time (see :mod:`.sequential`).

It sits above both :mod:`.materialize` (how a block is sliced from an HF layer) and :mod:`.sequential` (how a
block is quantized, stage by stage), which know nothing of each other.
"""

from __future__ import annotations

import torch

from llmshrink.compressor.gptq import GPTQConfig
from llmshrink.compressor.materialize import build_block, model_meta, rope_params
from llmshrink.compressor.model import QuantLinear
from llmshrink.compressor.quant import QuantizedWeight
from llmshrink.compressor.sequential import (
    BATCH,
    GROUPS_ALL,
    head_hessian,
    quantize_block,
    quantizer_for,
)
from llmshrink.formats import FP32, QuantFormat, parse_format
from llmshrink.progress import NULL_PROGRESS, Progress


@torch.no_grad()
def gptq_streamed(lazy, spec, calib: torch.Tensor, *, config: GPTQConfig | None = None,
                  progress: Progress = NULL_PROGRESS) -> dict[str, QuantizedWeight]:
    """GPTQ of ``spec``'s integer linears with the weights streamed from disk, one decoder layer at a time.

    The same computation as :func:`gptq_quantize` on ``materialize(model, spec, quantizer="gptq")`` (same
    slicing, same stages, same Hessians: equal codes), but only the embedding, the layer being quantized and
    the codes made so far are in memory, never the whole float model.

    Args:
        lazy: a :class:`~llmshrink.models.lazy.LazyModel`.
        calib: token ids ``[N, T]``.

    Returns:
        module name (``blocks.{j}.{linear}``, ``lm_head``) -> its :class:`QuantizedWeight`, for every linear of
        the spec in an integer format.

    Raises:
        ValueError: no calibration tokens, or a spec with static activation scales (``w8a8s``: their
            calibration runs on the whole quantized model).
    """
    if not calib.numel():
        raise ValueError("GPTQ needs calibration tokens")
    fmts = {parse_format(f) for f in spec.formats_used(embedding=False)}
    if any(f.act == "int8-static" for f in fmts):
        raise ValueError("layer streaming does not calibrate static activation scales (w8a8s): use the "
                         "whole-model path")
    config = config or GPTQConfig()
    meta = model_meta(lazy.model)
    inv_freq, _ = rope_params(lazy.model)
    hidden = torch.tensor(spec.hidden_channels(), dtype=torch.long)
    embedding = QuantLinear(lazy.tensor("model.embed_tokens.weight")[:, hidden], None, parse_format(spec.embedding))
    xs = [torch.nn.functional.embedding(b, embedding.weight) for b in calib.split(BATCH)]
    del embedding
    formats: dict[str, QuantFormat] = {}
    quantize = quantizer_for(formats, config)
    out: dict[str, QuantizedWeight] = {}
    kept = spec.kept_layers()
    with progress.task("GPTQ (layer by layer, streamed)", total=len(kept) + 1) as task:
        for j, i in enumerate(kept):
            layer = lazy.layer(i)

            def linear(name, w, b, fmt, j=j):
                if fmt.is_float:
                    return QuantLinear(w, b, fmt)
                formats[f"blocks.{j}.{name}"] = fmt
                return QuantLinear(w, b, FP32)

            block = build_block(spec, i, layer, hidden, inv_freq, linear)
            lazy.release(layer)
            xs = quantize_block(block, j, xs, formats, quantize, meta)
            out.update({f"blocks.{j}.{n}": getattr(block, n).quantized for n in GROUPS_ALL
                        if f"blocks.{j}.{n}" in formats})
            del block
            task.advance(1)
        head_fmt = parse_format(spec.lm_head)
        if not head_fmt.is_float:
            formats["lm_head"] = head_fmt
            final_norm = lazy.tensor("model.norm.weight")[hidden]
            head = QuantLinear(lazy.tensor("lm_head.weight")[:, hidden], None, FP32)
            out["lm_head"] = quantize("lm_head", head, head_hessian(xs, final_norm, meta)).quantized
        task.advance(1)
    return out
