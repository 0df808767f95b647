"""One latency predictor, used three times: by the search, for a finished spec, and by ``validate``.

``predict(spec, target, workload)`` walks the ops the exporter emits for
``spec`` — per kept layer: q/k/v (one packed linear when they share a
format, as the ``ort`` flavour packs them), attention, o, gate, up, down and
the layer's norms/activation glue; then the lm_head (one row per sequence:
prompts only compute the last position's logits) and the per-call overhead —
and sums the table's cost model of each. ``expected_latency`` is the same sum
over *probabilities* of choices, in torch, for the differentiable search;
at one-hot probabilities it equals ``predict`` (a test holds it to that).

Why expectations are exact: every cost model is linear in features that are
products of distinct, independently chosen values (hidden size, kv heads,
heads per group, head size, MLP size; see ``table.FEATURES``), so the
expected cost is the cost at the expected values — per format, weighted by
the format's probability. Packed q/k/v is the one coupling: it applies when
all three pick the same format, with probability ``Σ_f pq(f)·pk(f)·pv(f)``.

Workloads: ``decode`` is one new token per sequence with ``context`` cached;
``prefill`` is ``context`` new tokens; ``e2e`` is a prefill plus
``new_tokens`` decode steps, whose attention grows linearly with the cache,
so it is predicted exactly as that many steps at the mean cache length.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmshrink import serde
from llmshrink.errors import LlmshrinkError, UsageError
from llmshrink.spec import LINEARS, SubnetSpec
from llmshrink.targets.profile import TargetProfile
from llmshrink.targets.table import CostModel, LatencyTable
from llmshrink.targets.workload import Workload

log = logging.getLogger("llmshrink")

STATUS_ORDER = ("measured", "interpolated", "analytical", "extrapolated")


class NoTableError(LlmshrinkError):
    """The target has no latency table to predict from."""

    exit_code = 2


@serde.serializable("PredictedOp")
@dataclass(frozen=True)
class PredictedOp:
    """One op of a prediction: where it sits, its signature, its time and how the table covered it."""

    name: str
    op: str
    fmt: str
    dims: dict[str, int]
    ms: float
    status: str


@serde.serializable("Prediction")
@dataclass(frozen=True)
class Prediction:
    """A predicted latency with its per-op breakdown and table coverage."""

    total_ms: float
    workload: Workload
    target: str
    table: str
    table_kind: str  # measured | analytical
    ops: tuple[PredictedOp, ...] = ()
    coverage: dict[str, float] = field(default_factory=dict)  # share of predicted time per status

    @property
    def extrapolated(self) -> list[PredictedOp]:
        return [o for o in self.ops if o.status == "extrapolated"]

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for o in self.ops:
            out[o.op] = out.get(o.op, 0.0) + o.ms
        return out

    def summary(self) -> str:
        label = "analytical" if self.table_kind == "analytical" else "measured table"
        extra = f", {len(self.extrapolated)} ops extrapolated" if self.extrapolated else ""
        return f"{self.total_ms:.2f} ms predicted ({label} {self.table}{extra}) — {self.workload.describe()}"


_WARNED: set[str] = set()  # each mismatch is said once per process


def table_for(target: TargetProfile) -> LatencyTable:
    """The latency table a target predicts with: its shipped table, or its analytical roofline.

    Raises:
        NoTableError: the target names no table and has no roofline datasheet.
    """
    from llmshrink.targets import analytical
    from llmshrink.targets.table import host_mismatch, load_table

    if target.table:
        table = load_table(target.table)
        why = host_mismatch(table)
        if why and why not in _WARNED:
            _WARNED.add(why)
            log.warning(why)
        return table
    if analytical.has_roofline(target):
        return analytical.roofline_table(target)
    raise NoTableError(f"Target {target.name} has no latency table.",
                       f"Measure one with `llmshrink targets profile {target.name}`, then name it in the "
                       "target's `table:` field.")


def _phase_shape(w: Workload) -> tuple[str, int, int]:
    """(table phase, new tokens per sequence, cached tokens) of a single-call workload."""
    return ("decode", 1, w.context) if w.phase == "decode" else ("prefill", w.context, 0)


class Predictor:
    """Cost models of one table, specialised to one single-call workload (decode or prefill)."""

    def __init__(self, table: LatencyTable, workload: Workload) -> None:
        if workload.phase == "e2e":
            raise UsageError("Predictor takes a decode or prefill workload; e2e is composed by predict().")
        self.table, self.workload = table, workload
        self.phase, self.new, self.past = _phase_shape(workload)
        self.batch = workload.batch
        self.rows = self.batch * self.new
        self.cal = table.calibration

    def scale(self, op: str, fmt: str = "") -> float:
        """The calibration scale of an op (its kernel class's, or its anchored format's; 1 without a calibration)."""
        return self.cal.scale(self.phase, op, fmt) if self.cal is not None else 1.0

    def overhead_ms(self, layers):
        """Per-call overhead (float or tensor): the calibration's, else the table's overhead model."""
        if self.cal is not None:
            a, b, c = self.cal.overhead[self.phase]
            return a + b * layers + c * self.rows
        return self.model("overhead")({"rows": self.rows, "layers": layers})

    # ------------------------------------------------------------ lookups
    def linear_model(self, fmt: str, rows: int) -> tuple[tuple[float, ...], str]:
        """Coefficients of ``fmt``'s linear at ``rows`` (interpolated between measured rows) and a status."""
        measured = self.table.linear_rows(fmt)
        if not measured:
            raise NoTableError(f"Table {self.table.name} has no linear measurements for format {fmt}.",
                               "Choose formats the target's table covers (see `llmshrink targets show`).")
        models = {r: self.table.models[("linear", fmt, r)] for r in measured}
        if rows in models:
            return models[rows].coef, "ok"
        if rows < measured[0] or rows > measured[-1]:
            lo, hi = (measured[0], measured[min(1, len(measured) - 1)]) if rows < measured[0] \
                else (measured[max(-2, -len(measured))], measured[-1])
            status = "extrapolated"
        else:
            hi = next(r for r in measured if r > rows)
            lo = max(r for r in measured if r < rows)
            status = "ok"
        if lo == hi:
            return models[lo].coef, status
        t = (rows - lo) / (hi - lo)
        coef = tuple((1 - t) * a + t * b for a, b in zip(models[lo].coef, models[hi].coef, strict=True))
        return coef, status

    def model(self, op: str) -> CostModel:
        key = (op, self.phase)
        if key not in self.table.models:
            raise NoTableError(f"Table {self.table.name} has no {op} measurements for {self.phase}.")
        return self.table.models[key]

    def _status(self, cm_covers: bool, exact: bool, status: str = "ok") -> str:
        if self.table.kind == "analytical":
            return "analytical" if status != "extrapolated" and cm_covers else "extrapolated"
        if status == "extrapolated" or not cm_covers:
            return "extrapolated"
        return "measured" if exact else "interpolated"

    # ------------------------------------------------------------- ops
    def linear(self, name: str, fmt: str, k: int, n: int, rows: int | None = None) -> PredictedOp:
        rows = self.rows if rows is None else rows
        coef, status = self.linear_model(fmt, rows)
        dims = {"rows": rows, "k": k, "n": n}
        near = self.table.models[("linear", fmt, self.table.linear_rows(fmt)[0])]
        covers = all(near.lo[d] <= dims[d] <= near.hi[d] for d in ("k", "n"))
        ms = float(CostModel("linear", coef, {}, {}, 0, 0.0)(dims)) * self.scale("linear", fmt)
        return PredictedOp(name, "linear", fmt, dims, ms,
                           self._status(covers, self.table.is_exact("linear", self.phase, fmt, dims), status))

    def lm_head_model(self, fmt: str) -> CostModel:
        key = ("lm_head", fmt)
        if key not in self.table.models:
            raise NoTableError(f"Table {self.table.name} has no lm_head measurements for format {fmt}.",
                               "Choose an lm_head format the target's table covers (see `llmshrink targets show`).")
        return self.table.models[key]

    def lm_head(self, fmt: str, k: int, n: int) -> PredictedOp:
        """The output projection: one row per sequence (prompts only need the last position's logits)."""
        cm = self.lm_head_model(fmt)
        dims = {"rows": self.batch, "k": k, "n": n}
        return PredictedOp("lm_head", "lm_head", fmt, dims, float(cm(dims)) * self.scale("lm_head", fmt),
                           self._status(cm.covers(dims), self.table.is_exact("lm_head", self.phase, fmt, dims)))

    def _other(self, name: str, op: str, dims: dict[str, int]) -> PredictedOp:
        if op == "overhead" and self.cal is not None:
            return PredictedOp(name, op, "", dims, float(self.overhead_ms(dims["layers"])), "interpolated")
        cm = self.model(op)
        return PredictedOp(name, op, "", dims, float(cm(dims)) * self.scale(op),
                           self._status(cm.covers(dims), self.table.is_exact(op, self.phase, "", dims)))

    def ops(self, spec: SubnetSpec) -> list[PredictedOp]:
        """Every op of ``spec``'s exported graph with its predicted time."""
        h, out = spec.hidden_size, []
        for j, i in enumerate(spec.kept_layers()):
            ls, p = spec.layers[i], f"layers.{j}"
            q, kv = ls.num_heads * ls.head_dim, ls.num_kv_heads * ls.head_dim
            fq, fk, fv = (ls.precision[n] for n in ("q_proj", "k_proj", "v_proj"))
            if fq == fk == fv:
                out.append(self.linear(f"{p}.qkv_proj", fq, h, q + 2 * kv))
            else:
                out += [self.linear(f"{p}.q_proj", fq, h, q), self.linear(f"{p}.k_proj", fk, h, kv),
                        self.linear(f"{p}.v_proj", fv, h, kv)]
            out.append(self._other(f"{p}.attention", "attention",
                                   {"rows": self.new, "past": self.past, "heads": ls.num_heads,
                                    "kv_heads": ls.num_kv_heads, "head_dim": ls.head_dim, "batch": self.batch}))
            out.append(self.linear(f"{p}.o_proj", ls.precision["o_proj"], q, h))
            for n in ("gate_proj", "up_proj"):
                out.append(self.linear(f"{p}.{n}", ls.precision[n], h, ls.intermediate_size))
            out.append(self.linear(f"{p}.down_proj", ls.precision["down_proj"], ls.intermediate_size, h))
            out.append(self._other(f"{p}.glue", "layer_glue",
                                   {"rows": self.rows, "hidden": h, "mlp": ls.intermediate_size}))
        out.append(self.lm_head(spec.lm_head, h, spec.base.vocab_size))
        out.append(self._other("overhead", "overhead", {"rows": self.rows, "layers": len(spec.kept_layers())}))
        return out


def _coverage(ops: Sequence[PredictedOp]) -> dict[str, float]:
    total = sum(abs(o.ms) for o in ops) or 1.0
    cov: dict[str, float] = {}
    for o in ops:
        cov[o.status] = cov.get(o.status, 0.0) + abs(o.ms) / total
    return {k: round(v, 4) for k, v in sorted(cov.items(), key=lambda kv: STATUS_ORDER.index(kv[0]))}


def predict(spec: SubnetSpec, target: TargetProfile, workload: Workload | None = None, *,
            table: LatencyTable | None = None) -> Prediction:
    """Predicted latency of ``spec`` on ``target`` for ``workload`` (default: the target's).

    Raises:
        NoTableError: the target has no table, or the table lacks a format the spec uses.
    """
    workload = workload or target.default_workload
    table = table or table_for(target)
    if workload.phase == "e2e":
        pre = Predictor(table, Workload("prefill", workload.batch, workload.context)).ops(spec)
        mid = workload.context + (workload.new_tokens - 1) / 2
        dec = Predictor(table, Workload("decode", workload.batch, max(1, round(mid)))).ops(spec)
        ops = [*(_renamed(o, "prefill.") for o in pre),
               *(_renamed(o, "decode.", workload.new_tokens) for o in dec)]
    else:
        ops = Predictor(table, workload).ops(spec)
    return Prediction(total_ms=float(sum(o.ms for o in ops)), workload=workload, target=target.name,
                      table=table.name, table_kind=table.kind, ops=tuple(ops), coverage=_coverage(ops))


def prediction_provenance(p) -> str:
    """How a prediction was made, in words a manifest keeps: table name, kind, coverage."""
    cov = ", ".join(f"{k} {v:.0%}" for k, v in p.coverage.items())
    return f"{p.table_kind} table {p.table} ({cov})"


def _renamed(o: PredictedOp, prefix: str, times: int = 1) -> PredictedOp:
    return PredictedOp(prefix + o.name, o.op, o.fmt, o.dims, o.ms * times, o.status)


# ---------------------------------------------------------------- search side
@dataclass(frozen=True)
class Choice:
    """One decision of the search: candidate values and their probabilities (a 1-D torch tensor)."""

    values: Sequence[Any]
    probs: Any

    def mean(self):
        import torch

        return (self.probs * torch.as_tensor([float(v) for v in self.values], dtype=self.probs.dtype,
                                             device=self.probs.device)).sum()


def expected_latency(table: LatencyTable, workload: Workload, *, vocab_size: int, hidden: Choice,
                     layers: Sequence[Mapping[str, Choice]], keep: Sequence[Any], lm_head: Choice):
    """Expected latency (ms, a differentiable torch scalar) over independent choice probabilities.

    Args:
        hidden: global hidden size.
        layers: per base layer, Choices named ``kv_heads``, ``heads_per_group``,
            ``head_dim``, ``mlp`` and one per linear in ``LINEARS`` (values: format names).
        keep: per base layer, the probability (scalar tensor or float) that it is kept.
        lm_head: the lm_head's format.

    At one-hot probabilities this equals ``predict(...).total_ms`` for the
    corresponding spec (see the module docstring for why it is exact).
    """
    import torch

    if workload.phase == "e2e":
        pre = expected_latency(table, Workload("prefill", workload.batch, workload.context), vocab_size=vocab_size,
                               hidden=hidden, layers=layers, keep=keep, lm_head=lm_head)
        mid = max(1, round(workload.context + (workload.new_tokens - 1) / 2))
        dec = expected_latency(table, Workload("decode", workload.batch, mid), vocab_size=vocab_size,
                               hidden=hidden, layers=layers, keep=keep, lm_head=lm_head)
        return pre + workload.new_tokens * dec
    pr = Predictor(table, workload)
    coef_cache: dict[tuple[str, int], tuple[float, ...]] = {}

    def lin(fmt_choice: Choice, k, n, rows: int | None = None):
        """E over formats of the linear cost at (expected) k, n."""
        r = pr.rows if rows is None else rows
        total = 0.0
        for f, p in zip(fmt_choice.values, fmt_choice.probs, strict=True):
            if (f, r) not in coef_cache:
                coef_cache[(f, r)] = pr.linear_model(f, r)[0]
            total = total + p * pr.scale("linear", f) * CostModel("linear", coef_cache[(f, r)], {}, {}, 0, 0.0)(
                {"k": k, "n": n})
        return total

    h = hidden.mean()
    att, glue = pr.model("attention"), pr.model("layer_glue")
    total = torch.zeros((), dtype=torch.float64, device=hidden.probs.device)
    kept = 0.0
    for lc, pk in zip(layers, keep, strict=True):
        kv, per, hd, mlp = (lc[k].mean() for k in ("kv_heads", "heads_per_group", "head_dim", "mlp"))
        q, kvw = kv * per * hd, kv * hd
        cq, ck, cv = lc["q_proj"], lc["k_proj"], lc["v_proj"]
        separate = lin(cq, h, q) + lin(ck, h, kvw) + lin(cv, h, kvw)
        packed_terms = 0.0
        for f in cq.values:
            if f in ck.values and f in cv.values:
                pq = cq.probs[list(cq.values).index(f)]
                pk_ = ck.probs[list(ck.values).index(f)]
                pv = cv.probs[list(cv.values).index(f)]
                one = Choice([f], torch.ones(1, dtype=cq.probs.dtype, device=cq.probs.device))
                packed_terms = packed_terms + pq * pk_ * pv * (
                    lin(one, h, q + 2 * kvw) - lin(one, h, q) - lin(one, h, kvw) - lin(one, h, kvw))
        layer = separate + packed_terms
        layer = layer + pr.scale("attention") * att({"rows": pr.new, "past": pr.past, "heads": kv * per,
                                                     "kv_heads": kv, "head_dim": hd, "batch": pr.batch})
        layer = layer + lin(lc["o_proj"], q, h) + lin(lc["gate_proj"], h, mlp) + lin(lc["up_proj"], h, mlp)
        layer = layer + lin(lc["down_proj"], mlp, h)
        layer = layer + pr.scale("layer_glue") * glue({"rows": pr.rows, "hidden": h, "mlp": mlp})
        total = total + pk * layer
        kept = kept + pk
    for f, p in zip(lm_head.values, lm_head.probs, strict=True):
        total = total + p * pr.scale("lm_head", f) * pr.lm_head_model(f)({"rows": pr.batch, "k": h, "n": vocab_size})
    total = total + pr.overhead_ms(kept)
    return total


def one_hot_choices(spec: SubnetSpec, formats: Sequence[str]):
    """The one-hot Choices of ``spec`` over candidate ``formats`` (for tests and for checking a search)."""
    import torch

    def hot(values: Sequence[Any], v: Any) -> Choice:
        values = list(values)
        if v not in values:
            values.append(v)
        return Choice(values, torch.tensor([1.0 if x == v else 0.0 for x in values], dtype=torch.float64))

    b = spec.base
    layers = []
    for ls in spec.layers:
        d = {"kv_heads": hot(range(1, b.num_kv_heads + 1), ls.num_kv_heads),
             "heads_per_group": hot(range(1, b.heads_per_group + 1), ls.num_heads // ls.num_kv_heads),
             "head_dim": hot([b.head_dim], ls.head_dim), "mlp": hot([b.intermediate_size], ls.intermediate_size)}
        d.update({n: hot(formats, ls.precision[n]) for n in LINEARS})
        layers.append(d)
    keep = [torch.tensor(1.0 if ls.keep else 0.0, dtype=torch.float64) for ls in spec.layers]
    return dict(hidden=hot([b.hidden_size], spec.hidden_size), layers=layers, keep=keep,
                lm_head=hot(formats, spec.lm_head))

