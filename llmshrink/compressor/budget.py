"""Budgets: what the space can reach, and bringing a subnet under a latency budget.

The search keeps the *expected* latency near the budget; the most probable
subnet it extracts can land a little above. :func:`fit_to_budget` then takes
the cheapest steps down — one notch narrower, a cheaper format, one block
fewer — ranked by how much the search's preference drops per millisecond
saved, until the table predicts the budget is met. :func:`fastest_reachable`
is the floor: below it no subnet of the space fits, and ``compress`` says so
before any work (exit code 3).

A budget is absolute (``30ms``) or relative to a uniform export of the same
model (``0.7xint4``: 70 % of the latency the target's table predicts for the
unpruned model with every linear layer in int4). :func:`parse_budgets` reads
both; :meth:`Budget.resolve` turns a relative one into milliseconds, and
:func:`resolve_budgets` does it for all of a ``compress`` request.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from llmshrink.compressor.space import SearchSpace
from llmshrink.errors import InfeasibleBudgetError, UsageError
from llmshrink.formats import fidelity_key
from llmshrink.progress import Progress
from llmshrink.spec import LINEARS, BaseShape, SubnetSpec
from llmshrink.targets.predict import predict, table_for
from llmshrink.targets.profile import load_target
from llmshrink.targets.workload import Workload

_UNITS_MS = {"ms": 1.0, "s": 1000.0, "us": 1e-3}


@dataclass(frozen=True)
class Budget:
    """One latency budget: ``value`` ms, or ``value`` × the predicted latency of the uniform ``relative_to`` export.

    A relative budget says what a user compares against ("70 % of the int4
    export") and holds on a machine whose absolute speed drifts: the table's
    *ratios* between two graphs are what it predicts best (see ``validate
    --reference``).
    """

    value: float
    relative_to: str | None = None  # a format name or alias (int4, w4g32a8, fp32, ...)

    def __str__(self) -> str:
        return f"{self.value:g}x{self.relative_to}" if self.relative_to else f"{self.value:g}ms"

    def resolve(self, base, target, workload, table) -> tuple[float, str]:
        """Milliseconds, and a sentence saying where they come from (empty for an absolute budget)."""
        if self.relative_to is None:
            return self.value, ""
        from llmshrink.formats import parse_format

        fmt = parse_format(self.relative_to).name
        if fmt not in target.formats:
            raise UsageError(f"--latency {self}: {target.name} has no kernel for {fmt}, so there is no uniform "
                             f"{fmt} export to be relative to.", f"Use one of its formats: {', '.join(target.formats)}.")
        spec = SubnetSpec.uniform(base, fmt)
        try:
            spec.validate()
        except UsageError as e:
            raise UsageError(f"--latency {self}: the model cannot be exported in uniform {fmt}: {e.message}",
                             "Use a format with a group that divides the model's widths (e.g. group 32).") from None
        ref = predict(spec, target, workload, table=table).total_ms
        # rounded up to the microsecond: 1.0xint4 must admit the int4 export itself
        ms = math.ceil(round(self.value * ref * 1000, 6)) / 1000
        return ms, (f"budget {self} = {ms:g} ms: {self.value:g} × {ref:.3f} ms, the latency {target.name}'s table "
                    f"predicts for the unpruned model in uniform {self.relative_to} ({workload.describe()})")


def parse_budgets(text: str) -> tuple[Budget, ...]:
    """``30ms`` / ``30`` / ``0.03s`` / ``0.7xint4`` / ``4ms,6ms,8ms`` -> budgets, in order, without repeats.

    Raises:
        UsageError: a term is neither a positive latency nor ``FACTORxFORMAT`` with a known format.
    """
    from llmshrink.formats import parse_format

    out = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        if m := re.fullmatch(r"([0-9]*\.?[0-9]+)\s*x\s*([a-z0-9_-]+)", part):
            parse_format(m.group(2))  # an unknown format fails here, with the formats named
            b = Budget(float(m.group(1)), m.group(2))
        elif m := re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(ms|s|us)?", part):
            b = Budget(float(m.group(1)) * _UNITS_MS[m.group(2) or "ms"])
        else:
            b = None
        if b is None or b.value <= 0:
            raise UsageError(f"--latency {text!r}: {part!r} is not a positive latency.",
                             "Write e.g. 30ms, 4ms,6ms,8ms, or 0.7xint4 (70% of the uniform int4 export's "
                             "predicted latency).")
        out.append(b)
    if not out:
        raise UsageError("--latency is empty.", "Write e.g. 30ms or 0.7xint4.")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Move:
    """One step down: what changed, the new spec, its predicted latency and the preference it costs."""

    what: str
    spec: SubnetSpec
    latency_ms: float
    cost: float


def fastest_reachable(space: SearchSpace, target, workload, table) -> tuple[float, SubnetSpec]:
    """The fastest subnet of the space the table knows of: the smallest widths, fewest blocks, and the
    fastest uniform format (the lm_head's chosen on its own)."""
    best: tuple[float, SubnetSpec] | None = None
    for fmt in space.formats:
        spec = space.smallest(fmt)
        for head in space.linear_formats("lm_head"):
            s = replace(spec, lm_head=head)
            ms = predict(s, target, workload, table=table).total_ms
            if best is None or ms < best[0]:
                best = (ms, s)
    return best


def num_weights(spec: SubnetSpec) -> int:
    """Weights of ``spec`` as the search's parameter penalty counts them: the kept blocks' linears, the
    embedding, and the lm_head unless it is tied and stays in the embedding's float32."""
    b, h = spec.base, spec.hidden_size
    total = sum(h * ls.head_dim * (2 * ls.num_heads + 2 * ls.num_kv_heads) + 3 * h * ls.intermediate_size
                for ls in spec.layers if ls.keep)
    own_head = not b.tied_embeddings or spec.lm_head != "fp32"
    return total + b.vocab_size * h * (2 if own_head else 1)


@dataclass(frozen=True)
class UnprunedFit:
    """The unpruned model in one format, shipped without a search (see :func:`unpruned_fit`)."""

    spec: SubnetSpec
    predicted_ms: float
    reason: str


def unpruned_fit(space: SearchSpace, target, workload, table, budget_ms: float, *,
                 params_budget: float | None = None, formats: Sequence[str] | None = None,
                 accepts: Callable[[SubnetSpec], bool] = lambda s: True) -> UnprunedFit | None:
    """The answer to a loose budget, or None when the budget needs a search.

    A budget is loose when the unpruned model, every linear in the space's most faithful search format
    (:func:`~llmshrink.formats.fidelity_key`), meets it (and ``params_budget``, if any). Nothing
    pruned or coarser can then beat the most faithful of ``formats`` (default: the target's) whose
    unpruned model the table predicts within the budget (the original itself when its float format
    fits): that one is returned, with a sentence saying why. Only formats at least as faithful as the
    search's most faithful one are considered (None when none of them builds: the search decides).
    ``accepts`` filters the formats a caller can build (the flavour's kernels).
    """
    from llmshrink.formats import fidelity_key, parse_format

    top = min(space.formats, key=fidelity_key)
    largest = space.largest(top)
    if params_budget and num_weights(largest) > params_budget:
        return None
    if predict(largest, target, workload, table=table).total_ms > budget_ms:
        return None
    for fmt, spec in _buildable_uniform(space, target, sorted(formats or target.formats, key=fidelity_key),
                                        accepts):
        if fidelity_key(fmt) > fidelity_key(top):
            break  # coarser than what the search may use: no claim to make
        ms = predict(spec, target, workload, table=table).total_ms
        if ms <= budget_ms:
            what = "the original model" if parse_format(fmt).is_float else "the unpruned model"
            return UnprunedFit(spec, ms, (
                f"{what} in {fmt} fits the {budget_ms:g} ms budget (predicted {ms:.2f} ms, {workload.describe()}); "
                f"{fmt} is the most faithful of {target.name}'s formats that fits, and every format the search "
                f"may use ({', '.join(space.formats)}) is at most as faithful, so a searched subnet (pruned or "
                "coarser) cannot beat it: shipped without a search"
                + ("" if parse_format(fmt).is_float else ", with the recovery a searched subnet gets")))
    return None


def uniform_fits(space: SearchSpace, target, workload, table, budget_ms: float, *,
                 params_budget: float | None = None, formats: Sequence[str] | None = None,
                 accepts: Callable[[SubnetSpec], bool] = lambda s: True) -> list[UnprunedFit]:
    """The uniform, unpruned models a budget admits without a search: every format of ``formats`` (default:
    the target's) whose unpruned model the table predicts within ``budget_ms`` (and ``params_budget``),
    that builds (``accepts``), and that no other such format is at least as faithful as on every axis
    (:func:`~llmshrink.formats.at_least_as_faithful`): ``w4g64a8`` is left out where ``w4g32a8`` fits,
    ``w4g32a8`` and ``w8a8`` both stay. Most faithful first (:func:`~llmshrink.formats.fidelity_key`).
    These are the baselines a searched subnet must beat at the same budget."""
    from llmshrink.formats import at_least_as_faithful, fidelity_key

    fits: dict[str, UnprunedFit] = {}
    for fmt, spec in _buildable_uniform(space, target, dict.fromkeys(formats or target.formats), accepts):
        if params_budget and num_weights(spec) > params_budget:
            continue
        ms = predict(spec, target, workload, table=table).total_ms
        if ms <= budget_ms:
            fits[fmt] = UnprunedFit(spec, ms, f"the unpruned model in uniform {fmt}, predicted {ms:.2f} ms: "
                                              "a baseline that needs no search")
    kept = [f for f in fits if not any(o != f and at_least_as_faithful(o, f) for o in fits)]
    return [fits[f] for f in sorted(kept, key=fidelity_key)]


def _buildable_uniform(space: SearchSpace, target, formats, accepts: Callable[[SubnetSpec], bool]
                       ) -> Iterator[tuple[str, SubnetSpec]]:
    """(format, unpruned uniform spec) for each of ``formats``, in order, that the model's widths allow (its
    group divides them) and ``accepts`` (the flavour) builds."""
    for fmt in formats:
        spec = SubnetSpec.uniform(space.base, fmt)
        try:
            spec.validate(allowed_formats=set(target.formats))
        except UsageError:  # SpecError: this format's group does not fit the model's widths
            continue
        if accepts(spec):
            yield fmt, spec


def fastest_format(space: SearchSpace, target, workload, table) -> str:
    """The space's format whose uniform, unpruned model the table predicts fastest."""
    return min(space.formats, key=lambda f: predict(space.largest(f), target, workload, table=table).total_ms)


def check_budget(space: SearchSpace, target, workload, table, budget_ms: float) -> float:
    """Raise :class:`InfeasibleBudgetError` when no subnet reaches ``budget_ms``; else the fastest latency."""
    fastest, _ = fastest_reachable(space, target, workload, table)
    if budget_ms < fastest:
        raise InfeasibleBudgetError(
            f"A latency budget of {budget_ms:.2f} ms is below the fastest subnet the search space reaches: "
            f"{fastest:.2f} ms ({workload.describe()}, {target.name}).",
            f"Give --latency {fastest * 1.05:.2f}ms or more, or widen the space (--space: smaller widths, "
            "fewer blocks, cheaper formats).")
    return fastest


def _neighbour(values: tuple, current, step: int) -> object | None:
    """The candidate ``step`` (-1: next smaller, +1: next larger) from ``current`` in sorted ``values``."""
    if current not in values:
        return None
    j = values.index(current) + step
    return values[j] if 0 <= j < len(values) else None


MOVE_KINDS = ("width", "depth", "precision")


def moves(spec: SubnetSpec, space: SearchSpace, kinds: tuple[str, ...] = MOVE_KINDS
          ) -> Iterator[tuple[str, SubnetSpec]]:
    """Every single step down from ``spec`` within ``space``, of the given kinds."""
    for kind, what, new, _ in _steps(spec, space, -1):
        if kind in kinds:
            yield what, new


def up_moves(spec: SubnetSpec, space: SearchSpace, kinds: tuple[str, ...] = MOVE_KINDS
             ) -> Iterator[tuple[str, SubnetSpec]]:
    """Every single step up from ``spec`` within ``space`` of the given kinds: one notch wider, a dropped block
    back (in the shape it was extracted with), a more faithful format."""
    for kind, what, new, _ in _steps(spec, space, +1):
        if kind in kinds:
            yield what, new


def _steps(spec: SubnetSpec, space: SearchSpace, step: int, block_order: Sequence[int] | None = None
           ) -> Iterator[tuple[str, str, SubnetSpec, int | None]]:
    """(kind, description, new spec, layer) of every one-notch change of ``spec`` in direction ``step``: widths
    one candidate narrower (-1) or wider (+1); a kept block dropped while ``min_layers`` allows (-1) or a
    dropped block kept (+1); any other format for any linear or the lm_head (-1: either direction, the caller
    keeps those that save time; +1: a more faithful one by :func:`.formats.fidelity_key`, so that a grow step
    never buys a coarser format and every step up is one notch up some total order, which cannot cycle).
    ``layer`` is the one layer the change touches (None: the hidden width or the lm_head).

    With ``block_order`` (blocks most important first, :meth:`.Importance.block_order`) a depth step follows
    it: only the least important kept block may be dropped, only the most important dropped one kept."""
    if block_order is not None:
        kept = [i for i in block_order if spec.layers[i].keep]
        dropped = [i for i in block_order if not spec.layers[i].keep]
        depth_ok = {kept[-1]} if step < 0 and kept else {dropped[0]} if step > 0 and dropped else set()
    else:
        depth_ok = range(len(spec.layers))
    h = _neighbour(space.hidden, spec.hidden_size, step)
    if h:
        yield "width", f"hidden {spec.hidden_size}->{h}", replace(spec, hidden_size=h), None
    for f in space.linear_formats("lm_head"):
        if f != spec.lm_head and (step < 0 or _more_faithful(f, spec.lm_head)):
            yield "precision", f"lm_head {spec.lm_head}->{f}", replace(spec, lm_head=f), None
    can_drop = len(spec.kept_layers()) > space.min_layers
    for i, ls in enumerate(spec.layers):
        def at(new, i=i):
            layers = list(spec.layers)
            layers[i] = new
            return replace(spec, layers=tuple(layers))

        if not ls.keep:
            if step > 0 and i in depth_ok:
                yield "depth", f"keep block {i}", at(replace(ls, keep=True)), i
            continue
        if step < 0 and can_drop and i in depth_ok:
            yield "depth", f"drop block {i}", at(replace(ls, keep=False)), i
        m = _neighbour(space.mlp, ls.intermediate_size, step)
        if m:
            yield "width", f"layer {i} mlp {ls.intermediate_size}->{m}", at(replace(ls, intermediate_size=m)), i
        per = ls.num_heads // ls.num_kv_heads
        g = _neighbour(space.kv_groups, ls.num_kv_heads, step)
        if g:
            yield "width", f"layer {i} kv groups {ls.num_kv_heads}->{g}", at(replace(ls, num_kv_heads=g,
                                                                                     num_heads=g * per)), i
        r = _neighbour(space.heads_per_group, per, step)
        if r:
            yield "width", f"layer {i} heads/group {per}->{r}", at(replace(ls, num_heads=ls.num_kv_heads * r)), i
        for name in LINEARS:
            for f in space.linear_formats(name):
                if f != ls.precision[name] and (step < 0 or _more_faithful(f, ls.precision[name])):
                    yield "precision", f"layer {i} {name} {ls.precision[name]}->{f}", at(
                        replace(ls, precision={**ls.precision, name: f})), i


@dataclass(frozen=True)
class _Priced:
    """One candidate move with the latency and scores of the spec it leads to."""

    what: str
    spec: SubnetSpec
    ms: float
    pref: float
    prior: float


class _MovePricer:
    """Prices every one-notch move of a fit or grow step, re-pricing only what the last move changed.

    Contract on what it is given: the latency, ``preference`` and ``fallback`` of a spec are each a sum
    of one term per layer (that layer's shape and formats, and the hidden width) plus terms of the
    hidden width and the lm_head alone — true of the table's prediction (per-op, see
    :mod:`~llmshrink.targets.predict`), the search's log-probability, :meth:`.Importance.preference`
    and :meth:`.Sensitivity.preference`. A move's change of all three then depends only on the layer it
    touches, the hidden width and the lm_head, so it is kept until one of those changes, and a step costs
    the ~20 moves of the layer just changed instead of every move of every layer (500+ predictions on
    SmolLM2-135M, ~3 s a step). Changes that are not finite (a pruned choice: -inf) are never kept.
    """

    def __init__(self, space: SearchSpace, target, workload, table, preference, fallback,
                 block_order: Sequence[int] | None = None) -> None:
        self.space, self.target, self.workload, self.table = space, target, workload, table
        self.preference, self.fallback, self.block_order = preference, fallback, block_order
        self._deltas: dict[tuple, tuple[float, float, float]] = {}

    def ms(self, spec: SubnetSpec) -> float:
        return predict(spec, self.target, self.workload, table=self.table).total_ms

    def scores(self, spec: SubnetSpec) -> tuple[float, float, float]:
        """(latency ms, preference, fallback) of ``spec`` (0.0 for a preference or fallback not given)."""
        return (self.ms(spec), self.preference(spec) if self.preference else 0.0,
                self.fallback(spec) if self.fallback else 0.0)

    def moves(self, spec: SubnetSpec, now: tuple[float, float, float], step: int,
              kinds: tuple[str, ...]) -> Iterator[_Priced]:
        """Every move of ``kinds`` from ``spec`` (whose scores are ``now``) in direction ``step``, priced."""
        for kind, what, new, i in _steps(spec, self.space, step, self.block_order):
            if kind not in kinds:
                continue
            key = None if i is None else (what, spec.hidden_size, spec.lm_head, _layer_key(spec.layers[i]))
            d = self._deltas.get(key) if key else None
            if d is not None:
                ms, pref, prior = (a + b for a, b in zip(now, d, strict=True))
            else:
                ms, pref, prior = scores = self.scores(new)
                d = tuple(b - a for a, b in zip(now, scores, strict=True))
                if key and all(math.isfinite(x) for x in d):  # not kept: a pruned choice (-inf) is no sum
                    self._deltas[key] = d
            yield _Priced(what, new, ms, pref, prior)


def _more_faithful(a: str, b: str) -> bool:
    return fidelity_key(a) < fidelity_key(b)


def _layer_key(ls) -> tuple:
    return (ls.keep, ls.num_heads, ls.num_kv_heads, ls.head_dim, ls.intermediate_size,
            tuple(sorted(ls.precision.items())))


def grow_to_budget(spec: SubnetSpec, space: SearchSpace, target, workload, table, budget_ms: float, *,
                   preference: Callable[[SubnetSpec], float], fallback: Callable[[SubnetSpec], float] | None = None,
                   kinds: tuple[str, ...] = MOVE_KINDS, max_moves: int = 500,
                   block_order: Sequence[int] | None = None) -> tuple[SubnetSpec, list[Move]]:
    """Spend what ``spec`` leaves of ``budget_ms``: add capacity back while the table predicts it fits.

    A search overshoots (its penalty acts only above the budget, and annealing sharpens the choices
    after the multiplier has pushed them), and the most probable subnet can land well under the budget
    — time the user gave and quality left on the table. Each step takes the step up (see
    :func:`up_moves`) that fits and loses the least ``preference`` per millisecond it costs (gains
    first); ties go by ``fallback`` (as in :func:`fit_to_budget`). A step the table prices at no time is
    taken first when it gains preference (largest gain first). It stops when none fits. ``Move.cost``
    is the preference lost (negative: gained). ``block_order``: a block comes back only in that order (see
    :func:`fit_to_budget`).
    """
    taken: list[Move] = []
    pricer = _MovePricer(space, target, workload, table, preference, fallback, block_order)
    now = pricer.scores(spec)
    while len(taken) < max_moves:
        best: _Priced | None = None
        best_key: tuple = (2,)
        for m in pricer.moves(spec, now, +1, kinds):
            added = m.ms - now[0]
            cost = now[1] - m.pref
            if m.ms > budget_ms or not math.isfinite(cost):
                continue
            if added <= 1e-9:
                # a step up the table prices at no time (its prices are not one per linear: on an adapted cpu
                # table q/k/v in one format are one fused call, and a lone 8-bit o_proj can cost more than
                # fp32): worth taking only for a strict gain, biggest first (more than round-off: a tie summed
                # in another order is no gain)
                if cost >= -1e-9 * max(1.0, abs(now[1])):
                    continue
                key = (0, cost, 0.0)
            else:
                key = (1, round(cost / added, 9), (now[2] - m.prior) / added if fallback else 0.0)
            if key < best_key:
                best, best_key = m, key
        if best is None:
            break
        taken.append(Move(best.what, best.spec, best.ms, now[1] - best.pref))
        spec, now = best.spec, pricer.scores(best.spec)
    return spec, taken


def fit_to_budget(spec: SubnetSpec, space: SearchSpace, target, workload, table, budget_ms: float, *,
                  preference: Callable[[SubnetSpec], float] | None = None,
                  fallback: Callable[[SubnetSpec], float] | None = None, kinds: tuple[str, ...] = MOVE_KINDS,
                  max_moves: int = 500, block_order: Sequence[int] | None = None) -> tuple[SubnetSpec, list[Move]]:
    """Step ``spec`` down until its predicted latency is within ``budget_ms``.

    Each step takes the move with the least preference lost per millisecond
    saved (``preference``: higher is better, e.g. the search's log-probability),
    among moves of ``kinds`` (width, depth, precision). Moves the preference
    cannot tell apart — equal rates, or all ruled out (a choice the search
    pruned: cost inf) — go by the least ``fallback`` lost per millisecond
    (a prior such as :meth:`.Importance.preference`), so a settled search
    never drops an important block because it saves the most; with neither,
    the largest saving. With ``block_order`` (most important first) a block is dropped only when every
    block after it in that order is already dropped: whatever the preference, the fit never drops a
    block the order ranks above one it keeps. Returns the final spec and the moves taken.

    Raises:
        InfeasibleBudgetError: no move helps any more and the budget is still not met.
    """
    taken: list[Move] = []
    pricer = _MovePricer(space, target, workload, table, preference, fallback, block_order)
    now = pricer.scores(spec)
    while now[0] > budget_ms:
        best: _Priced | None = None
        best_key: tuple = (2,)
        for m in pricer.moves(spec, now, -1, kinds):
            saved = now[0] - m.ms
            if saved <= 1e-9:
                continue
            cost = now[1] - m.pref
            tie = (now[2] - m.prior) / saved if fallback else -saved
            # a move the preference rules out (cost inf: a candidate the search pruned) only as a last
            # resort; a search that settled everything wide must still fit
            key = (1, tie) if not math.isfinite(cost) else (0, round(cost / saved, 9), tie)
            if key < best_key:
                best, best_key = m, key
        if best is None or len(taken) >= max_moves:
            raise InfeasibleBudgetError(
                f"Could not bring the subnet under {budget_ms:.2f} ms: it stays at {now[0]:.2f} ms "
                f"({workload.describe()}).", "Raise the budget or widen the search space.")
        taken.append(Move(best.what, best.spec, best.ms, now[1] - best.pref))
        spec, now = best.spec, pricer.scores(best.spec)
    return spec, taken


def resolve_budgets(latency, model: str, target: str, workload: Workload | None,
                    progress: Progress) -> tuple[tuple[float, ...], tuple[str, ...], str | None]:
    """Budgets in ms, a note per relative one saying what it resolved to, and the format validated against.

    The first relative budget's format (its canonical name) becomes the run's reference: bundles are
    validated relative to the unpruned model exported in it (see ``CompressConfig.reference``).
    """
    from llmshrink.formats import parse_format

    items = [latency] if isinstance(latency, (int, float, str)) else list(latency)
    terms = [t for x in items for t in (parse_budgets(x) if isinstance(x, str) else (Budget(float(x)),))]
    if not any(t.relative_to for t in terms):
        return tuple(dict.fromkeys(t.value for t in terms)), (), None
    from llmshrink.models import load_config, resolve_model

    tgt = load_target(target)
    table = table_for(tgt)
    base = BaseShape.from_config(load_config(resolve_model(model), progress=progress))
    resolved = [t.resolve(base, tgt, workload or tgt.default_workload, table) for t in terms]
    reference = parse_format(next(t.relative_to for t in terms if t.relative_to)).name
    return tuple(dict.fromkeys(ms for ms, _ in resolved)), tuple(n for _, n in resolved if n), reference
