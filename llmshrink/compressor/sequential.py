"""Quantize a float CompressedModel layer by layer with GPTQ, each layer on the inputs the quantized layers before it give.

This is GPTQ's sequential recipe (the reference's ``llama_sequential`` with
``true_sequential``; llm-compressor's "sequential pipeline"): calibration
hidden states enter block 0; within a block the linears are quantized in
the order they run — q/k/v (one shared Hessian: same input), o, gate/up,
down — each group's Hessian collected with the groups before it already
quantized; the block's output on the calibration tokens, through its
quantized linears, is the next block's input. The lm_head comes last, on
the final norm's output.

Two ways to hold the weights, same computation and codes:

* :func:`gptq_quantize`, on a :class:`CompressedModel` built whole (``materialize``): peak memory is the
  loaded model plus the one being quantized, plus the calibration hidden states of one block;
* :func:`llmshrink.compressor.streamed.materialize_streamed` (``export --layer-streaming``) and
  :func:`~llmshrink.compressor.streamed.gptq_streamed`, on a :class:`~llmshrink.models.lazy.LazyModel`: each
  decoder layer is read from safetensors when its turn comes and dropped after, so only the quantized model
  (or the codes) made so far, one layer and the hidden states are held (llm-compressor's sequential pipeline
  does the same for large models).
  ``benchmarks/gptq_streaming.py`` measures both; ``llmshrink plan`` estimates both (``plan.gptq_bytes``).

A ``w8a8s`` linear has no activation scale yet while this runs (those are
calibrated on the finished model); its float input passes through, as in
calibration itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llmshrink.compressor.gptq import GPTQConfig, HessianAccumulator
from llmshrink.compressor.model import CompressedModel, QuantLinear, rms_norm
from llmshrink.compressor.quant import quantize_weight
from llmshrink.formats import QuantFormat
from llmshrink.progress import NULL_PROGRESS, Progress

# linears sharing an input, in the order a block runs them
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
GROUPS_ALL = tuple(n for g in GROUPS for n in g)
BATCH = 8  # calibration rows per forward


def _pass_through(x: torch.Tensor) -> None:
    """Observer of a not-yet-calibrated static-scale layer: the float input passes, unrounded."""


@torch.no_grad()
def gptq_quantize(cm: CompressedModel, formats: Mapping[str, QuantFormat], calib: torch.Tensor, *,
                  config: GPTQConfig | None = None,
                  progress: Progress = NULL_PROGRESS) -> None:
    """Replace the float linears of ``cm`` named in ``formats`` by their GPTQ quantization, in place.

    Args:
        formats: module name (``blocks.{j}.{linear}``, ``lm_head``) -> integer format. The named
            modules must hold float weights; others are left as they are.
        calib: token ids ``[N, T]``.

    Raises:
        ValueError: no calibration tokens.
    """
    if not calib.numel():
        raise ValueError("GPTQ needs calibration tokens")
    config = config or GPTQConfig()
    static = [m for m in cm.modules() if isinstance(m, QuantLinear) and m.fmt.act == "int8-static"]
    for m in static:
        m.observer = _pass_through
    # on the model's device (calibration rows come from the host)
    xs = [torch.nn.functional.embedding(b.to(cm.embed.device), cm.embed) for b in calib.split(BATCH)]
    quantize = quantizer_for(formats, config)
    try:
        with progress.task("GPTQ (layer by layer)", total=len(cm.blocks) + 1) as task:
            for j, block in enumerate(cm.blocks):
                xs = quantize_block(block, j, xs, formats, quantize, cm.meta)
                task.advance(1)
            if "lm_head" in formats:
                cm.lm_head = quantize("lm_head", cm.lm_head, head_hessian(xs, cm.final_norm, cm.meta))
            task.advance(1)
    finally:
        for m in cm.modules():
            if isinstance(m, QuantLinear) and m.fmt.act == "int8-static":
                m.observer = None


def quantizer_for(formats: Mapping[str, QuantFormat], config: GPTQConfig):
    """``quantize(name, float QuantLinear, hessian) -> QuantLinear`` with GPTQ's codes in ``formats[name]``."""

    def quantize(name: str, module: QuantLinear, hessian: torch.Tensor) -> QuantLinear:
        q = quantize_weight(module.weight, formats[name], hessian=hessian, gptq=config)
        new = QuantLinear.from_quantized(q, module.bias)
        new.observer = _pass_through if new.fmt.act == "int8-static" else None
        return new

    return quantize


def quantize_block(block, j: int, xs: list[torch.Tensor], formats: Mapping[str, QuantFormat], quantize,
                   meta) -> list[torch.Tensor]:
    """Quantize block ``j``'s linears named in ``formats`` in place, stage by stage; its output on ``xs``.

    One forward per stage over all calibration rows: each group's Hessian is collected on inputs that went
    through the groups before it, already quantized.
    """
    positions = torch.arange(xs[0].shape[1], device=xs[0].device)  # every row starts at position 0
    eps = meta.rms_norm_eps

    def quantize_group(names: tuple[str, ...], inputs: list[torch.Tensor]) -> None:
        names = tuple(n for n in names if f"blocks.{j}.{n}" in formats)
        if not names:
            return
        acc = HessianAccumulator(inputs[0].shape[-1])
        for x in inputs:
            acc.add(x)
        h = acc.hessian
        for n in names:
            setattr(block, n, quantize(f"blocks.{j}.{n}", getattr(block, n), h))

    hs = [rms_norm(x, block.input_norm, eps) for x in xs]
    quantize_group(GROUPS[0], hs)
    atts = [block.attention(h, positions, None, meta)[0] for h in hs]
    quantize_group(GROUPS[1], atts)
    xs = [x + block.o_proj(a) for x, a in zip(xs, atts, strict=True)]
    hs = [rms_norm(x, block.post_norm, eps) for x in xs]
    quantize_group(GROUPS[2], hs)
    mids = [block.mlp_hidden(h) for h in hs]
    quantize_group(GROUPS[3], mids)
    return [x + block.down_proj(m) for x, m in zip(xs, mids, strict=True)]


def head_hessian(xs: list[torch.Tensor], final_norm: torch.Tensor, meta) -> torch.Tensor:
    acc = HessianAccumulator(final_norm.shape[0])
    for x in xs:
        acc.add(rms_norm(x, final_norm, meta.rms_norm_eps))
    return acc.hessian
