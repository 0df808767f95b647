"""Adapt a latency table measured on another CPU to this one, from a few minutes of measurement.

A full profile (:mod:`.profilers.cpu`) takes 12-15 minutes; a table from
another CPU is wrong here in scale *and* in shape (int8 dot products, AMX and
AVX-512 move the int4 / int8 / fp32 ratios). HELP (NeurIPS 2021) and LitePred
(NSDI 2024) adapt a predictor to a new device from a handful of measured
samples; this does the same for a :class:`~.table.LatencyTable`:

1. **Quick profile** (:func:`adaptation_plan`): the full profiler's own machinery on
   a few subnets of the model family (the full widths, the narrowest, and
   random ones; every format of the target drawn per linear), timed at the same
   decode and prefill contexts with fewer runs. Each subnet's per-node times
   sample every kernel class at once: linears per format and row count, the
   lm_head, attention at three cache lengths, per-layer glue. Then one uniform
   full-width model per format of the target's ``quick_anchors`` (the plan's
   anchors; default: the search formats), whose calls give those formats
   wall-time calibration scales of their own.
2. **Ratios** (:func:`adapt_table`): for every quick op entry, this machine's
   time over the source table's prediction at the same dims. Each cost-model
   group (a linear's format and rows, an lm_head format, attention or glue per
   phase) gets the geometric median of its ratios when it has
   :data:`MIN_SAMPLES`, else its kernel class's in that phase, else the phase's.
3. **The adapted table**: the source's op entries times their group's ratio,
   plus the quick entries themselves (this machine's truth where it was
   measured). Wall entries, which calibrate node times to whole-call times
   (profiler cost per node, per-call overhead), come from the quick run only:
   that relation is this machine's and cannot be carried over.

The result is ``kind="adapted"``, never ``measured``: its provenance names the
source table, its host, the number of samples and the ratios, and ``targets
profile`` (full) replaces it while ``--quick`` never replaces a full profile.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from llmshrink.progress import NULL_PROGRESS, Progress
from llmshrink.targets.table import LatencyTable, OpEntry, Provenance, geo_median, kernel_class

MIN_SAMPLES = 3  # quick entries a group needs to get its own ratio, not its kernel class's


def adaptation_plan(anchors: Sequence[str] = ()):
    """The quick profile's plan (``targets profile --quick``): six random subnets, then a uniform full-width
    model in each of ``anchors`` (the target's :attr:`~.profile.TargetProfile.adaptation_anchors`), timed at
    the default decode and prefill contexts only (``lean_anchors``); node times from a third of the runs
    (``node_blocks``). The anchors pin the node-to-wall scale of
    the formats a search weighs and a run's uniform baselines are priced in, and time the uniform int4 model
    that ``xint4`` budgets are measured against.
    """
    from llmshrink.targets.profilers.cpu import ProfilePlan

    # Fewer subnets than a full profile, but every workload timed as the full profile and `validate` time it
    # (runs, blocks, warm-up): a floor taken over fewer blocks is a higher floor, and with 16 runs in 3 blocks
    # the adapted table over-predicted decode by ~10 %. The profiled pass (node times: how a call splits among
    # its nodes, scaled to the wall) runs two of those blocks: the full six put a 5-anchor adaptation at 164-198 s.
    return ProfilePlan(models=6, anchors=tuple(anchors), lean_anchors=True, node_blocks=2)


@dataclass(frozen=True)
class Ratios:
    """Per-group time ratios (this machine / source table), with the fallbacks they came from."""

    group: dict[tuple, float]  # OpEntry.group() -> ratio, groups with >= MIN_SAMPLES quick entries
    klass: dict[tuple[str, str], float]  # (phase, kernel class) -> ratio
    phase: dict[str, float]  # phase -> ratio
    samples: int  # quick op entries compared

    def of(self, e: OpEntry) -> float:
        g = self.group.get(e.group())
        if g is not None:
            return g
        k = self.klass.get((e.phase, kernel_class(e.op, e.fmt)))
        return k if k is not None else self.phase.get(e.phase, 1.0)


def measure_ratios(source: LatencyTable, quick: LatencyTable) -> Ratios:
    """Ratios of ``quick``'s op times to ``source``'s predictions at the same dims (see module docstring).

    Only op kinds the source table models are compared; ``wall`` and ``overhead`` entries never are, nor the
    entries of ``quick``'s uniform anchor calls: an anchor's ~200 same-format nodes, timed inside a full-size
    model, outvoted the random models' few samples of that format and carried the full model's per-node regime
    into that format alone. On a Xeon with AMX the adapted table then put uniform w4g32 at 1.23x uniform
    w4g32a8 (1.56x measured in turn) and its decode MAPE over 30 random subnets was 12.1 %; from the random
    models only, with the anchors in the wall-time calibration, the next run put w4g32 at 1.47x (1.43x
    measured) and the MAPE at 7.8 % (``benchmarks/results/latency_model_anchors_cpu.txt``, runs 2 and 3).
    """
    models = source.models
    by_group: dict[tuple, list[float]] = defaultdict(list)
    by_class: dict[tuple[str, str], list[float]] = defaultdict(list)
    by_phase: dict[str, list[float]] = defaultdict(list)
    anchors = quick.uniform_calls()
    for e in quick.entries:
        if e.op in ("wall", "overhead") or e.mean_ms <= 0 or (e.phase, e.dims.get("call")) in anchors:
            continue
        m = models.get(e.group())
        if m is None:
            continue
        pred = float(m(e.dims))
        if pred <= 0:
            continue
        r = e.mean_ms / pred
        by_group[e.group()].append(r)
        by_class[(e.phase, kernel_class(e.op, e.fmt))].append(r)
        by_phase[e.phase].append(r)
    return Ratios(group={g: geo_median(rs) for g, rs in by_group.items() if len(rs) >= MIN_SAMPLES},
                  klass={k: geo_median(rs) for k, rs in by_class.items()},
                  phase={p: geo_median(rs) for p, rs in by_phase.items()},
                  samples=sum(len(rs) for rs in by_group.values()))


def adapt_table(source: LatencyTable, quick: LatencyTable, *, command: str = "", seconds: float | None = None
                ) -> LatencyTable:
    """``source`` adapted to the machine ``quick`` was measured on (see module docstring).

    ``quick`` is a measured table of the same target and model family (an :func:`adaptation_plan` profile).
    The result keeps ``source``'s name and target, so it lands where a full profile of it would.
    """
    ratios = measure_ratios(source, quick)
    if not ratios.samples:
        from llmshrink.errors import UsageError

        raise UsageError(f"The quick measurement shares no op kind with table {source.name}: nothing to adapt.",
                         "Profile this machine in full with `llmshrink targets profile`.")
    scaled = [replace(e, mean_ms=e.mean_ms * ratios.of(e), std_ms=e.std_ms * ratios.of(e))
              for e in source.entries if e.op not in ("wall", "overhead")]
    # the quick run's calls are numbered after the source's, so no call mixes the two machines
    offset = 1 + max((e.dims.get("call", -1) for e in source.entries), default=-1)
    own = [replace(e, dims={**e.dims, "call": e.dims["call"] + offset}) if "call" in e.dims else e
           for e in quick.entries]
    sp, qp = source.provenance, quick.provenance
    walls = sum(e.op == "wall" for e in quick.entries)
    took = f" in {seconds / 60:.1f} min" if seconds is not None else ""
    origin = {"table": source.name, "kind": sp.kind, "date": sp.date, "cpu": sp.host.get("cpu", ""),
              "cpu_id": sp.host.get("cpu_id", ""), "samples": ratios.samples, "calls": walls,
              "seconds": seconds, "phase_ratios": {p: round(r, 4) for p, r in sorted(ratios.phase.items())},
              "class_ratios": {f"{p}/{k}": round(r, 4) for (p, k), r in sorted(ratios.klass.items())}}
    prov = Provenance(kind="adapted", date=datetime.now(UTC).isoformat(timespec="seconds"),
                      command=command or qp.command, host=qp.host, model=sp.model or qp.model,
                      sources=(f"{source.name} ({sp.kind}, {sp.date}, {sp.host.get('cpu', 'unknown CPU')})",),
                      notes=(f"adapted from {source.name} with {ratios.samples} op samples and {walls} timed calls "
                             f"on {qp.host.get('cpu', 'this CPU')}{took}, {datetime.now(UTC).date().isoformat()}; "
                             "not a full profile: `llmshrink targets profile` measures one.",),
                      adapted_from=origin)
    return LatencyTable(name=source.name, target=source.target, provenance=prov, entries=tuple(scaled + own),
                        threads=quick.threads)


def quick_adapt(source: LatencyTable, formats: Sequence[str], *, search_formats: Sequence[str] = (),
                anchors: Sequence[str] | None = None, threads: int | None = None, command: str = "", plan=None,
                progress: Progress = NULL_PROGRESS) -> LatencyTable:
    """Measure :func:`adaptation_plan` on this machine and return ``source`` adapted to it.

    ``anchors`` are the formats timed as uniform models (default: ``search_formats``).

    The subnets are drawn from the model family ``source`` was profiled on (its config only is read); their
    lm_heads follow :func:`lm_head_rotation`.
    """
    from llmshrink.models import load_config, resolve_model
    from llmshrink.spec import BaseShape
    from llmshrink.targets.profilers.cpu import profile_cpu

    model = source.provenance.model or "smollm2-135m"
    base = BaseShape.from_config(load_config(resolve_model(model.removeprefix("builtin:")), progress=progress))
    # Only the steady kernels are timed: the quick calls calibrate node times to wall times, and calls whose
    # linears drew 2- and 8-bit level-0 kernels (a quarter of the cpu target's formats) ran 7-40 ms against the
    # 2.5-6 ms of the subnets a search weighs, so their calibration missed those by -19 % in one run and +8 % in
    # the next. The volatile kernels keep their kernel class's or phase's ratio (measure_ratios' fallbacks).
    from llmshrink.targets.profilers.cpu import volatile_kernel

    steady = [f for f in formats if not volatile_kernel(f)] or list(formats)
    plan = plan or adaptation_plan(search_formats if anchors is None else anchors)
    # the anchors time their formats' lm_heads already: the random models' lm_heads go to other kernels first
    order = lm_head_rotation([f for f in steady if f not in plan.anchors],
                             [f for f in search_formats if f not in plan.anchors])
    order += [f for f in steady if f in plan.anchors]
    t0 = time.perf_counter()
    quick = profile_cpu(base, order, model=model, plan=plan, threads=threads, command=command,
                        name=source.name, target=source.target, progress=progress,
                        title=f"Adapting latency table {source.name} to this CPU")
    return adapt_table(source, quick, command=command, seconds=time.perf_counter() - t0)


def lm_head_rotation(formats: Sequence[str], search_formats: Sequence[str] = ()) -> list[str]:
    """``formats`` in the order a short profile gives them to its models' lm_heads (one format per model).

    The search's formats first (their own samples); then the first steady format of every lm_head kernel
    class not yet covered (symmetric and zero-point kernels apart); then the other steady formats; the
    kernels that swing between runs (:func:`~.profilers.cpu.volatile_kernel`) last.

    Why: the lm_head is the largest single op of a decode call, and its cost relative to fp32 flips between
    CPUs. With 8 models in target order the rotation reached w2g32, w2g64, w2g128 and no int4 kernel at
    accuracy level 0 (w4g32 at hidden 448: 0.65x fp32's time on the source's Zen 3, 0.30x on a Zen 4): 11
    of 30 random specs had such an lm_head and were over-predicted by ~1 ms, and the three calls ruled by a
    2-bit lm_head (30 ms, of which the node profiler read up to 60) doubled the calibration's error.
    Zero points flip too: w4g32z's lm_head cost 1.45x w4g32's on the Zen 3 and the same on the Zen 4.
    """
    from llmshrink.formats import parse_format
    from llmshrink.targets.profilers.cpu import volatile_kernel

    def variant(f: str) -> tuple[str, bool]:  # zero points are another kernel path, with costs of their own
        return kernel_class("lm_head", f), parse_format(f).symmetric

    first = [f for f in search_formats if f in formats]
    covered = {variant(f) for f in first}
    for f in formats:
        if f not in first and not volatile_kernel(f) and variant(f) not in covered:
            first.append(f)
            covered.add(variant(f))
    rest = [f for f in formats if f not in first]
    return first + [f for f in rest if not volatile_kernel(f)] + [f for f in rest if volatile_kernel(f)]


@dataclass(frozen=True)
class LocalTable:
    """What :func:`table_for_this_cpu` did: the table to use, and a sentence for the run's notes (or None)."""

    table: LatencyTable
    note: str | None = None
    adapted: bool = False


def table_for_this_cpu(target, *, adapt: bool = True, threads: int | None = None,
                       progress: Progress = NULL_PROGRESS) -> LocalTable:
    """The target's latency table, adapted to this CPU first when it was measured on another one.

    Only a table the target names (built-in, or this machine's profiled copy by that name) is adapted: the
    adapted table is written where ``targets profile`` writes that name (:func:`.table.profiled_table_path`),
    so the cpu target finds it from then on. A measured table of another CPU already there is kept beside it
    (``NAME.<cpu_id>.json``); nothing is lost. A table the target names by file path is used as given.
    With ``adapt=False`` (or nothing to adapt) the table is returned with the mismatch, if any, as its note.
    """
    from pathlib import Path

    from llmshrink.targets.predict import table_for
    from llmshrink.targets.table import host_mismatch, load_table, profiled_table_path

    by_name = bool(target.table) and Path(target.table).suffix not in (".json", ".gz")
    will_adapt = adapt and by_name and target.runtime == "onnxruntime-cpu"
    table = load_table(target.table) if will_adapt else table_for(target)  # table_for warns of a mismatch
    why = host_mismatch(table)
    if why is None or not will_adapt:
        return LocalTable(table, why)
    source = table
    path = profiled_table_path(target.table)
    if path.is_file():
        mine = load_table(path)
        if mine.kind == "adapted":  # an adaptation for another CPU: adapt the built-in table afresh instead
            source = load_table(builtin_table_path(target.table) or target.table)
        else:  # another CPU's full profile: adapt it, keep it
            cpu = str(mine.provenance.host.get("cpu_id", "other-cpu")).replace(" ", "_").replace("/", "-")
            path.rename(path.with_name(f"{target.table}.{cpu}.json"))
    adapted = quick_adapt(source, target.formats, search_formats=target.search_formats,
                          anchors=target.adaptation_anchors, threads=threads,
                          command=f"llmshrink (adapting {target.name}'s table)", progress=progress)
    adapted.save(path)
    info = adapted.provenance.adapted_from
    return LocalTable(load_table(path),
                      f"latency table {source.name} was measured on another CPU ({info['cpu'] or 'unrecorded'}); "
                      f"adapted to this one from {info['samples']} op samples and {info['calls']} timed calls in "
                      f"{info['seconds'] / 60:.1f} min, saved as {path} (a full profile: "
                      f"`llmshrink targets profile {target.name}`)", adapted=True)


def builtin_table_path(name: str) -> str | None:
    """The packaged table called ``name`` (by path, so that this machine's profiled copy does not shadow it)."""
    from importlib import resources

    res = resources.files("llmshrink.targets").joinpath(f"tables/{name}.json.gz")
    return str(res) if res.is_file() else None
