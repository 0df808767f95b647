"""The subnet of a model whose weights stay on disk, built one decoder layer at a time (layer streaming).

:func:`materialize_streamed` is :func:`~.materialize.materialize` on a :class:`~llmshrink.models.lazy.LazyModel`:
each kept layer is read from safetensors, sliced to the spec, moved to the run's device and quantized (GPTQ on the
calibration hidden states, :mod:`.sequential`'s stages; or rounded to nearest), then dropped, so the float model is
never whole in memory: only the :class:`CompressedModel` being built, one layer and the hidden states are.
:func:`gptq_streamed` keeps only the codes (the smallest peak; what ``benchmarks/gptq_streaming.py`` measures).

It sits above both :mod:`.materialize` (how a block is sliced from an HF layer) and :mod:`.sequential` (how a
block is quantized, stage by stage), which know nothing of each other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmshrink.compressor.gptq import GPTQConfig
from llmshrink.compressor.materialize import (
    build_block,
    check_buildable,
    model_meta,
    require_calibration,
    rope_params,
    uses_gptq,
)
from llmshrink.compressor.model import Block, CompressedModel, QuantLinear
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
from llmshrink.spec import SubnetSpec


@torch.no_grad()
def _stream(lazy, spec: SubnetSpec, calib: torch.Tensor | None, gptq: GPTQConfig | None, device,
            progress: Progress, on_block: Callable[[int, Block, dict[str, QuantFormat]], None], *,
            whole: bool = True):
    """Build, quantize and hand over each kept block in turn (``on_block(j, block, gptq_formats)``).

    ``gptq`` None: integer linears are rounded to nearest as they are built. Else they are built float and
    quantized by GPTQ on ``calib``'s hidden states, stage by stage, as :func:`.sequential.gptq_quantize` does.
    Every weight is moved to ``device`` before it is quantized (as the whole path quantizes where the model is).

    Returns:
        (embedding, final norm weight, lm_head): the lm_head quantized the same way. Without ``whole`` (codes
        only): the embedding is dropped once the calibration states are made and returned as None, and so is a
        float lm_head, which is then not read.
    """
    meta = model_meta(lazy.model)
    inv_freq = rope_params(lazy.model)[0].to(device)
    hidden = torch.tensor(spec.hidden_channels(), dtype=torch.long, device=device)
    embedding = QuantLinear(lazy.tensor("model.embed_tokens.weight").to(device)[:, hidden], None,
                            parse_format(spec.embedding))
    formats: dict[str, QuantFormat] = {}  # module name -> integer format, quantized by GPTQ
    quantize = quantizer_for(formats, gptq) if gptq is not None else None
    xs = None if quantize is None else [torch.nn.functional.embedding(b.to(device), embedding.weight)
                                        for b in calib.split(BATCH)]
    if not whole:
        embedding = None
    kept = spec.kept_layers()
    title = "GPTQ (layer by layer, streamed)" if quantize else "Building the subnet (layer by layer, streamed)"
    with progress.task(title, total=len(kept) + 1) as task:
        for j, i in enumerate(kept):
            layer = lazy.layer(i).to(device)

            def linear(name, w, b, fmt, j=j):
                if quantize is None or fmt.is_float:
                    return QuantLinear(w, b, fmt)
                formats[f"blocks.{j}.{name}"] = fmt
                return QuantLinear(w, b, FP32)

            block = build_block(spec, i, layer, hidden, inv_freq, linear)
            lazy.release(layer)
            if quantize is not None:
                xs = quantize_block(block, j, xs, formats, quantize, meta)
            on_block(j, block, formats)
            del block
            task.advance(1)
        final_norm = lazy.tensor("model.norm.weight").to(device)[hidden]
        head_fmt = parse_format(spec.lm_head)
        lm_head = None
        if whole or not head_fmt.is_float:
            head_w = lazy.tensor("lm_head.weight").to(device)[:, hidden]
            head_b = lazy.tensor("lm_head.bias").to(device) \
                if getattr(lazy.model.lm_head, "bias", None) is not None else None
            if quantize is None or head_fmt.is_float:
                lm_head = QuantLinear(head_w, head_b, head_fmt)
            else:
                formats["lm_head"] = head_fmt
                lm_head = quantize("lm_head", QuantLinear(head_w, head_b, FP32), head_hessian(xs, final_norm, meta))
        task.advance(1)
    return embedding, final_norm, lm_head


@torch.no_grad()
def materialize_streamed(lazy, spec: SubnetSpec, tokenizer=None, calib: torch.Tensor | None = None, *,
                         quantizer: str = "rtn", gptq: GPTQConfig | None = None, device=None,
                         progress: Progress = NULL_PROGRESS) -> CompressedModel:
    """:func:`~.materialize.materialize` of ``spec`` with the weights streamed from disk (see module docstring).

    The same model, weight for weight and code for code, as ``materialize(load_model(...), spec, ...)``; its peak
    memory is the :class:`CompressedModel` plus one float layer and the calibration hidden states, never the
    whole float model. Static activation scales (``w8a8s``) are calibrated on the finished model, as there.

    Args:
        lazy: a :class:`~llmshrink.models.lazy.LazyModel`.
        device: where the model is built and quantized (default the CPU); layers are read on the host and
            moved there one at a time.

    Raises:
        SpecError: the spec breaks a rule, or was made for another shape.
        UsageError: the spec needs calibration tokens and none were given, or an unknown quantizer.
    """
    from llmshrink.compressor.calibrate import (
        STATIC_CALIB_ROWS,
        calibrate_activations,
        needs_calibration,
    )

    run_gptq = uses_gptq(spec, quantizer)
    require_calibration(spec, run_gptq, calib)
    check_buildable(lazy.config, spec)
    device = torch.device("cpu" if device is None else device)
    blocks: list[Block] = []
    embedding, final_norm, lm_head = _stream(lazy, spec, calib, (gptq or GPTQConfig()) if run_gptq else None,
                                             device, progress, lambda j, block, formats: blocks.append(block))
    for m in (*(m for b in blocks for m in b.modules()), lm_head):
        if isinstance(m, QuantLinear):
            m.observer = None  # GPTQ let w8a8s inputs through unrounded; their scales are calibrated next
    cm = CompressedModel(spec, model_meta(lazy.model, tokenizer), embedding, blocks, final_norm, lm_head).eval()
    if needs_calibration(spec):
        calibrate_activations(cm, calib[:STATIC_CALIB_ROWS])
    return cm


@torch.no_grad()
def gptq_streamed(lazy, spec: SubnetSpec, calib: torch.Tensor, *, config: GPTQConfig | None = None,
                  progress: Progress = NULL_PROGRESS) -> dict[str, QuantizedWeight]:
    """GPTQ's codes of ``spec``'s integer linears, with the weights streamed and each block dropped once quantized.

    The codes :func:`materialize_streamed` (and the whole-model path) give, holding only the codes made so far,
    one layer and the hidden states.

    Args:
        lazy: a :class:`~llmshrink.models.lazy.LazyModel`.
        calib: token ids ``[N, T]``.

    Returns:
        module name (``blocks.{j}.{linear}``, ``lm_head``) -> its :class:`QuantizedWeight`, for every linear of
        the spec in an integer format.

    Raises:
        ValueError: no calibration tokens.
    """
    if not calib.numel():
        raise ValueError("GPTQ needs calibration tokens")
    check_buildable(lazy.config, spec)
    out: dict[str, QuantizedWeight] = {}

    def keep_codes(j: int, block: Block, formats) -> None:
        out.update({f"blocks.{j}.{n}": getattr(block, n).quantized for n in GROUPS_ALL
                    if f"blocks.{j}.{n}" in formats})

    _, _, lm_head = _stream(lazy, spec, calib, config or GPTQConfig(), torch.device("cpu"), progress, keep_codes,
                            whole=False)
    if lm_head is not None:
        out["lm_head"] = lm_head.quantized
    return out
