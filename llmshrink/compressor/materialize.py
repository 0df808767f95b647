"""Slice a pretrained HF model to a SubnetSpec and quantize it: a CompressedModel.

Which rows and columns survive is read from the spec's importance orders
(identity by default); kept indices are used in base order, so the subnet of
the full spec is the base model itself, weight for weight.
"""

from __future__ import annotations

import math

import torch

from llmshrink.compressor.model import Block, CompressedModel, ModelMeta, QuantLinear
from llmshrink.formats import FP32, QUANTIZERS, parse_format
from llmshrink.models.arch import check_supported
from llmshrink.spec import BaseShape, SubnetSpec


def layer_indices(spec: SubnetSpec, i: int, device=None) -> dict[str, torch.Tensor]:
    """Kept row/column indices of layer ``i``'s weights, in base coordinates (on ``device``, default the CPU).

    Returns ``q_rows``, ``k_rows``, ``v_rows`` (output rows of q/k/v_proj),
    ``o_cols`` (input columns of o_proj), ``mlp`` (neurons) and ``pairs``
    (kept rotary pairs, for the frequencies).
    """
    b, ls, order = spec.base, spec.layers[i], spec.layer_order(i)
    hd, half = b.head_dim, b.head_dim // 2
    per = ls.num_heads // ls.num_kv_heads
    groups = sorted(order.kv_groups[: ls.num_kv_heads])
    heads = [g * b.heads_per_group + h for g in groups for h in sorted(order.heads_in_group[g][:per])]
    pairs = sorted(order.rope_pairs[: ls.head_dim // 2])
    qk_dims = pairs + [p + half for p in pairs]  # rotate_half layout stays valid
    v_dims = sorted(order.v_dims[: ls.head_dim])

    def rows(units: list[int], dims: list[int]) -> torch.Tensor:
        return torch.tensor([u * hd + d for u in units for d in dims], dtype=torch.long, device=device)

    return {"q_rows": rows(heads, qk_dims), "k_rows": rows(groups, qk_dims), "v_rows": rows(groups, v_dims),
            "o_cols": rows(heads, v_dims),
            "mlp": torch.tensor(sorted(order.mlp[: ls.intermediate_size]), dtype=torch.long, device=device),
            "pairs": torch.tensor(pairs, dtype=torch.long, device=device)}


def linear_slices(spec: SubnetSpec, i: int, hf_layer, hidden: torch.Tensor) -> dict[str, tuple]:
    """Per linear of layer ``i``: (the HF module, kept rows, kept columns) in base coordinates."""
    idx = layer_indices(spec, i, hidden.device)
    att, mlp = hf_layer.self_attn, hf_layer.mlp
    return {"q_proj": (att.q_proj, idx["q_rows"], hidden), "k_proj": (att.k_proj, idx["k_rows"], hidden),
            "v_proj": (att.v_proj, idx["v_rows"], hidden), "o_proj": (att.o_proj, hidden, idx["o_cols"]),
            "gate_proj": (mlp.gate_proj, idx["mlp"], hidden), "up_proj": (mlp.up_proj, idx["mlp"], hidden),
            "down_proj": (mlp.down_proj, hidden, idx["mlp"])}


def rope_params(model) -> tuple[torch.Tensor, float]:
    """Base inverse frequencies (head_dim/2,) and attention scaling of the HF model's rotary embedding."""
    rotary = model.model.rotary_emb
    return rotary.inv_freq.detach().float().clone(), float(getattr(rotary, "attention_scaling", 1.0))


def model_meta(model, tokenizer=None) -> ModelMeta:
    """The :class:`ModelMeta` of an HF Llama-family model."""
    cfg = model.config
    base = BaseShape.from_config(cfg)
    eos = cfg.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.eos_token_id is not None:
        g = gen.eos_token_id
        eos_ids = tuple(dict.fromkeys(eos_ids + (tuple(g) if isinstance(g, (list, tuple)) else (g,))))
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids += (tokenizer.eos_token_id,)
    return ModelMeta(
        rms_norm_eps=float(cfg.rms_norm_eps), rope_attention_scaling=rope_params(model)[1],
        attention_scale=1.0 / math.sqrt(base.head_dim), bos_token_id=cfg.bos_token_id,
        eos_token_ids=eos_ids, max_position_embeddings=int(getattr(cfg, "max_position_embeddings", 4096)),
    )


def uses_gptq(spec: SubnetSpec, quantizer: str) -> bool:
    """True when materializing ``spec`` with ``quantizer`` runs GPTQ (and so needs calibration tokens)."""
    if quantizer not in QUANTIZERS:
        from llmshrink.errors import UsageError

        raise UsageError(f"Unknown quantizer {quantizer!r}.", f"Use one of: {', '.join(QUANTIZERS)}.")
    return quantizer == "gptq" and any(not parse_format(f).is_float for f in spec.formats_used(embedding=False))


def check_buildable(config, spec: SubnetSpec) -> None:
    """Raise unless ``spec`` is valid and made for a supported model of ``config``'s shape.

    Raises:
        UnsupportedModelError: an architecture llmshrink cannot compress.
        SpecError: the spec breaks a rule, or was made for another shape.
    """
    from llmshrink.spec import SpecError

    check_supported(config)
    spec.validate()
    if BaseShape.from_config(config) != spec.base:
        raise SpecError("base-matches-model", f"the spec is for {spec.base}, the model is "
                        f"{BaseShape.from_config(config)}.", "Make the spec from this model.")


def require_calibration(spec: SubnetSpec, run_gptq: bool, calib) -> None:
    """Raise UsageError when building ``spec`` needs calibration tokens (GPTQ, or ``w8a8s`` scales) and none came."""
    from llmshrink.compressor.calibrate import needs_calibration
    from llmshrink.errors import UsageError

    if needs_calibration(spec) and calib is None:
        raise UsageError("This spec uses w8a8s (static int8 activation scales), which are calibrated on text.",
                         "Pass calibration tokens (the CLI's --calib-data; `self` samples them from the model).")
    if run_gptq and calib is None:
        raise UsageError("GPTQ quantizes on calibration text, and none was given.",
                         "Pass calibration tokens (the CLI's --calib-data), or use --quantizer rtn.")


def build_block(spec: SubnetSpec, i: int, hf_layer, hidden: torch.Tensor, inv_freq: torch.Tensor,
                linear) -> Block:
    """The :class:`Block` of base layer ``i`` sliced to ``spec`` from an HF decoder layer.

    ``linear(name, weight, bias, fmt)`` makes each :class:`QuantLinear` (``name``: q_proj, ...).
    """
    ls, idx = spec.layers[i], layer_indices(spec, i, hidden.device)
    linears = {}
    for name, (lin, r, c) in linear_slices(spec, i, hf_layer, hidden).items():
        bias = lin.bias[r] if lin.bias is not None else None
        linears[name] = linear(name, lin.weight[r][:, c], bias, ls.fmt(name))
    return Block(ls.num_heads, ls.num_kv_heads, ls.head_dim, linears, hf_layer.input_layernorm.weight[hidden],
                 hf_layer.post_attention_layernorm.weight[hidden], inv_freq[idx["pairs"]])


@torch.no_grad()
def materialize(model, spec: SubnetSpec, tokenizer=None, calib: torch.Tensor | None = None, *,
                quantizer: str = "rtn", gptq=None, progress=None) -> CompressedModel:
    """Build the :class:`CompressedModel` of ``spec`` from an HF model.

    Args:
        calib: calibration ids ``[N, T]``; required when the spec has static activation
            scales (``w8a8s``), which are calibrated on them after quantizing the weights,
            and for ``quantizer="gptq"``.
        quantizer: ``rtn`` (each weight to its nearest grid point) or ``gptq``
            (:mod:`.sequential`: layer by layer on ``calib``). Integer embedding tables are
            always rounded to nearest (a lookup has no input to compensate over).
        gptq: a :class:`~.gptq.GPTQConfig`.

    Raises:
        SpecError: the spec breaks a rule, or was made for another shape.
        UsageError: the spec needs calibration tokens and none were given, or an unknown quantizer.
    """
    from llmshrink.compressor.calibrate import calibrate_activations, needs_calibration
    from llmshrink.progress import NULL_PROGRESS

    run_gptq = uses_gptq(spec, quantizer)
    require_calibration(spec, run_gptq, calib)
    deferred: dict = {}  # module name -> integer format, for GPTQ after the float model is built

    def linear(name: str, w: torch.Tensor, bias, fmt) -> QuantLinear:
        if run_gptq and not fmt.is_float:
            deferred[name] = fmt
            return QuantLinear(w, bias, FP32)
        return QuantLinear(w, bias, fmt)
    check_buildable(model.config, spec)
    inv_freq, _ = rope_params(model)
    # built where the model's weights are (a GPU, or the CPU): GPTQ then runs there too
    hidden = torch.tensor(spec.hidden_channels(), dtype=torch.long, device=model.model.embed_tokens.weight.device)
    hf_layers = model.model.layers
    blocks = [build_block(spec, i, hf_layers[i], hidden, inv_freq,
                          lambda name, w, b, fmt, j=j: linear(f"blocks.{j}.{name}", w, b, fmt))
              for j, i in enumerate(spec.kept_layers())]
    embedding = QuantLinear(model.model.embed_tokens.weight[:, hidden], None, parse_format(spec.embedding))
    head_w = model.lm_head.weight[:, hidden]
    head_b = model.lm_head.bias if getattr(model.lm_head, "bias", None) is not None else None
    lm_head = linear("lm_head", head_w, head_b, parse_format(spec.lm_head))
    cm = CompressedModel(spec, model_meta(model, tokenizer), embedding, blocks,
                         model.model.norm.weight[hidden], lm_head).eval()
    if deferred:
        from llmshrink.compressor.gptq import GPTQConfig
        from llmshrink.compressor.sequential import gptq_quantize

        gptq_quantize(cm, deferred, calib, config=gptq or GPTQConfig(),
                      progress=progress or NULL_PROGRESS)
    if needs_calibration(spec):
        from llmshrink.compressor.calibrate import STATIC_CALIB_ROWS

        calibrate_activations(cm, calib[:STATIC_CALIB_ROWS])
    return cm
