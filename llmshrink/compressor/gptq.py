"""GPTQ: error-compensating rounding of one weight matrix onto a fixed grid.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (arXiv 2210.17323); this follows the reference
implementation (IST-DASLab/gptq, ``gptq.py: GPTQ.fasterquant``) with its
options ``act_order`` and ``static_groups``:

* ``H = X^T X`` over the layer's calibration inputs, dampened by
  ``damp * mean(diag H)``; dead inputs (zero diagonal) get weight 0.
* Columns are quantized one at a time in order of decreasing ``diag H``
  (act-order); each column's rounding error is spread onto the columns not
  yet quantized through the upper Cholesky factor of ``H^-1``, in blocks of
  ``block_size`` columns (lazy batch updates).
* The grid (scales and zero points per group) is fixed *before* rounding —
  the reference's ``static_groups`` — by the clip search of
  :func:`llmshrink.compressor.quant.weight_grid`, each column's error weighed
  by ``diag(H)``; GPTQ only chooses which grid point each weight gets, and
  quantization-aware recovery trains on that same grid. (The search, which has
  no Hessians, fake-quantizes with the same rule on unweighted errors: an
  estimate of the export's grid.)

No maintained GPTQ package runs on CPU with this torch and these formats
(llm-compressor and GPTQModel target CUDA and their own packing; ONNX
Runtime's ``matmul_nbits_quantizer`` calls Intel Neural Compressor's GPTQ,
which packs for MatMulNBits only, with its own scale rule), so this is the
compact torch version, ~40 lines of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmshrink import serde


@serde.serializable("GPTQConfig")
@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's knobs (the reference implementation's defaults)."""

    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # columns per lazy batch update
    act_order: bool = True  # quantize columns with the largest inputs first


class HessianAccumulator:
    """Running ``X^T X / n`` of a linear layer's inputs (float64 sums, so long calibration sets do not drift)."""

    def __init__(self, k: int) -> None:
        self.sum = torch.zeros(k, k, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the inputs ``x`` ``[..., K]`` of one forward."""
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.sum += x.T @ x
        self.n += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        if not self.n:
            raise ValueError("no calibration inputs reached this layer")
        return (self.sum / self.n).float()


def output_error(dw: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(dW H dW^T)``: the squared output error a weight change ``dW`` ``[N, K]`` makes on the Hessian's inputs."""
    return float(((dw @ hessian) * dw).sum())


def gptq_codes(w: torch.Tensor, grid, hessian: torch.Tensor, config: GPTQConfig = GPTQConfig()) -> torch.Tensor:
    """Integer codes ``[N, K]`` (as float) of ``w`` on ``grid`` (a :class:`~.quant.WeightGrid`), chosen by GPTQ.

    Args:
        w: float ``[N, K]`` weight.
        hessian: ``[K, K]`` ``X^T X`` (any positive scale) of the layer's inputs.
    """
    w = w.detach().float().clone()
    n, k = w.shape
    scale, zero = grid.column_params(k)
    lo, hi = grid.qrange
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if config.act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    scale, zero = scale[:, perm], None if zero is None else zero[:, perm]
    h += config.damp * torch.mean(torch.diag(h)) * torch.eye(k)
    # upper Cholesky factor of H^-1: row i holds how column i's error moves the columns after it
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    for b0 in range(0, k, config.block_size):
        b1 = min(b0 + config.block_size, k)
        wb, errb, hb = w[:, b0:b1].clone(), torch.zeros(n, b1 - b0), hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col, s = wb[:, i], scale[:, b0 + i]
            z = 0.0 if zero is None else zero[:, b0 + i]
            c = (torch.round(col / s) + z).clamp(lo, hi)
            codes[:, b0 + i] = c
            err = (col - (c - z) * s) / hb[i, i]
            wb[:, i:] -= err.unsqueeze(1) * hb[i, i:].unsqueeze(0)
            errb[:, i] = err
        w[:, b1:] -= errb @ hinv[b0:b1, b1:]
    return codes[:, torch.argsort(perm)]
