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
* Then, with the codes fixed, each row's group scales are refit to the codes
  by least squares on the output error ``(w - A s)^T H (w - A s)`` (``A``: the
  row's codes laid out by group; :func:`refit_scales`): the clip search chose
  each group's scale before rounding, on a diagonal approximation of ``H``;
  after GPTQ moved the codes, other scales fit them better. The same idea as
  the scale refinement after rounding in OmniQuant/AWQ-style searches, here in
  closed form. On SmolLM2-135M uniform w4g32a8 (512 rows) it lowered WikiText-2
  perplexity from 34.03 to 33.85, and to 33.75 with a second GPTQ pass on the
  refit grid (``refit_rounds=2``); after the default recovery, 32.63 -> 32.42 with
  one round and 32.35 with two (scratch runs, 2026-12-01).
* Tried and left out: asymmetric calibration (GPTQv2, Li et al., ICML 2025: each linear first moved to the
  least-squares fit of the float model's output on the inputs the quantized layers before it hand on,
  ``W + W C H^-1`` with ``C = (X_fp - X)^T X``). On the same model and rows it lowered perplexity before
  recovery from 33.85 to 33.51 (held-out KD 0.147 -> 0.119) at ~1.9x GPTQ's time, but after the default
  recovery it ended at 32.60 against 32.42: recovery, which every shipped model gets, gained almost nothing
  from that start (scratch runs, 2026-12-01; the code is in git history, commit 436c467).

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
    # after GPTQ, refit the scales to the codes (least squares on the output error); >1: GPTQ again on the refit
    # grid and refit again, that many times in all (each round costs one more GPTQ pass). 0: no refit.
    refit_rounds: int = 1


class HessianAccumulator:
    """Running ``X^T X / n`` of a linear layer's inputs.

    Each forward's ``X^T X`` is a float32 product, summed across forwards in float64 so that long calibration sets
    do not drift. The product itself in float64 cost twice as much (0.118 s against 0.056 s for one 2048 x 1536
    forward on a 2-core Zen 4) and was a third of GPTQ's time, for a relative difference of 2.5e-7, far under
    GPTQ's own damping (1 % of the mean diagonal).
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.sum: torch.Tensor | None = None  # made on the device of the first inputs
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the inputs ``x`` ``[..., K]`` of one forward."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.sum is None:
            self.sum = torch.zeros(self.k, self.k, dtype=torch.float64, device=x.device)
        self.sum += (x.T @ x).double()
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
    perm = torch.argsort(torch.diag(h), descending=True) if config.act_order else torch.arange(k, device=h.device)
    w, h = w[:, perm], h[perm][:, perm]
    scale, zero = scale[:, perm], None if zero is None else zero[:, perm]
    h += config.damp * torch.mean(torch.diag(h)) * torch.eye(k, device=h.device)
    # upper Cholesky factor of H^-1: row i holds how column i's error moves the columns after it
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    for b0 in range(0, k, config.block_size):
        b1 = min(b0 + config.block_size, k)
        wb, errb, hb = w[:, b0:b1].clone(), torch.zeros(n, b1 - b0, device=w.device), hinv[b0:b1, b0:b1]
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


def refit_scales(w: torch.Tensor, codes: torch.Tensor, grid, hessian: torch.Tensor, min_scale: float,
                 rows_per_solve: int = 128) -> torch.Tensor:
    """Scales ``[N, K // group]`` that minimize each row's output error ``(w - A s)^T H (w - A s)`` for fixed
    ``codes`` ``[N, K]`` on ``grid`` (zeros kept), ``A``: the row's ``codes - zero`` laid out by group.

    A row whose refit would not lower its error keeps its scales, and so does a group whose refit scale would
    fall below ``min_scale`` or whose codes are all at the zero point (its scale does not reach the output).
    """
    w, h = w.detach().float(), hessian.detach().float()
    n, k = w.shape
    g = grid.fmt.group_size or k
    groups = k // g
    c = codes.float()
    if grid.zeros is not None:
        c = c - grid.zeros.repeat_interleave(g, dim=1)
    old = grid.scales.reshape(n, groups)
    hb = h.reshape(groups, g, k)
    rhs = (c * (w @ h)).reshape(n, groups, g).sum(-1)  # A^T H w, per row
    new = old.clone()
    eye = torch.eye(groups, device=w.device)
    for r0 in range(0, n, rows_per_solve):
        cr = c[r0:r0 + rows_per_solve].reshape(-1, groups, g)
        m = torch.einsum("ngHj,nHj->ngH", torch.einsum("ngi,gik->ngk", cr, hb).reshape(-1, groups, groups, g), cr)
        ridge = 1e-6 * torch.diagonal(m, dim1=1, dim2=2).mean(-1).clamp_min(1e-12)
        new[r0:r0 + rows_per_solve] = torch.linalg.solve(m + ridge[:, None, None] * eye,
                                                         rhs[r0:r0 + rows_per_solve].unsqueeze(-1)).squeeze(-1)
    live = c.reshape(n, groups, g).abs().sum(-1) > 0
    new = torch.where(live & (new >= min_scale), new, old)

    def row_error(scales: torch.Tensor) -> torch.Tensor:
        d = c * scales.repeat_interleave(g, dim=1) - w
        return ((d @ h) * d).sum(1)

    better = row_error(new) < row_error(old)
    return torch.where(better[:, None], new, old).reshape(grid.scales.shape)
