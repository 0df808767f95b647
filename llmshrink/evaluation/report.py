"""Reports: what a run's bundles cost and what they keep, as ``report.md`` and ``pareto.png``.

:func:`build_report` reads a run directory (see :mod:`llmshrink.rundir`)
into a :class:`Report`: one :class:`ReportRow` per bundle (size, predicted
and measured latency for the manifest's workload, quality figures) and the
per-layer plan of each compressed bundle. :func:`render_markdown` and
:func:`plot_pareto` turn it into files; the CLI renders the same rows with
rich. Everything here reads manifests; nothing is measured or evaluated
(that is ``validate``/``bench`` and ``eval``), so a report never shows a
number that was not recorded, and says where one is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmshrink.errors import UsageError
from llmshrink.rundir import RunBundle, RunRecord, load_run
from llmshrink.spec import LINEARS, SubnetSpec

REPORT_FILE = "report.md"
PLOT_FILE = "pareto.png"
ATTN, MLP = LINEARS[:4], LINEARS[4:]


@dataclass(frozen=True)
class QualityMetric:
    """The figure quality is judged by: one manifest quality key, or the mean of several accuracies."""

    name: str
    keys: tuple[str, ...]
    higher_is_better: bool

    @property
    def label(self) -> str:
        """Words for an axis: ``perplexity, text.txt (context 64, stride 32) — lower is better``."""
        if self.name.startswith("ppl:"):
            _, file, *rest = self.name.split(":")
            params = dict((p.rstrip("0123456789"), p[len(p.rstrip("0123456789")):]) for p in rest)
            how = f" (context {params['ctx']}, stride {params['stride']})" if {"ctx", "stride"} <= set(params) else ""
            return f"perplexity, {file}{how} — lower is better"
        if self.name.startswith("mean acc"):
            return "mean accuracy " + self.name.removeprefix("mean acc ")
        task, _, metric = self.name.partition(":")
        return f"{metric or 'quality'}, {task}" if metric else self.name

    def value(self, quality: dict[str, float]) -> float | None:
        if not all(k in quality for k in self.keys):
            return None
        return sum(quality[k] for k in self.keys) / len(self.keys)


@dataclass(frozen=True)
class ReportRow:
    """One bundle's line of the report. Latencies are for ``workload`` (None when not recorded)."""

    label: str
    role: str
    path: str
    spec_fingerprint: str
    layers_kept: int
    layers_total: int
    hidden: str
    params: int
    size_bytes: int
    precision: str
    workload: str
    predicted_ms: float | None
    measured_ms: float | None  # floor of block medians (see exporters.timing), else the median
    measured_median_ms: float | None
    measured_on: str
    quality: dict[str, float]
    metric: float | None
    # timed in turn with a reference bundle (a relative budget's check): bundle / reference, and the reference
    in_turn: float | None = None
    in_turn_with: str = ""

    @property
    def error_pct(self) -> float | None:
        if self.predicted_ms is None or self.measured_ms is None:
            return None
        return 100.0 * (self.measured_ms - self.predicted_ms) / self.predicted_ms


@dataclass(frozen=True)
class PlanRow:
    """Consecutive layers with the same shape and precisions, as one table row."""

    layers: str
    attention: str  # "9q/3kv x 64", or "dropped"
    mlp: str
    attn_precision: str
    mlp_precision: str


@dataclass(frozen=True)
class Report:
    run_dir: Path
    record: RunRecord | None
    rows: tuple[ReportRow, ...]
    plans: dict[str, tuple[tuple[PlanRow, ...], dict[str, str]]]  # label -> (rows, extras: hidden/lm_head/embedding)
    metric: QualityMetric | None
    model: str = ""  # from run.json, else the bundles' manifests
    target: str = ""

    @property
    def original(self) -> ReportRow | None:
        return next((r for r in self.rows if r.role == "original"), None)

    def pareto_labels(self) -> list[str]:
        """Labels of the candidates no other candidate beats on both latency and the metric."""
        pts = [r for r in self.rows if r.role in ("candidate", "selected") and r.metric is not None
               and _latency(r) is not None]
        return [r.label for r in pts if not any(_dominates(o, r, self.metric) for o in pts if o is not r)]


def _latency(r: ReportRow) -> float | None:
    return r.measured_ms if r.measured_ms is not None else r.predicted_ms


def _dominates(a: ReportRow, b: ReportRow, metric: QualityMetric) -> bool:
    sign = 1 if metric.higher_is_better else -1
    la, lb, qa, qb = _latency(a), _latency(b), sign * a.metric, sign * b.metric
    return la <= lb and qa >= qb and (la < lb or qa > qb)


# ----------------------------------------------------------------- building
def _compact(precision: dict[str, str], names: Sequence[str]) -> str:
    """``w4g32a8`` when all alike, else ``q w4g32 · k w8g32 · ...`` grouping equal neighbours."""
    fmts = [precision[n] for n in names]
    if len(set(fmts)) == 1:
        return fmts[0]
    parts: list[tuple[list[str], str]] = []
    for n, f in zip(names, fmts, strict=True):
        if parts and parts[-1][1] == f:
            parts[-1][0].append(n.removesuffix("_proj"))
        else:
            parts.append(([n.removesuffix("_proj")], f))
    return " · ".join(f"{'/'.join(ns)} {f}" for ns, f in parts)


def plan_rows(spec: SubnetSpec) -> tuple[PlanRow, ...]:
    """The per-layer plan, consecutive identical layers merged (``3-7``)."""
    cells = []
    for ls in spec.layers:
        if not ls.keep:
            cells.append(("dropped", "", "", ""))
        else:
            cells.append((f"{ls.num_heads}q/{ls.num_kv_heads}kv x {ls.head_dim}", str(ls.intermediate_size),
                          _compact(ls.precision, ATTN), _compact(ls.precision, MLP)))
    out: list[PlanRow] = []
    start = 0
    for i in range(1, len(cells) + 1):
        if i == len(cells) or cells[i] != cells[start]:
            span = str(start) if i - 1 == start else f"{start}-{i - 1}"
            out.append(PlanRow(span, *cells[start]))
            start = i
    return tuple(out)


def _precision_summary(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(f"{f} {100 * n / total:.0f}%" for f, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _row(b: RunBundle, metric: QualityMetric | None) -> ReportRow:
    m = b.manifest
    workload = m.workload or (m.measured[-1].workload if m.measured else None)
    meas = [x for x in m.measured if workload is None or x.workload == workload]
    last = meas[-1] if meas else None
    kept = len(b.spec.kept_layers())
    return ReportRow(
        label=b.label, role=b.entry.role, path=str(b.path), spec_fingerprint=m.spec_fingerprint,
        layers_kept=kept, layers_total=b.spec.base.num_layers,
        hidden=f"{b.spec.hidden_size}/{b.spec.base.hidden_size}", params=m.num_params, size_bytes=b.size_bytes,
        precision=_precision_summary(m.precision), workload=workload.describe() if workload else "no workload recorded",
        predicted_ms=m.predicted_latency_ms, measured_ms=last.reference_ms if last else None,
        measured_median_ms=last.median_ms if last else None,
        measured_on=(f"{last.host}, {last.runtime} {last.runtime_version}, {last.threads or 'default'} threads"
                     if last else ""),
        quality=dict(m.quality), metric=metric.value(m.quality) if metric else None,
        in_turn=m.validation.get("measured_ratio"), in_turn_with=Path(str(m.validation.get("reference", ""))).name)


def choose_metric(bundles: Sequence[RunBundle], key: str | None = None) -> QualityMetric | None:
    """The quality figure to compare bundles by.

    With ``key``: that manifest quality key (``ppl:...`` keys are lower-is-better).
    Otherwise a perplexity every evaluated bundle has (the most sensitive
    figure, and monotone in damage), else the mean ``acc`` over the tasks they
    all have, else None (nothing recorded). The results table shows the other
    of the two beside it.

    Raises:
        UsageError: ``key`` is not recorded for any bundle.
    """
    evaluated = [dict(b.manifest.quality) for b in bundles if b.manifest.quality]
    if key is not None:
        if not any(key in q for q in evaluated):
            known = sorted({k for q in evaluated for k in q})
            raise UsageError(f"No bundle has the quality figure {key!r}.",
                             f"Recorded: {', '.join(known) or 'none (run `llmshrink eval` on the bundles)'}.")
        return QualityMetric(key, (key,), not key.startswith("ppl:"))
    if not evaluated:
        return None
    common = set.intersection(*(set(q) for q in evaluated))
    ppls = sorted(k for k in common if k.startswith("ppl:"))
    if ppls:
        return QualityMetric(ppls[0], (ppls[0],), False)
    return _mean_acc(common)


def _mean_acc(keys: set[str]) -> QualityMetric | None:
    accs = sorted(k for k in keys if k.split(":")[1:2] == ["acc"])
    if not accs:
        return None
    tasks = ", ".join(k.split(":")[0] for k in accs)
    return QualityMetric(accs[0] if len(accs) == 1 else f"mean acc ({tasks})", tuple(accs), True)


def build_report(run_dir: str | Path, *, metric: str | None = None) -> Report:
    """Read ``run_dir`` (a run directory or one bundle) into a :class:`Report`."""
    record, bundles = load_run(run_dir)
    qm = choose_metric(bundles, metric)
    plans = {b.label: (plan_rows(b.spec), {"hidden": f"{b.spec.hidden_size} of {b.spec.base.hidden_size}",
                                           "lm_head": b.spec.lm_head, "embedding": b.spec.embedding})
             for b in bundles if b.entry.role != "original"}
    def recorded(name: str) -> str:
        return ", ".join(sorted({str(getattr(b.manifest, name)) for b in bundles if getattr(b.manifest, name)}))

    model = record.model if record and record.model else recorded("model_source")
    target = record.target if record and record.target else recorded("target")
    return Report(Path(run_dir), record, tuple(_row(b, qm) for b in bundles), plans, qm, model, target)


# ----------------------------------------------------------------- rendering
def fmt_ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} ms"


def fmt_size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def fmt_metric(x: float | None, metric: QualityMetric | None) -> str:
    if x is None or metric is None:
        return "—"
    return f"{100 * x:.2f}" if metric.higher_is_better and x <= 1 else f"{x:.3f}"


def fmt_delta(r: ReportRow, original: ReportRow | None, metric: QualityMetric | None) -> str:
    if metric is None or r.metric is None or original is None or original.metric is None or r is original:
        return "—"
    d = r.metric - original.metric
    return f"{100 * d:+.2f} pts" if metric.higher_is_better and abs(r.metric) <= 1 else f"{d:+.3f}"


COMPACT = ("bundle", "role", "size", "predicted", "measured", "error", "in turn")  # the terminal's, then quality


def _side_metric(report: Report) -> QualityMetric | None:
    """The figure shown beside the primary one: mean accuracy beside a perplexity, and vice versa."""
    if report.metric is None:
        return None
    evaluated = [r.quality for r in report.rows if r.quality]
    common = set.intersection(*(set(q) for q in evaluated)) if evaluated else set()
    if report.metric.name.startswith("ppl:"):
        return _mean_acc(common)
    ppl = sorted(k for k in common if k.startswith("ppl:"))
    return QualityMetric(ppl[0], (ppl[0],), False) if ppl else None


def result_columns(report: Report, *, compact: bool = False) -> list[str]:
    """Column names of the results table; ``compact`` (the terminal) leaves out shape and precision."""
    q = report.metric.name if report.metric else "quality"
    cols = ["bundle", "role", "layers", "hidden", "params", "size", "precision", "predicted", "measured", "error",
            *(["in turn"] if any(r.in_turn is not None for r in report.rows) else []), q, "vs original"]
    side = _side_metric(report)
    if side:
        cols.append(side.name)
    return [c for c in cols if not compact or c in COMPACT or c in (q, "vs original") or (side and c == side.name)]


def result_cells(report: Report, r: ReportRow, *, compact: bool = False) -> list[str]:
    err = "—" if r.error_pct is None else f"{r.error_pct:+.1f}%"
    side = _side_metric(report)
    values = [r.label, r.role, f"{r.layers_kept}/{r.layers_total}", r.hidden, f"{r.params / 1e6:.1f}M",
              fmt_size(r.size_bytes), r.precision, fmt_ms(r.predicted_ms), fmt_ms(r.measured_ms), err,
              *([] if "in turn" not in result_columns(report) else
                ["—" if r.in_turn is None else f"{r.in_turn:.3f}x {r.in_turn_with}"]),
              fmt_metric(r.metric, report.metric), fmt_delta(r, report.original, report.metric)]
    if side:
        values.append(fmt_metric(side.value(r.quality), side))
    cells = dict(zip(result_columns(report), values, strict=True))
    return [cells[c] for c in result_columns(report, compact=compact)]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    esc = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in esc]


def render_markdown(report: Report, *, plot: str | None = PLOT_FILE) -> str:
    """``report.md``: the run, a results table, the Pareto plot, each plan per layer, every quality figure."""
    from llmshrink.exporters.bundle import now_iso
    from llmshrink.version import __version__

    rec, rows = report.record, report.rows
    first = rows[0]
    lines = [f"# llmshrink report: {report.run_dir.resolve().name}", ""]
    facts = {
        "model": report.model,
        "target": report.target or "none recorded",
        "workload": first.workload,
    }
    if rec and rec.strategy:
        facts["strategy"] = rec.strategy
    if rec and rec.budgets_ms:
        facts["latency budgets"] = ", ".join(f"{b:g} ms" for b in rec.budgets_ms)
    facts["quality metric"] = report.metric.name if report.metric else "none recorded (run `llmshrink eval`)"
    facts["written"] = f"{now_iso()} by llmshrink {__version__}"
    lines += [f"- **{k}**: {v}" for k, v in facts.items()] + [""]
    lines += ["## Results", ""]
    lines += _md_table(result_columns(report), [result_cells(report, r) for r in rows])
    measured_on = sorted({r.measured_on for r in rows if r.measured_on})
    lines += ["", "Latency is for the workload above. *measured* is the fastest of the block medians "
              "(`llmshrink validate`/`bench`), *predicted* comes from the target's latency table; "
              "*error* is measured vs predicted." + (
                  " *in turn* is the bundle's latency over the named reference's, both timed in turn, block of runs "
                  "by block of runs (`llmshrink validate --reference`): the figure a shared machine's drift does "
                  "not move." if "in turn" in result_columns(report) else "") + (f" Measured on: {'; '.join(measured_on)}." if measured_on else
                                                     " Nothing was measured yet: run `llmshrink validate`.")]
    if any(r.measured_ms is None for r in rows):
        lines += ["Bundles without a measurement are placed by their prediction in the plot (hollow markers)."]
    if report.metric:
        front = report.pareto_labels()
        lines += ["", "## Quality against latency", ""]
        if plot:
            lines += [f"![quality against latency]({plot})", ""]
        if front:
            lines += [f"Pareto front (no candidate is both faster and better): {', '.join(front)}."]
    if rec and rec.notes:  # how budgets resolved, which contender won each, where latencies come from
        lines += ["", "## Notes", ""] + [f"- {n}" for n in rec.notes]
    for label, (plan, extras) in report.plans.items():
        lines += ["", f"## Plan: {label}", "",
                  f"hidden {extras['hidden']} · lm_head {extras['lm_head']} · embedding {extras['embedding']}", ""]
        lines += _md_table(["layers", "attention", "MLP", "q/k/v/o precision", "gate/up/down precision"],
                           [[p.layers, p.attention, p.mlp, p.attn_precision, p.mlp_precision] for p in plan])
    keys = sorted({k for r in rows for k in r.quality if not _is_stderr(k)})
    if keys:
        lines += ["", "## Quality figures", "",
                  "Accuracies in % (± standard error), perplexities as they are; `—`: not evaluated.", ""]
        lines += _md_table(["figure"] + [r.label for r in rows],
                           [[k] + [_quality_cell(k, r.quality.get(k), r.quality.get(_stderr_key(k))) for r in rows]
                            for k in keys])
    return "\n".join(lines) + "\n"


def _is_stderr(key: str) -> bool:
    return "_stderr" in key.split(":")[1] if ":" in key else False


def _stderr_key(key: str) -> str:
    """``task:acc:limitN`` -> ``task:acc_stderr:limitN`` (how eval records standard errors)."""
    parts = key.split(":")
    return ":".join([parts[0], parts[1] + "_stderr", *parts[2:]]) if len(parts) > 1 else key


def _quality_cell(key: str, v: float | None, stderr: float | None = None) -> str:
    if v is None:
        return "—"
    if key.startswith("ppl:"):
        return f"{v:.3f}"
    return f"{100 * v:.2f}" + (f" ± {100 * stderr:.2f}" if stderr is not None else "")


MARKERS = {"original": ("*", 260), "baseline": ("s", 110), "candidate": ("o", 80), "selected": ("D", 110)}


def plot_pareto(report: Report, path: str | Path) -> Path | None:
    """Write the quality-against-latency plot; None (nothing written) without a quality metric."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    if report.metric is None:
        return None
    pts = [r for r in report.rows if r.metric is not None and _latency(r) is not None]
    if not pts:
        return None
    scale = 100 if report.metric.higher_is_better and all(abs(r.metric) <= 1 for r in pts) else 1
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=130)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, role in enumerate(ROLES_ORDER):
        group = [r for r in pts if r.role == role]
        if not group:
            continue
        marker, size = MARKERS[role]
        for measured in (True, False):
            sub = [r for r in group if (r.measured_ms is not None) == measured]
            if sub:
                ax.scatter([_latency(r) for r in sub], [scale * r.metric for r in sub], marker=marker, s=size,
                           label=role + ("" if measured else " (predicted latency)"), zorder=3,
                           facecolors=colors[i] if measured else "none", edgecolors=colors[i], linewidths=1.5)
    front = sorted((r for r in pts if r.label in report.pareto_labels()), key=_latency)
    if len(front) > 1:
        ax.plot([_latency(r) for r in front], [scale * r.metric for r in front], "--", color="grey", lw=1,
                zorder=2, label="Pareto front")
    for r in pts:
        ax.annotate(r.label, (_latency(r), scale * r.metric), textcoords="offset points", xytext=(6, 5), fontsize=8)
    ax.set_xlabel(f"latency, ms ({pts[0].workload})")
    ax.set_ylabel(report.metric.label + (" (%)" if scale == 100 else ""), fontsize=9)
    title = report.model or report.run_dir.resolve().name
    ax.set_title(f"{title}: quality against latency", fontsize=10)
    ax.grid(alpha=0.3)
    if not report.metric.higher_is_better:
        ax.invert_yaxis()  # better is up, whatever the metric
    xs = [_latency(r) for r in pts]
    lo, hi = min(xs), max(xs)
    pad = (hi - lo) * 0.15 or hi * 0.1
    ax.set_xlim(max(0.0, lo - pad), hi + pad)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


ROLES_ORDER = ("original", "baseline", "candidate", "selected")


def write_report(run_dir: str | Path, *, metric: str | None = None) -> tuple[Report, Path, Path | None]:
    """Build the report and write ``report.md`` and ``pareto.png`` (when there is quality to plot) into ``run_dir``."""
    from llmshrink import storage

    report = build_report(run_dir, metric=metric)
    plot = plot_pareto(report, Path(run_dir) / PLOT_FILE)
    md = Path(run_dir) / REPORT_FILE
    storage.atomic_write_text(md, render_markdown(report, plot=PLOT_FILE if plot else None))
    return report, md, plot


__all__ = ["PLOT_FILE", "REPORT_FILE", "QualityMetric", "Report", "ReportRow", "build_report", "choose_metric",
           "plan_rows", "plot_pareto", "render_markdown", "write_report"]
