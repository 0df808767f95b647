"""Integer quantization of weights and activations, in torch.

This module is the numerical reference: the materializer uses it to build a
:class:`~llmshrink.compressor.model.CompressedModel`, the search uses the same
functions for fake quantization, and the exporters pack the very codes it
produces. Formats are described in :mod:`llmshrink.formats`.

Weight codes (``QuantizedWeight.codes``, int16 so every format fits):

* grouped symmetric (``w4g32``): codes in [-2^(b-1), 2^(b-1)-1], value = code * scale;
* grouped asymmetric (``w4g32z``): codes and zeros in [0, 2^b-1], value = (code - zero) * scale;
* per-channel int8 (``w8a8``, ``w8a8s``): codes in [-127, 127], value = code * scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmshrink.formats import QuantFormat

# Symmetric scales are chosen per group by minimizing the squared error over
# these multiples of amax/qmax: clipping a few outliers often lowers the
# error of every other weight in the group (the usual clip search of AWQ and
# llama.cpp, here on a fixed grid so it is deterministic and vectorized).
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
# Smallest scale: the smallest normal float16, so that every scale survives
# being stored in fp16 (TensorRT's W4A16 scales) and stays positive, which
# TensorRT's parser requires. Groups this small are ~0 anyway.
MIN_SCALE = 2.0**-14


@dataclass
class QuantizedWeight:
    """Integer codes + scales (+ zeros) of one ``[N, K]`` weight matrix."""

    codes: torch.Tensor  # [N, K] int16
    scales: torch.Tensor  # [N, K // group] float32 (per-channel: [N, 1])
    zeros: torch.Tensor | None  # like scales, int16, asymmetric formats only
    fmt: QuantFormat

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[N, K]`` matrix the codes stand for."""
        n, k = self.codes.shape
        g = self.fmt.group_size or k
        q = self.codes.float().view(n, k // g, g)
        if self.zeros is not None:
            q = q - self.zeros.float().unsqueeze(-1)
        return (q * self.scales.unsqueeze(-1)).view(n, k)


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    n, k = w.shape
    if k % group:
        raise ValueError(f"K={k} is not a multiple of group size {group}")
    return w.reshape(n, k // group, group)


def quantize_weight(w: torch.Tensor, fmt: QuantFormat) -> QuantizedWeight:
    """Quantize a float ``[N, K]`` weight to ``fmt`` (which must be an integer format)."""
    if fmt.is_float:
        raise ValueError(f"{fmt} is a float format")
    w = w.detach().float()
    if fmt.group_size is None:  # per-channel symmetric int8
        scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(MIN_SCALE)
        codes = torch.round(w / scale).clamp(-127, 127)
        return QuantizedWeight(codes.to(torch.int16), scale, None, fmt)
    wg = _grouped(w, fmt.group_size)
    if fmt.symmetric:
        return _quantize_symmetric(wg, fmt)
    return _quantize_asymmetric(wg, fmt)


def _quantize_symmetric(wg: torch.Tensor, fmt: QuantFormat) -> QuantizedWeight:
    bits = fmt.weight_bits
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    amax = wg.abs().amax(dim=-1, keepdim=True)
    best_err = best_scale = None
    for r in CLIP_GRID:
        s = (amax * r / qmax).clamp_min(MIN_SCALE)
        err = ((torch.round(wg / s).clamp(qmin, qmax) * s - wg) ** 2).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_scale = err, s
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s, best_scale)
    codes = torch.round(wg / best_scale).clamp(qmin, qmax)
    n = wg.shape[0]
    return QuantizedWeight(codes.reshape(n, -1).to(torch.int16), best_scale.squeeze(-1), None, fmt)


def _quantize_asymmetric(wg: torch.Tensor, fmt: QuantFormat) -> QuantizedWeight:
    levels = 2 ** fmt.weight_bits - 1
    lo = wg.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = wg.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / levels).clamp_min(MIN_SCALE)
    zero = torch.round(-lo / scale).clamp(0, levels)
    codes = (torch.round(wg / scale) + zero).clamp(0, levels)
    n = wg.shape[0]
    return QuantizedWeight(codes.reshape(n, -1).to(torch.int16), scale.squeeze(-1),
                           zero.squeeze(-1).to(torch.int16), fmt)


def static_scale(amax: float) -> float:
    """The int8 scale a max calibrator gives activations with absolute maximum ``amax``.

    Rounded to float16, the precision the trt flavour stores it in, so the torch
    reference divides by exactly the number the graph does.
    """
    return float(torch.tensor(max(amax / 127, MIN_SCALE)).half().float())


def quantize_activation(x: torch.Tensor, fmt: QuantFormat, scale: float | None = None) -> torch.Tensor:
    """Round activations the way the target kernel does (identity for ``act == 'none'``).

    ``int8-block``: per token and block of ``group_size`` along the last dim,
    symmetric, scale = amax / 127 (ONNX Runtime MatMulNBits accuracy_level 4).
    ``int8-tensor``: one asymmetric uint8 scale/zero point over the whole
    tensor, as ONNX's DynamicQuantizeLinear computes it.
    ``int8-static``: ``clamp(round(x / scale), -128, 127) * scale`` with the
    calibrated ``scale`` (ONNX QuantizeLinear/DequantizeLinear, zero point 0).
    Without ``scale`` — the search, sensitivity and recovery, which see a
    layer before it is calibrated — this tensor's own max-calibrated scale
    stands in for it.
    """
    if fmt.act == "none":
        return x
    if fmt.act == "int8-static":
        s = static_scale(float(x.detach().abs().max())) if scale is None else scale
        return torch.round(x / s).clamp(-128, 127) * s
    if fmt.act == "int8-block":
        g = fmt.group_size
        shape = x.shape
        xb = x.reshape(*shape[:-1], shape[-1] // g, g)
        scale = xb.abs().amax(-1, keepdim=True) / 127
        # x * (1 / scale) in float32 is what matched onnxruntime 1.32 here
        # (x / scale and x * (127 / amax) each round some .5 ties the other way).
        inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        return (torch.round(xb * inv).clamp(-127, 127) * scale).reshape(shape)
    if fmt.act == "int8-tensor":
        lo = x.min().clamp(max=0)
        hi = x.max().clamp(min=0)
        scale = (hi - lo) / 255
        if scale == 0:
            return x
        zp = torch.round(-lo / scale).clamp(0, 255)
        q = (torch.round(x / scale) + zp).clamp(0, 255)
        return (q - zp) * scale
    raise ValueError(f"unknown activation quantization {fmt.act!r}")
