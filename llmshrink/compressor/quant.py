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

    @property
    def grid(self) -> WeightGrid:
        """The grid these codes sit on."""
        return WeightGrid(self.scales, None if self.zeros is None else self.zeros.float(), self.fmt)

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[N, K]`` matrix the codes stand for."""
        return self.grid.dequantize(self.codes.float())


@dataclass
class WeightGrid:
    """The quantization grid of one ``[N, K]`` weight: scales (+ zeros) per group, fixed before any rounding.

    Search, recovery and export all round onto a grid made by :func:`weight_grid`;
    round-to-nearest and GPTQ differ only in which grid point each weight gets.
    """

    scales: torch.Tensor  # [N, K // group] float32 (per-channel: [N, 1])
    zeros: torch.Tensor | None  # like scales, float32 integer values, asymmetric formats only
    fmt: QuantFormat

    @property
    def qrange(self) -> tuple[int, int]:
        """Smallest and largest code."""
        bits = self.fmt.weight_bits
        if self.fmt.group_size is None:
            return -127, 127
        if not self.fmt.symmetric:
            return 0, 2**bits - 1
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def column_params(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[N, K]`` scale (and zero) of every weight, expanded along K from its group's."""
        g = self.fmt.group_size or k
        return (self.scales.repeat_interleave(g, dim=1),
                None if self.zeros is None else self.zeros.repeat_interleave(g, dim=1))

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        n, k = t.shape
        g = self.fmt.group_size or k
        return t.reshape(n, k // g, g)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest codes ``[N, K]`` (float, integer-valued) of ``w`` on this grid."""
        lo, hi = self.qrange
        q = torch.round(self._view(w) / self.scales.unsqueeze(-1))
        if self.zeros is not None:
            q = q + self.zeros.unsqueeze(-1)
        return q.clamp(lo, hi).reshape(w.shape)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        q = self._view(codes)
        if self.zeros is not None:
            q = q - self.zeros.unsqueeze(-1)
        return (q * self.scales.unsqueeze(-1)).reshape(codes.shape)

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` rounded to the nearest grid point (no gradient; callers add a straight-through estimator)."""
        return self.dequantize(self.codes(w))

    def quantized(self, codes: torch.Tensor) -> QuantizedWeight:
        """The :class:`QuantizedWeight` of ``codes`` on this grid."""
        zeros = None if self.zeros is None else self.zeros.to(torch.int16)
        return QuantizedWeight(codes.to(torch.int16), self.scales, zeros, self.fmt)


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    n, k = w.shape
    if k % group:
        raise ValueError(f"K={k} is not a multiple of group size {group}")
    return w.reshape(n, k // group, group)


def weight_grid(w: torch.Tensor, fmt: QuantFormat, importance: torch.Tensor | None = None) -> WeightGrid:
    """The grid of a float ``[N, K]`` weight in integer format ``fmt``.

    Per-channel int8: absmax / 127. Grouped symmetric: the scale among
    :data:`CLIP_GRID` multiples of absmax / qmax with the least squared
    rounding error in its group — each input column's error weighted by
    ``importance`` ``[K]`` when given (the diagonal of the input Hessian: the
    error that reaches the output, not the weight's). Grouped asymmetric:
    min/max over the group (extended to include 0), zero point rounded.
    """
    if fmt.is_float:
        raise ValueError(f"{fmt} is a float format")
    w = w.detach().float()
    if fmt.group_size is None:  # per-channel symmetric int8
        return WeightGrid((w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(MIN_SCALE), None, fmt)
    wg = _grouped(w, fmt.group_size)
    if not fmt.symmetric:
        levels = 2 ** fmt.weight_bits - 1
        lo = wg.amin(dim=-1).clamp(max=0)
        hi = wg.amax(dim=-1).clamp(min=0)
        scale = ((hi - lo) / levels).clamp_min(MIN_SCALE)
        return WeightGrid(scale, torch.round(-lo / scale).clamp(0, levels), fmt)
    qmin, qmax = -(2 ** (fmt.weight_bits - 1)), 2 ** (fmt.weight_bits - 1) - 1
    amax = wg.abs().amax(dim=-1, keepdim=True)
    imp = None if importance is None else importance.float().reshape(1, -1, fmt.group_size)
    best_err = best_scale = None
    for r in CLIP_GRID:
        s = (amax * r / qmax).clamp_min(MIN_SCALE)
        d2 = (torch.round(wg / s).clamp(qmin, qmax) * s - wg) ** 2
        err = (d2 if imp is None else d2 * imp).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_scale = err, s
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s, best_scale)
    return WeightGrid(best_scale.squeeze(-1), None, fmt)


def quantize_weight(w: torch.Tensor, fmt: QuantFormat, *, grid: WeightGrid | None = None,
                    hessian: torch.Tensor | None = None, gptq=None) -> QuantizedWeight:
    """Quantize a float ``[N, K]`` weight to integer format ``fmt``.

    Without ``hessian``, each weight goes to its nearest point of ``grid``
    (default: :func:`weight_grid` of ``w``): round-to-nearest (RTN). With a
    ``[K, K]`` input Hessian ``X^T X``, the default grid's clip search weighs
    each column by ``diag(H)``, and codes are chosen by GPTQ
    (:func:`llmshrink.compressor.gptq.gptq_codes`, config ``gptq``) on that grid —
    or by RTN on it where RTN's output error ``tr(dW H dW^T)`` is lower (GPTQ's
    greedy column order does not guarantee it never loses; on SmolLM2 it
    occasionally does on a ``down_proj``); then the scales are refit to the codes
    (``GPTQConfig.refit_rounds``, :func:`llmshrink.compressor.gptq.refit_scales`).
    """
    w = w.detach().float()
    if hessian is None:
        grid = weight_grid(w, fmt) if grid is None else grid
        return grid.quantized(grid.codes(w))
    from dataclasses import replace

    from llmshrink.compressor.gptq import GPTQConfig, gptq_codes, output_error, refit_scales

    config = gptq or GPTQConfig()
    grid = weight_grid(w, fmt, importance=torch.diag(hessian)) if grid is None else grid

    def error(g: WeightGrid, c: torch.Tensor) -> float:
        return output_error(g.dequantize(c) - w, hessian)

    best_grid, best = grid, min([gptq_codes(w, grid, hessian, config), grid.codes(w)], key=lambda c: error(grid, c))
    for r in range(config.refit_rounds):
        if r:  # GPTQ again, on the grid the last refit made
            codes = gptq_codes(w, best_grid, hessian, config)
            if error(best_grid, codes) < error(best_grid, best):
                best = codes
        best_grid = replace(best_grid, scales=refit_scales(w, best, best_grid, hessian, MIN_SCALE))
    return best_grid.quantized(best)


def fake_quant(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """The float weight ``fmt`` makes of ``w`` by round-to-nearest on its :func:`weight_grid` (the export's grid)."""
    if fmt.is_float:
        return w.half().float() if fmt.weight_bits == 16 else w
    return weight_grid(w, fmt).fake_quant(w.detach().float())


def static_scale(amax: float) -> float:
    """The int8 scale a max calibrator gives activations with absolute maximum ``amax``.

    Rounded to float16, the precision the trt flavour stores it in, so the torch
    reference divides by exactly the number the graph does.
    """
    return float(torch.tensor(max(amax / 127, MIN_SCALE), device="cpu").half().float())


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
