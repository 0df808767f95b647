"""Per-layer quantization sensitivity: the sequential baseline's precision assignment, and the mixed-precision
contender of every budget (:func:`mixed_precision`).

For every kept linear and candidate format, the expected squared error the
format adds to that layer's output, relative to the output's own energy:

    err(W, f) = ( Σ_j E[x_j²] · ||ΔW_{:,j}||²  +  Σ_j E[δx_j²] · ||W_{:,j}||² ) / Σ_j E[x_j²] · ||W_{:,j}||²

with ``ΔW = Q_f(W) − W`` (weight rounding) and ``δx = Q_a(x) − x`` (int8
activation rounding, for ``a8`` formats), input statistics from one pass of
the fp32 subnet over calibration text, input channels taken as uncorrelated
(the diagonal of the input covariance, as HAWQ-style and OBQ-style proxies
start from). The precision assignment then minimises the summed error under
the latency budget with the same latency table and greedy step-down as
:func:`~llmshrink.compressor.budget.fit_to_budget`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from llmshrink.compressor.budget import Move, fastest_format, fit_to_budget, grow_to_budget
from llmshrink.compressor.materialize import materialize
from llmshrink.compressor.quant import fake_quant, quantize_activation
from llmshrink.compressor.space import SearchSpace
from llmshrink.errors import InfeasibleBudgetError
from llmshrink.formats import parse_format
from llmshrink.spec import LINEARS, SubnetSpec
from llmshrink.targets.predict import predict

HEAD = -1  # the lm_head's "layer" in the score keys


@dataclass(frozen=True)
class Sensitivity:
    """Relative output error per (layer, linear, format); the lm_head is ``(HEAD, "lm_head", fmt)``."""

    scores: dict[tuple[int, str, str], float]

    def error(self, spec: SubnetSpec) -> float:
        """Summed relative error of ``spec``'s precision plan (kept layers and the lm_head)."""
        total = self.scores[(HEAD, "lm_head", spec.lm_head)]
        for i in spec.kept_layers():
            total += sum(self.scores[(i, name, spec.layers[i].precision[name])] for name in LINEARS)
        return total

    def preference(self, spec: SubnetSpec) -> float:
        return -self.error(spec)


@torch.no_grad()
def measure_sensitivity(teacher, spec: SubnetSpec, formats: Iterable[str], head_formats: Iterable[str],
                        batches: Iterable[torch.Tensor]) -> Sensitivity:
    """Score every kept linear of ``spec`` (its architecture; precision ignored) in every format."""
    formats, head_formats = list(formats), list(head_formats)
    fp32 = replace(spec, lm_head="fp32",
                   layers=tuple(replace(ls, precision=dict.fromkeys(LINEARS, "fp32")) for ls in spec.layers))
    cm = materialize(teacher, fp32)
    mods = {(i, name): getattr(b, name) for i, b in zip(spec.kept_layers(), cm.blocks, strict=True) for name in LINEARS}
    mods[(HEAD, "lm_head")] = cm.lm_head
    a8 = {parse_format(f).name: parse_format(f) for f in set(formats) | set(head_formats)
          if parse_format(f).act != "none"}
    stats: dict[tuple[int, str], dict[str, torch.Tensor]] = {k: {} for k in mods}
    count = {"n": 0}
    hooks = []
    for key, mod in mods.items():
        def pre(_m, args, key=key):
            x = args[0].detach().double().flatten(0, -2)
            s = stats[key]
            s["x2"] = s.get("x2", 0) + x.pow(2).sum(0)
            for name, f in a8.items():
                if x.shape[-1] % (f.group_size or 1) == 0:
                    d = (quantize_activation(x.float(), f).double() - x).pow(2).sum(0)
                    s[name] = s.get(name, 0) + d
        hooks.append(mod.register_forward_pre_hook(pre))
    try:
        for ids in batches:
            cm(ids.to(cm.embed.device))  # the rows come from the host; cm is where the teacher's weights are
            count["n"] += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    scores: dict[tuple[int, str, str], float] = {}
    for (i, name), mod in mods.items():
        w = mod.weight.double()
        col = w.pow(2).sum(0)  # ||W_{:,j}||²
        x2 = stats[(i, name)]["x2"]
        signal = float((x2 * col).sum()) or 1.0
        for f in (head_formats if i == HEAD else formats):
            fmt = parse_format(f)
            if fmt.is_float and fmt.weight_bits >= 32:
                scores[(i, name, f)] = 0.0
                continue
            if fmt.group_size and w.shape[1] % fmt.group_size:
                scores[(i, name, f)] = float("inf")  # cannot quantize this width in this format
                continue
            dw = (fake_quant(w.float(), fmt).double() - w).pow(2).sum(0)
            err = float((x2 * dw).sum())
            if fmt.act != "none" and fmt.name in stats[(i, name)]:
                err += float((stats[(i, name)][fmt.name] * col).sum())
            scores[(i, name, f)] = err / signal
    return Sensitivity(scores)


def _least_sensitive(spec: SubnetSpec, sens: Sensitivity, space: SearchSpace) -> SubnetSpec:
    """``spec`` with every kept linear (and the lm_head) in its least sensitive format of ``space``."""
    def best(i: int, name: str, fmts) -> str:
        return min(fmts, key=lambda f: sens.scores[(i, name, f)])

    layers = tuple(replace(ls, precision={n: best(i, n, space.linear_formats(n)) for n in LINEARS}) if ls.keep
                   else ls for i, ls in enumerate(spec.layers))
    return replace(spec, layers=layers, lm_head=best(HEAD, "lm_head", space.linear_formats("lm_head")))


def assign_precision(spec: SubnetSpec, sens: Sensitivity, space: SearchSpace, target, workload, table,
                     budget_ms: float) -> tuple[SubnetSpec, list[Move]]:
    """Formats for ``spec``'s architecture under ``budget_ms``, by precision moves alone: every linear (and the
    lm_head) starts at its least sensitive format and steps down where that costs the least error per
    millisecond, until the budget is met.

    Where those one-linear steps stall above the budget, ``spec``'s own formats are the floor: from them,
    precision steps up where they buy the most error per millisecond, while the budget allows. Steps stall
    because the table's prices are not one per linear: on an adapted cpu table q/k/v in one format are priced
    as one fused call, so moving q_proj alone from w8g64a8 to w4g32a8 costs time even where moving all three
    saves it (SmolLM2-135M at 0.85x int4: stalled at 3.59 ms against 3.48). The architecture never changes
    here: a sensitivity sum cannot price a dropped block (its error terms vanish), and dropping blocks for it
    kept 18 of 30 in 8-bit at screening KL 6.06 against 1.02 for the importance heuristic.

    Raises:
        InfeasibleBudgetError: the steps down stall and ``spec`` itself is over the budget.
    """
    try:
        return fit_to_budget(_least_sensitive(spec, sens, space), space, target, workload, table, budget_ms,
                             preference=sens.preference, kinds=("precision",))
    except InfeasibleBudgetError:
        if predict(spec, target, workload, table=table).total_ms > budget_ms:
            raise
        return grow_to_budget(spec, space, target, workload, table, budget_ms, preference=sens.preference,
                              kinds=("precision",))


def mixed_precision(spec: SubnetSpec, sens: Sensitivity, space: SearchSpace, target, workload, table,
                    budget_ms: float) -> SubnetSpec | None:
    """``spec``'s architecture with a format per linear, by precision moves alone (:func:`assign_precision`
    with ``spec`` in the space's fastest format as the floor): every linear starts at its least sensitive
    format of ``space`` and steps down where that adds the least summed error per millisecond saved, until the
    table predicts ``budget_ms`` (HAWQ-style, with :class:`Sensitivity`'s proxy); where those steps stall, the
    fastest format steps up instead. None when precision alone cannot reach the budget (the proxy cannot
    price an architecture cut: a dropped block's error terms simply vanish from the sum)."""
    floor = space.in_format(spec, fastest_format(space, target, workload, table))
    try:
        fitted, _ = assign_precision(floor, sens, space, target, workload, table, budget_ms)
    except InfeasibleBudgetError:
        return None
    return fitted
