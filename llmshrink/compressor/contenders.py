"""Contenders: every model a budget could ship, the searched subnet and the baselines that need no search.

A search earns its place only by beating what a user gets without it. So for
each searched budget ``compress`` also builds (:func:`baselines`):

- every uniform format of the target whose unpruned model fits the budget, and
  that no other fitting format is at least as faithful as (``budget.uniform_fits``);
- mixed precision (given a :class:`.Sensitivity`): the unpruned model with a format per linear from the
  space's search formats, the least sensitive ones stepped down until the budget is met
  (:func:`.sensitivity.mixed_precision`); left out when precision alone cannot reach the budget. On
  SmolLM2-135M at uniform int4's latency it screened at KL 0.105 against uniform w4g32a8's 0.135 (131
  of 210 linears in w8g64a8, the rest 4-bit);
- the importance heuristic: the unpruned model in the space's fastest format,
  brought under the budget by the cuts :meth:`.Importance.preference` minds
  least (blocks by measured drop cost, widths by importance; never a format change);
  left out when that unpruned model already fits (it is then a uniform model).

All contenders then get the same treatment (:func:`screen`): the run's
quantizer (GPTQ) on the same calibration rows (the search's ``n_calib``; the winner
is quantized again on ``n_quant`` before recovery), then the forward KL from the
original model on *screening rows* that neither the search, the importance
scores nor the quantizer read. The contender with the lowest KL wins and gets
the run's recovery; the others are exported as they were screened, so the
report shows what each one was. Recovery goes to the winner alone: a run
affords one 300-step recovery, not one per contender (an equal share would
be a fraction each). A pruned subnet gains more from recovery than an
unpruned one, so this choice favours the unpruned baselines; the report says
which contender won and by how much.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from llmshrink import serde
from llmshrink.progress import NULL_PROGRESS, Progress

SEARCH = "search"  # the name of the searched subnet among a budget's contenders
MIXED = "mixed precision"  # the name of the mixed-precision baseline


@dataclass(frozen=True)
class Contender:
    """One model a budget could ship: its name (``search``, ``uniform w4g32a8``, ``importance``), spec,
    predicted latency and why it is in the running."""

    name: str
    spec: object  # SubnetSpec
    predicted_ms: float
    why: str

    @property
    def slug(self) -> str:
        """A directory name for it."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


@serde.serializable("ContenderOutcome")
@dataclass(frozen=True)
class ContenderOutcome:
    """What became of one contender: its screening KL and, once exported, its bundle and measurements."""

    name: str
    spec_fingerprint: str
    predicted_ms: float
    screen_kd: float  # forward KL from the original on the screening rows, after the quantizer, before recovery
    why: str = ""
    shipped: bool = False  # the winner: recovered and shipped as the budget's bundle
    bundle: str = ""  # relative to the run directory (the budget's own bundle for the winner)
    measured_ms: float | None = None
    # timed in turn with the run's reference (relative budgets): bundle / reference, as screened
    measured_ratio: float | None = None
    over_latency: str = ""  # why the latency guard kept it from shipping, when it did


def baselines(space, target, workload, table, budget_ms: float, importance, *, params_budget: float | None = None,
              formats=None, accepts: Callable = lambda s: True, sensitivity=None) -> list[Contender]:
    """The contenders of ``budget_ms`` that need no search (see module docstring), most faithful first; the
    mixed-precision one only with a ``sensitivity`` (:class:`.Sensitivity` of the unpruned model)."""
    from llmshrink.compressor.budget import (
        fastest_format,
        fit_to_budget,
        grow_to_budget,
        num_weights,
        uniform_fits,
    )
    from llmshrink.errors import InfeasibleBudgetError
    from llmshrink.formats import fidelity_key
    from llmshrink.targets.predict import predict

    out = [Contender(f"uniform {f.spec.lm_head}", f.spec, f.predicted_ms, f.reason)
           for f in uniform_fits(space, target, workload, table, budget_ms, params_budget=params_budget,
                                 formats=formats, accepts=accepts)]
    if sensitivity is not None:
        from collections import Counter

        from llmshrink.compressor.sensitivity import mixed_precision

        full = importance.apply(space.largest(min(space.formats, key=fidelity_key)), choose_blocks=False)
        mixed = mixed_precision(full, sensitivity, space, target, workload, table, budget_ms)
        used = Counter(f for i in mixed.kept_layers() for f in mixed.layers[i].precision.values()) if mixed else {}
        # one format everywhere is a uniform model: listed above, or outdone by one that is
        if (mixed is not None and len({*used, mixed.lm_head}) > 1 and accepts(mixed)
                and not (params_budget and num_weights(mixed) > params_budget)):
            ms = predict(mixed, target, workload, table=table).total_ms
            out.append(Contender(MIXED, mixed, ms, (
                "the unpruned model, each linear in the format its measured sensitivity affords: "
                + ", ".join(f"{n} in {f}" for f, n in used.most_common()) + f", lm_head {mixed.lm_head}; "
                f"predicted {ms:.2f} ms")))
    fastest = fastest_format(space, target, workload, table)
    start = importance.apply(space.largest(fastest), choose_blocks=False)
    kinds = ("width", "depth")
    order = importance.block_order()
    try:
        spec, cuts = fit_to_budget(start, space, target, workload, table, budget_ms,
                                   preference=importance.preference, kinds=kinds, block_order=order)
    except InfeasibleBudgetError:  # the fastest format alone cannot reach it; the search may, with others
        return out
    if not cuts:  # the unpruned model in the fastest format fits: a uniform model, listed or outdone by one
        return out
    spec, _ = grow_to_budget(spec, space, target, workload, table, budget_ms, preference=importance.preference,
                             kinds=kinds, block_order=order)
    if not accepts(spec) or any(c.spec == spec for c in out):
        return out
    kept = len(spec.kept_layers())
    ms = predict(spec, target, workload, table=table).total_ms
    out.append(Contender("importance", spec, ms, (
        f"the importance heuristic in {fastest}, the space's fastest format: {kept}/{spec.base.num_layers} blocks, "
        f"cut by block drop cost and channel importance to {ms:.2f} ms")))
    return out


def search_start(baselines: list[Contender], expresses: Callable) -> Contender | None:
    """The baseline a joint search starts from: the mixed-precision one when the budget has it, else the first
    (most faithful) of ``baselines``; only one the search space ``expresses``; None when it expresses none.

    Mixed precision first: on SmolLM2-135M at uniform int4's latency, the search started from it ended at
    screening KL 0.1015 against its start's 0.1051 (each decision 3 or 6 logits ahead: the same subnet, one more
    8-bit linear), its sampled KD falling to 0.100; started from uniform w4g32a8 (KL 0.135) it ended at 0.436,
    its sampled KD rising 1.08 -> 1.62 (``benchmarks/results/search_settings_1.0x_cpu.txt``)."""
    for c in sorted(baselines, key=lambda c: c.name != MIXED):  # stable: the others keep their order
        if expresses(c.spec):
            return c
    return None


def screen_kd(model, teacher, rows, *, batch_size: int = 8) -> float:
    """Mean forward KL (per token) from ``teacher`` (an HF causal LM) to ``model`` (a CompressedModel) on ``rows``
    ``[N, T]``: the teacher's log-probabilities are recomputed per batch rather than held (a vocabulary of 49k
    makes 64 rows of them 1.6 GB)."""
    import torch
    import torch.nn.functional as F

    from llmshrink.compressor.search import kd_loss
    from llmshrink.device import device_of

    dev = device_of(teacher)
    model = model.to(dev)  # one read back from disk (a resumed screening) loads on the host
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            ids = rows[i:i + batch_size].to(dev)
            vocab = int(teacher.config.vocab_size)
            target = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits[..., :vocab].float(), -1)
            total += float(kd_loss(model(ids)[0].float(), target, 1.0)) * len(ids)
            n += len(ids)
    return total / max(n, 1)


def screen(contenders: list[Contender], build: Callable, score: Callable, *, progress: Progress = NULL_PROGRESS,
           done: dict[str, float] | None = None, on_scored: Callable | None = None) -> list[tuple[Contender, float]]:
    """Score every contender: ``build(contender)`` gives its model (the quantizer's), ``score(model)`` its KL.

    ``done`` holds scores of a previous, interrupted screening (by name), which are not recomputed;
    ``on_scored(name, kd)`` is called after each new one (to persist it). Returns (contender, KL) pairs
    best first; ties keep the given order (the search first).
    """
    done = dict(done or {})
    with progress.task("Screening the contenders", total=len(contenders)) as task:
        for c in contenders:
            if c.name not in done:
                done[c.name] = float(score(build(c)))
                if on_scored is not None:
                    on_scored(c.name, done[c.name])
            task.advance(1, info=f"{c.name}: kd {done[c.name]:.4f}")
    return sorted(((c, done[c.name]) for c in contenders), key=lambda p: p[1])



@dataclass(frozen=True)
class Repricing:
    """A table corrected by one in-turn measurement (:func:`reprice`): which format, by what factor, and why."""

    table: object  # LatencyTable
    fmt: str
    factor: float
    note: str


def reprice(table, target, workload, spec, reference, measured_ratio: float) -> Repricing | None:
    """``table`` corrected so that it predicts ``spec``'s latency over ``reference``'s as measured in turn.

    The excess (measured ratio x the reference's prediction, minus ``spec``'s prediction) is put on the format
    with the most predicted time among ``spec``'s linears and lm_head in formats the reference does not use: the
    only terms of the ratio the reference cannot share. None when the table does not under-price ``spec`` or
    every format of ``spec`` is the reference's.

    Why one format: the case it was made for is the table of a fresh Zen 4, self-adapted, that priced w8g64a8
    linears like w4g32a8 ones, so that 188 of 210 linears in w8g64a8 predicted 1.000x uniform w4g32a8 and
    measured 1.067x; 89 % of that subnet's linear time is w8g64a8.
    """
    from llmshrink.targets.predict import predict
    from llmshrink.targets.table import with_format_scale

    if table.calibration is None or workload.phase not in ("decode", "prefill"):  # e2e: two phases, one ratio
        return None
    mine = predict(spec, target, workload, table=table)
    ref_ms = predict(reference, target, workload, table=table).total_ms
    excess = measured_ratio * ref_ms - mine.total_ms
    theirs = set(reference.formats_used(embedding=False))  # the embedding is a lookup, not priced by format
    share: dict[str, float] = {}
    for o in mine.ops:
        if o.op in ("linear", "lm_head") and o.fmt not in theirs:
            share[o.fmt] = share.get(o.fmt, 0.0) + o.ms
    if excess <= 0 or not share:
        return None
    fmt = max(share, key=share.__getitem__)
    factor = 1 + excess / share[fmt]
    note = (f"{fmt} linears priced x{factor:.3f} for this run: a subnet with {100 * share[fmt] / mine.total_ms:.0f} % "
            f"of its predicted time in {fmt} measured {measured_ratio:.3f}x the uniform {reference.lm_head} export "
            f"timed in turn, predicted {mine.total_ms / ref_ms:.3f}x")
    return Repricing(with_format_scale(table, workload.phase, fmt, factor, note), fmt, factor, note)
