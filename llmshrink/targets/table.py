"""LatencyTable: what one target's ops cost, measured or analytical, and the cost models fitted to it.

A table holds per-op entries keyed by a canonical op signature (op kind,
phase, dims, format) with mean/std/n, plus provenance: ``measured`` (host,
runtime version, date, the exact command) or ``analytical`` (the roofline
formula and the datasheet numbers it used). A table never pretends: its
``kind`` travels into every prediction, listing and manifest.

Op kinds and their dims (``rows`` = tokens processed by the call, batch
included; ``past`` = tokens already cached):

=============  =====================================  ===========================================
op             dims                                   cost-model features
=============  =====================================  ===========================================
linear         rows, k, n (+ fmt)                     1, k, n, k*n        (one model per fmt, rows)
lm_head        rows, k, n (+ fmt)                     1, k*n              (one model per fmt)
attention      rows, past, heads, kv_heads, head_dim  1, (h+2kv)*d*rows, kv*d*(past+rows),
                                                      h*d*rows*(past+rows) (one model per phase)
layer_glue     rows, hidden, mlp                      1, rows*hidden, rows*mlp
overhead       rows, layers                           1, layers, rows      (sign free: see below)
=============  =====================================  ===========================================

Each cost model is linear in its features, so it is bilinear in a linear's
K and N: exact for a memory-bound GEMV (bytes ~ K*N plus per-row and
per-column terms) and for a compute-bound GEMM at fixed rows. Coefficients
of linear/attention/glue are fitted non-negative, which makes predictions
monotone in every width (more heads or a wider MLP is never faster). The
``overhead`` model is the whole-call wall time minus the sum of per-node
times; it absorbs the runtime's per-call cost and the node profiler's own
per-node cost, so its per-layer term may be negative.

A query inside the measured range of a model's dims is ``interpolated`` (or
``measured`` on an exact entry); outside it is ``extrapolated`` and every
prediction reports it — never silently.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from llmshrink import serde
from llmshrink.errors import UsageError
from llmshrink.storage import atomic_write_bytes, atomic_write_text

TABLE_FORMAT = 1

# Features of each op kind, written with + and * only so that they evaluate
# on floats and on torch tensors alike (the search's expected latency uses
# the very same functions as `predict`).
FEATURES: dict[str, Callable[[dict[str, Any]], list[Any]]] = {
    "linear": lambda d: [1.0, d["k"], d["n"], d["k"] * d["n"]],
    "lm_head": lambda d: [1.0, d["k"] * d["n"]],
    "attention": lambda d: [1.0, (d["heads"] + 2 * d["kv_heads"]) * d["head_dim"] * d["rows"],
                            d["kv_heads"] * d["head_dim"] * (d["past"] + d["rows"]),
                            d["heads"] * d["head_dim"] * d["rows"] * (d["past"] + d["rows"])],
    "layer_glue": lambda d: [1.0, d["rows"] * d["hidden"], d["rows"] * d["mlp"]],
    "overhead": lambda d: [1.0, d["layers"], d["rows"]],
}
NONNEGATIVE = {"linear": True, "lm_head": True, "attention": True, "layer_glue": True, "overhead": False}
# Dims a query must lie within (per fitted model) to count as interpolated.
RANGE_DIMS = {"linear": ("k", "n"), "lm_head": ("rows", "k", "n"), "attention": ("rows", "past", "heads", "kv_heads", "head_dim"),
              "layer_glue": ("rows", "hidden", "mlp"), "overhead": ("rows", "layers")}


@serde.serializable("OpEntry")
@dataclass(frozen=True)
class OpEntry:
    """One measured (or computed) op: its signature and its time.

    ``std_ms`` is 0 where the source gives no spread: the cpu profiler stores
    each node's floor (fastest block's trimmed mean), analytical tables a formula.
    """

    op: str
    phase: str
    dims: dict[str, int]
    fmt: str = ""
    mean_ms: float = 0.0
    std_ms: float = 0.0
    n: int = 1

    def group(self) -> tuple:
        """Which cost model this entry feeds: linears per (fmt, rows), the lm_head per fmt, the rest per phase.

        The lm_head is its own kind: one [hidden x vocab] matmul, ten to a hundred
        times a layer linear's size, on which kernels behave differently (and
        prompts run it on one row, like decode).
        """
        if self.op == "linear":
            return (self.op, self.fmt, self.dims["rows"])
        if self.op == "lm_head":
            return (self.op, self.fmt)
        return (self.op, self.phase)


@serde.serializable("TableProvenance")
@dataclass(frozen=True)
class Provenance:
    """Where a table's numbers come from."""

    kind: str  # "measured" | "adapted" (another machine's table scaled by a quick measurement here) | "analytical"
    date: str = ""
    command: str = ""
    host: dict[str, Any] = field(default_factory=dict)  # cpu, cores, threads, runtime, versions
    model: str = ""  # the model family the op grid was drawn from
    formula: str = ""  # analytical tables: the roofline formula
    datasheet: dict[str, float] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    # kind "adapted": the source table (name, kind, date, CPU), samples, timed calls and ratios (targets.adapt)
    adapted_from: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CostModel:
    """A fitted linear cost model over one op kind's features (see module docstring)."""

    op: str
    coef: tuple[float, ...]
    lo: dict[str, float]
    hi: dict[str, float]
    n: int
    rel_rmse: float  # RMS error on its own entries: relative for op times, in ms for the overhead

    def features(self, dims: dict[str, Any]) -> list[Any]:
        return FEATURES[self.op](dims)

    def __call__(self, dims: dict[str, Any]) -> Any:
        f = self.features(dims)
        out = self.coef[0] * f[0]
        for c, x in zip(self.coef[1:], f[1:], strict=True):
            out = out + c * x
        return out

    def covers(self, dims: dict[str, Any]) -> bool:
        return all(self.lo[d] <= float(dims[d]) <= self.hi[d] for d in RANGE_DIMS[self.op] if d in self.lo)


def _sig(dims: dict[str, int]) -> tuple:
    return tuple(sorted((k, v) for k, v in dims.items() if k != "call"))


def kernel_class(op: str, fmt: str) -> str:
    """The calibration class of an op: one per kernel family (and per op kind for the lm_head).

    Classes, not formats, get a calibration scale (unless a uniform anchor model
    gives a format its own, :func:`calibration_key`): formats sharing a kernel
    share most of its profiling bias, and 14 scales can be fitted from a few
    hundred wall times of random mixes where 52 could not.
    """
    if op not in ("linear", "lm_head"):
        return op
    from llmshrink.formats import parse_format

    f = parse_format(fmt)
    if f.is_float:
        kind = f"fp{f.weight_bits}"
    elif f.group_size is None:
        kind = "w8a8"
    elif f.act != "none":
        kind = "int-a8"
    else:
        kind = f"int{f.weight_bits}"
    return f"{op}:{kind}"


def uniform_calls(entries: Sequence[OpEntry]) -> dict[tuple[str, int], str]:
    """(phase, call) -> format of every timed call (one with a ``wall`` entry) whose linears and lm_head all ran one
    format: a profile's uniform anchor models (``ProfilePlan.anchors``), never a random model's mix of a dozen
    formats. Calls without a wall (an adapted table's scaled copies of its source's entries) are not calls here.
    """
    fmts: dict[tuple[str, int], set[str]] = defaultdict(set)
    timed = set()
    for e in entries:
        if "call" not in e.dims:
            continue
        if e.op in ("linear", "lm_head"):
            fmts[(e.phase, e.dims["call"])].add(e.fmt)
        elif e.op == "wall":
            timed.add((e.phase, e.dims["call"]))
    return {k: next(iter(fs)) for k, fs in fmts.items() if len(fs) == 1 and k in timed}


def calibration_key(op: str, fmt: str, anchored: frozenset[str] | set[str] = frozenset()) -> str:
    """The calibration column an op's time goes to: its kernel class (:func:`kernel_class`), or for a linear or
    lm_head whose format the table has a uniform anchor model of, that format's own (``linear:int-a8@w4g32a8``).

    Why per format there: formats of one class differ in what the node profiler adds to them (on a Xeon with
    AMX, w4g32a8's MatMulNBits nodes read ~1.45x their share of the wall time, w4g64a8's and w8g64a8's much
    less), and the anchors are the evidence that tells them apart; without an anchor a format keeps its class's.
    """
    k = kernel_class(op, fmt)
    return f"{k}@{fmt}" if op in ("linear", "lm_head") and fmt in anchored else k


@dataclass(frozen=True)
class Calibration:
    """Per-phase scales from profiled op times to wall time, and the per-call overhead.

    ``wall ≈ Σ_key scale[key] · Σ(op times of that key) + a + b·layers + c·rows``,
    fitted on the table's ``wall`` entries (whole calls of the profiled
    models; every entry of one call carries the same ``call`` number). A key is a kernel class, or a format of
    which the table has a uniform anchor model (:func:`calibration_key`). The scales absorb what per-node
    profiling adds to or misses from each kernel family; they are pulled toward 1 (ridge), so a class seen in
    few models keeps its measured times.
    """

    scales: dict[str, dict[str, float]]  # phase -> class -> scale
    overhead: dict[str, tuple[float, float, float]]  # phase -> (a, b per layer, c per row)
    n: dict[str, int]
    rel_rmse: dict[str, float]
    # (phase, format) -> factor on that format's linears and lm_head, on top of its key's scale: a correction
    # from a measurement of whole models (:func:`with_format_scale`), never fitted from the table's own entries
    format_scales: dict[tuple[str, str], float] = field(default_factory=dict)
    anchored: frozenset[str] = frozenset()  # formats with scales of their own (:func:`calibration_key`)
    # (phase, format) -> factor on that format's linears and lm_head that makes the cost models' prediction of its
    # uniform anchor calls stand to each other as their walls (:func:`_anchor_fit`); only in
    # :meth:`LatencyTable.with_anchor_fit`, fitted from the table's own calls
    anchor_fit: dict[tuple[str, str], float] = field(default_factory=dict)

    def scale(self, phase: str, op: str, fmt: str = "") -> float:
        ph = self.scales.get(phase, {})
        key = calibration_key(op, fmt, self.anchored)
        s = ph[key] if key in ph else ph.get(kernel_class(op, fmt), 1.0)
        if op not in ("linear", "lm_head"):
            return s
        return s * self.format_scales.get((phase, fmt), 1.0) * self.anchor_fit.get((phase, fmt), 1.0)


RIDGE_PER_CALL = 0.01  # pull toward 1, growing with the evidence it has to outweigh


def _calibrate(entries: Sequence[OpEntry]) -> Calibration | None:
    calls: dict[tuple, dict[str, float]] = {}
    walls: dict[tuple, OpEntry] = {}
    anchored = frozenset(uniform_calls(entries).values())
    for e in entries:
        if "call" not in e.dims:
            continue
        key = (e.phase, e.dims["call"])
        if e.op == "wall":
            walls[key] = e
        elif e.op != "overhead":
            c = calls.setdefault(key, {})
            k = calibration_key(e.op, e.fmt, anchored)
            c[k] = c.get(k, 0.0) + e.mean_ms
    if not walls:
        return None
    scales, overhead, n, err = {}, {}, {}, {}
    for phase in sorted({k[0] for k in walls}):
        keys = [k for k in walls if k[0] == phase and k in calls]
        classes = sorted({c for k in keys for c in calls[k]})
        X = np.array([[calls[k].get(c, 0.0) for c in classes] + [1.0, walls[k].dims["layers"], walls[k].dims["rows"]]
                      for k in keys])
        y = np.array([walls[k].mean_ms for k in keys])
        w = 1.0 / y
        nc = len(classes)
        ridge = RIDGE_PER_CALL * len(keys)
        active = list(range(nc))
        for _ in range(nc + 1):
            cols = active + [nc, nc + 1, nc + 2]
            A = X[:, cols] * w[:, None]
            b = y * w
            # ridge rows pull each active scale toward 1
            R = np.zeros((len(active), len(cols)))
            R[np.arange(len(active)), np.arange(len(active))] = np.sqrt(ridge)
            sol, *_ = np.linalg.lstsq(np.vstack([A, R]), np.concatenate([b, np.sqrt(ridge) * np.ones(len(active))]),
                                      rcond=None)
            coef = np.zeros(nc + 3)
            coef[cols] = sol
            bad = [j for j in active if coef[j] <= 0]
            if not bad:
                break
            active = [j for j in active if j not in bad]
        scales[phase] = {c: float(coef[j]) for j, c in enumerate(classes)}
        overhead[phase] = (float(coef[nc]), float(coef[nc + 1]), float(coef[nc + 2]))
        n[phase] = len(keys)
        err[phase] = float(np.sqrt(np.mean(((X @ coef - y) * w) ** 2)))
    return Calibration(scales, overhead, n, err, anchored=anchored)


ANCHOR_FIT_RANGE = (0.5, 2.0)  # beyond this an anchor call is broken (a burst, a kernel fallback), not a bias


def _calls(entries: Sequence[OpEntry]) -> dict[tuple[str, int], list[OpEntry]]:
    by_call: dict[tuple[str, int], list[OpEntry]] = defaultdict(list)
    for e in entries:
        if "call" in e.dims:
            by_call[(e.phase, e.dims["call"])].append(e)
    return by_call


def _replay(ops: Sequence[OpEntry], cal: Calibration, models: dict[tuple, CostModel]) -> tuple[float, float, float]:
    """A timed call's ops through the cost models at their own dims: (linear and lm_head ms, other ops' ms,
    per-call overhead ms), each as a prediction would count it."""
    wall = next(e for e in ops if e.op == "wall")
    own = rest = 0.0
    for e in ops:
        if e.op in ("wall", "overhead") or e.group() not in models:
            continue
        t = float(models[e.group()](e.dims)) * cal.scale(e.phase, e.op, e.fmt)
        if e.op in ("linear", "lm_head"):
            own += t
        else:
            rest += t
    a, b, c = cal.overhead.get(wall.phase, (0.0, 0.0, 0.0))
    return own, rest, a + b * wall.dims["layers"] + c * wall.dims["rows"]


def _anchor_fit(cal: Calibration, entries: Sequence[OpEntry], models: dict[tuple, CostModel]) -> Calibration:
    """``cal`` with :attr:`Calibration.anchor_fit`: relative factors per (phase, format) of the uniform anchor
    calls, on that format's linear and lm_head times, at which the anchors' replayed predictions (:func:`_replay`)
    stand to each other as their measured wall times do.

    Why: the calibration fits node-to-wall scales on the calls' *measured* node times, but a prediction sums the
    *cost models'* times, and these can differ for one format. In an adapted table a format's cost models are
    its source's times times a ratio from a few random models; on a Xeon with AMX the adapted table put uniform
    w4g64a8 at 0.99x uniform int4 for decode, where the two measured 0.86x timed in turn and their anchors 0.80x
    (``benchmarks/results/latency_model_anchors_cpu.txt``, run 5). The uniform models a run's baselines and
    ``xint4`` budgets are priced in then stand to each other as their anchors measured.

    Each format's factor is the one at which its anchor's replay equals its wall (geometric median over its
    anchor calls in the phase), divided by the geometric mean of the phase's factors: the level stays the
    calibration's, fitted on every call. One full-size call per format sets their spread, not the level: in
    some hours of a shared VM the full-size models ran ~20 % slow while the small random ones did not, and the
    absolute factors (1.16-1.25 for decode in run 5) then put the random subnets' decode MAPE at 8.2 % (27 %
    worst) against 6.1 % without them; relative, 6.1 % (17 % worst), with the uniform models' ratios to int4
    within 8 % of those measured in turn (w8a8: 16 %, as its anchor read) against 13-16 % before.

    Why it is not the default (:meth:`LatencyTable.with_anchor_fit` applies it): priced right, uniform w4g64a8 is
    0.85x int4 for decode, and the search at 1.15x int4 bought it for 11 % of the linears. The one Quick start run
    with the fit shipped WikiText-2 31.25 (35 % of the gap between recovered uniform int4 and the original), the
    run from the same clone without it 30.38 (64 %); the search's quality side does not yet see what GPTQ makes of
    w4g64a8 (``benchmarks/results/baselines_1.15x_formats_cpu.txt``, session 43). One run each.
    """
    by_call = _calls(entries)
    found: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (phase, call), fmt in uniform_calls(entries).items():
        ops = by_call[(phase, call)]
        own, rest, overhead = _replay(ops, cal, models)
        if own <= 0:
            continue
        wall = next(e for e in ops if e.op == "wall").mean_ms
        factor = (wall - rest - overhead) / own
        if ANCHOR_FIT_RANGE[0] <= factor <= ANCHOR_FIT_RANGE[1]:
            found[(phase, fmt)].append(factor)
    fit = {k: geo_median(v) for k, v in found.items()}
    level = {ph: math.exp(float(np.mean([math.log(v) for (p, _), v in fit.items() if p == ph])))
             for ph in {p for p, _ in fit}}
    return replace(cal, anchor_fit={k: v / level[k[0]] for k, v in fit.items()})


def geo_median(xs: Sequence[float]) -> float:
    """The median in log space: robust to the odd node or call the profiler caught mid-burst."""
    logs = sorted(math.log(x) for x in xs)
    mid = len(logs) // 2
    return math.exp(logs[mid] if len(logs) % 2 else (logs[mid - 1] + logs[mid]) / 2)


def _fit(op: str, entries: Sequence[OpEntry]) -> CostModel:
    """Least squares of time on features.

    Non-negative kinds (op times) minimise relative error and try every
    subset of features, keeping the best fit whose coefficients are all >= 0
    (an exact NNLS for 3-4 features). The overhead is a difference of two
    measurements, near zero and of either sign, so it is fitted in absolute
    terms.
    """
    X = np.array([FEATURES[op](e.dims) for e in entries], dtype=np.float64)
    y = np.array([e.mean_ms for e in entries], dtype=np.float64)
    w = 1.0 / np.maximum(y, 1e-6) if NONNEGATIVE[op] else np.ones_like(y)
    Xw, yw = X * w[:, None], y * w
    scale = np.maximum(np.abs(Xw).max(0), 1e-30)  # column scaling for conditioning
    best: tuple[float, np.ndarray] | None = None
    cols = range(X.shape[1])
    subsets = [c for r in range(X.shape[1], 0, -1) for c in itertools.combinations(cols, r)] if NONNEGATIVE[op] \
        else [tuple(cols)]
    for subset in subsets:
        idx = list(subset)
        sol, *_ = np.linalg.lstsq(Xw[:, idx] / scale[idx], yw, rcond=None)
        coef = np.zeros(X.shape[1])
        coef[idx] = sol / scale[idx]
        if NONNEGATIVE[op] and (coef < 0).any():
            continue
        err = float(np.sqrt(np.mean(((X @ coef - y) * w) ** 2)))
        if best is None or err < best[0] - 1e-12:
            best = (err, coef)
    assert best is not None  # the single-feature fits include a non-negative one
    if not NONNEGATIVE[op] and len(entries) > 8:
        # The overhead is a difference of wall times taken on a shared machine; a
        # burst of neighbour load doubles one now and then. Drop residuals beyond
        # 3 robust standard deviations and refit once.
        r = X @ best[1] - y
        mad = 1.4826 * float(np.median(np.abs(r - np.median(r)))) or 1e-9
        keep = np.abs(r - np.median(r)) <= 3 * mad
        if keep.sum() >= X.shape[1] and not keep.all():
            return _fit(op, [e for e, k in zip(entries, keep, strict=True) if k])
    dims = RANGE_DIMS[op]
    lo = {d: float(min(e.dims[d] for e in entries)) for d in dims}
    hi = {d: float(max(e.dims[d] for e in entries)) for d in dims}
    return CostModel(op, tuple(float(c) for c in best[1]), lo, hi, len(entries), best[0])


@serde.serializable("LatencyTable")
@dataclass(frozen=True)
class LatencyTable:
    """Per-op latencies for one target (see module docstring).

    ``entries`` are the raw points; ``models`` fits them (or, for an
    analytical table, ``analytical_models`` gives them in closed form).
    """

    name: str
    target: str
    provenance: Provenance
    entries: tuple[OpEntry, ...] = ()
    threads: int | None = None
    format_version: int = TABLE_FORMAT

    @property
    def kind(self) -> str:
        return self.provenance.kind

    @cached_property
    def models(self) -> dict[tuple, CostModel]:
        """Cost model per group (see :meth:`OpEntry.group`); fitted once per table object."""
        groups: dict[tuple, list[OpEntry]] = {}
        for e in self.entries:
            if e.op != "wall":
                groups.setdefault(e.group(), []).append(e)
        return {key: _fit(key[0], es) for key, es in sorted(groups.items(), key=lambda kv: str(kv[0]))}

    @cached_property
    def calibration(self) -> Calibration | None:
        """Wall-time calibration (measured tables with ``wall`` entries), else None (without the anchor fit:
        :meth:`with_anchor_fit`)."""
        return _calibrate(self.entries)

    @cached_property
    def _exact(self) -> dict[tuple, float]:
        return {(e.op, e.phase, e.fmt, _sig(e.dims)): e.mean_ms for e in self.entries if e.op != "wall"}

    def is_exact(self, op: str, phase: str, fmt: str, dims: dict[str, int]) -> bool:
        return (op, phase, fmt, _sig(dims)) in self._exact

    def uniform_calls(self) -> set[tuple[str, int]]:
        """(phase, call) of the profile's uniform anchor models (module function :func:`uniform_calls`)."""
        return set(uniform_calls(self.entries))

    def without_anchors(self) -> LatencyTable:
        """This table without the entries of its uniform calls (:meth:`uniform_calls`): what it would be had
        the profile timed no anchors, for judging what they add (``benchmarks/latency_model.py``)."""
        drop = self.uniform_calls()
        return replace(self, entries=tuple(e for e in self.entries
                                           if "call" not in e.dims or (e.phase, e.dims["call"]) not in drop))

    def with_anchor_fit(self) -> LatencyTable:
        """This table predicting with :attr:`Calibration.anchor_fit` (:func:`_anchor_fit`; the same fits and
        calibration otherwise), for judging what the fit does (``benchmarks/latency_model.py``). Not the default:
        see :func:`_anchor_fit` for what it did to a compress run."""
        cal = self.calibration
        return _with_calibration(self, _anchor_fit(cal, self.entries, self.models) if cal and cal.anchored else cal)

    def replayed_ms(self, phase: str, call: int) -> float:
        """A timed call of this table's profile predicted by the table from its own op dims (its wall's model)."""
        cal = self.calibration
        if cal is None:
            raise ValueError(f"table {self.name} has no wall-time calibration")
        return sum(_replay(_calls(self.entries)[(phase, call)], cal, self.models))

    def linear_rows(self, fmt: str) -> list[int]:
        """The row counts a format's linear was measured at, ascending."""
        return sorted(k[2] for k in self.models if k[0] == "linear" and k[1] == fmt)

    def formats(self) -> list[str]:
        return sorted({k[1] for k in self.models if k[0] == "linear"})

    def summary(self) -> dict[str, Any]:
        """What listings show: kind, provenance, size and fit quality."""
        fits = self.models
        worst = max(fits.values(), key=lambda m: m.rel_rmse) if fits else None
        cal = self.calibration
        return {"name": self.name, "kind": self.kind, "entries": len(self.entries), "cost_models": len(fits),
                "calibration": None if cal is None else {"calls": cal.n, "rel_rmse": {k: round(v, 4) for k, v in
                                                                                    cal.rel_rmse.items()},
                                                         "scales": cal.scales},
                "formats": self.formats(), "worst_fit": None if worst is None else
                {"op": worst.op, "rel_rmse": round(worst.rel_rmse, 4)},
                "provenance": serde.to_dict(self.provenance)["_data"]}

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON (gzip-compressed when the name ends in ``.gz``)."""
        path = Path(path)
        text = json.dumps(serde.to_dict(self), indent=None, separators=(",", ":")) + "\n"
        if path.suffix == ".gz":
            atomic_write_bytes(path, gzip.compress(text.encode(), mtime=0))
        else:
            atomic_write_text(path, text)
        return path


def host_mismatch(table: LatencyTable) -> str | None:
    """Why this machine is not the one a measured ONNX Runtime CPU table was taken on; None when it
    is (as far as the table recorded its host), or when the table is not a CPU measurement.

    The same graph times differently on CPUs with other int8 instructions (VNNI or not) or core
    counts, so a prediction from another machine's table is a guess about this one.
    """
    import os

    from llmshrink.host import cpu_features, cpu_id, cpu_model

    prov = table.provenance
    host = prov.host
    if prov.kind not in ("measured", "adapted") or host.get("runtime") != "onnxruntime-cpu":
        return None
    here = {"cpu": cpu_model(), "cpu_id": cpu_id(), "isa": sorted(cpu_features()), "cores": os.cpu_count()}
    diffs = [f"{k} {host[k] if k != 'isa' else sorted(host[k])} vs {here[k]} here" for k in here
             if k in host and (sorted(host[k]) if k == "isa" else host[k]) != here[k]]
    if not diffs:
        return None
    return (f"latency table {table.name} was measured on another CPU ({'; '.join(map(str, diffs))}): its "
            f"predictions are not this machine's. Adapt it here with `llmshrink targets profile {table.target} "
            f"--quick` (~3 min; `compress` does so by itself), or profile this machine in full with `llmshrink "
            f"targets profile {table.target}` (~20 min); either is written where the target finds it.")


def with_format_scale(table: LatencyTable, phase: str, fmt: str, factor: float, why: str) -> LatencyTable:
    """``table`` with ``fmt``'s linears and lm_head predicted ``factor`` times their time in ``phase``.

    A correction from measuring whole models on this machine (``compress``'s latency guard), held in memory for
    one run and never saved: the fitted models are shared with ``table``, not refitted, and the provenance notes
    say ``why``. Only a measured table (one with a wall-time calibration) can be corrected.

    Raises:
        ValueError: ``table`` has no calibration (an analytical table, or one without wall entries).
    """
    cal = table.calibration
    if cal is None:
        raise ValueError(f"table {table.name} has no wall-time calibration to correct")
    prov = replace(table.provenance, notes=(*table.provenance.notes, why))
    key = (phase, fmt)
    return _with_calibration(replace(table, provenance=prov),
                             replace(cal, format_scales={**cal.format_scales,
                                                         key: cal.format_scales.get(key, 1.0) * factor}),
                             like=table)


def _with_calibration(table: LatencyTable, cal: Calibration | None, like: LatencyTable | None = None
                      ) -> LatencyTable:
    """A copy of ``table`` predicting with ``cal``, sharing the fits of ``like`` (default ``table``): the
    cached_property slots are filled, so nothing is fitted again."""
    like = like or table
    out = replace(table)
    out.__dict__["models"] = like.models
    out.__dict__["_exact"] = like._exact
    out.__dict__["calibration"] = cal
    return out


def profiled_table_path(name: str) -> Path:
    """Where ``targets profile`` writes the table called ``name`` by default; a table there takes
    precedence over the built-in one of the same name (this machine's own measurement wins)."""
    from llmshrink.storage import home

    return home() / "tables" / f"{name}.json"


def _profiled(name: str) -> Path | None:
    p = profiled_table_path(name)
    for cand in (p, p.with_suffix(".json.gz")):
        if cand.is_file():
            return cand
    return None


@functools.lru_cache(maxsize=8)
def _parse(data: bytes, name: str):
    """The table in ``data`` — cached by content: tables are frozen, and parsing and fitting the shipped
    cpu table took seconds per call (every ``predict`` without ``table=``, every CLI step)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        raw = json.loads(data)
    except ValueError as e:
        raise UsageError(f"{name} is not a latency table (not JSON: {e}).") from None
    return serde.from_dict(raw) if isinstance(raw, dict) and "_type" in raw else raw


def load_table(path_or_name: str | Path) -> LatencyTable:
    """A table from a JSON (or ``.json.gz``) file, or by name: the one ``targets profile`` wrote on
    this machine (:func:`profiled_table_path`), else the built-in ``targets/tables/NAME.json.gz``.

    Raises:
        UsageError: no such file or built-in table, or not a LatencyTable.
    """
    path = Path(path_or_name).expanduser()
    if path.suffix in (".json", ".gz"):
        if not path.is_file():
            raise UsageError(f"No such latency table file: {path}.",
                             "Give a table JSON written by `llmshrink targets profile`, or a built-in table name.")
        data = path.read_bytes()
    elif (mine := _profiled(str(path_or_name))) is not None:
        data = mine.read_bytes()
    else:
        res = resources.files("llmshrink.targets").joinpath(f"tables/{path_or_name}.json.gz")
        if not res.is_file():
            raise UsageError(f"No built-in latency table {str(path_or_name)!r}.",
                             "Give a table JSON written by `llmshrink targets profile`, or a built-in table name.")
        data = res.read_bytes()
    table = _parse(data, str(path_or_name))
    if not isinstance(table, LatencyTable):
        raise UsageError(f"{path_or_name} holds a {type(table).__name__}, not a LatencyTable.")
    if table.format_version != TABLE_FORMAT:
        raise UsageError(f"{path_or_name} is table format {table.format_version}; this llmshrink reads {TABLE_FORMAT}.",
                         "Re-run `llmshrink targets profile` with this version.")
    return table
