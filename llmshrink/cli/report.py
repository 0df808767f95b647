"""`llmshrink report`: a run's bundles side by side, as report.md, pareto.png and a terminal table."""

from __future__ import annotations

from pathlib import Path

import click

from llmshrink.cli.ui import err, out, print_json


@click.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--metric", default=None,
              help="Quality figure to compare by: a key of the manifests' quality (e.g. `arc_easy_local:acc`, "
                   "`ppl:wiki.test.raw:ctx512:stride256:tokens8192`). Default: the mean accuracy over the tasks "
                   "every evaluated bundle has, else their common perplexity.")
@click.option("--json", "as_json", is_flag=True, help="Print the report's rows as JSON (files are still written).")
def report(run_dir: Path, metric: str | None, as_json: bool) -> None:
    """Write RUN_DIR/report.md and RUN_DIR/pareto.png from the bundles' manifests.

    RUN_DIR is what `llmshrink compress` writes, any folder of bundles (an
    unpruned fp32 bundle counts as the original), or one bundle. The report
    reads what was recorded — predicted latency (export --target), measured
    latency (validate, bench), quality (eval) — and measures nothing itself;
    missing figures show as `—`.

    \b
    Example:
      llmshrink export --spec fp32.json --target cpu --out run/original
      llmshrink export --spec int4.json --target cpu --out run/int4
      for b in run/*; do llmshrink validate $b; llmshrink eval $b --ppl wiki.test.raw --max-tokens 8192; done
      llmshrink report run/
    """
    import dataclasses

    from rich.table import Table

    from llmshrink.evaluation.report import write_report

    rep, md, plot = write_report(run_dir, metric=metric)
    if as_json:
        print_json({"report": str(md), "plot": str(plot) if plot else None,
                    "metric": dataclasses.asdict(rep.metric) if rep.metric else None,
                    "pareto_front": rep.pareto_labels() if rep.metric else [],
                    "rows": [dataclasses.asdict(r) for r in rep.rows]})
        return
    print_results(rep)
    for label, (plan, extras) in list(rep.plans.items())[:1] if len(rep.plans) > 1 else rep.plans.items():
        pt = Table(title=f"plan: {label} (hidden {extras['hidden']}, lm_head {extras['lm_head']}, "
                         f"embedding {extras['embedding']})")
        for col in ("layers", "attention", "MLP", "q/k/v/o", "gate/up/down"):
            pt.add_column(col)
        for p in plan:
            pt.add_row(p.layers, p.attention, p.mlp, p.attn_precision, p.mlp_precision)
        out.print(pt)
    if len(rep.plans) > 1:
        err.print(f"plans of all {len(rep.plans)} compressed bundles are in report.md", style="dim")
    err.print(f"wrote {md}" + (f" and {plot}" if plot else " (no pareto.png: no quality recorded; run `llmshrink eval`)"))


def print_results(rep) -> None:
    """The report's results table on the terminal: every bundle of the run, its role, latency and quality."""
    from rich.table import Table

    from llmshrink.evaluation.report import result_cells, result_columns

    tab = Table(title=f"{rep.model} on {rep.target or 'no target'} — {rep.rows[0].workload}")
    for col in result_columns(rep, compact=True):
        tab.add_column(col, overflow="fold")
    for r in rep.rows:
        tab.add_row(*result_cells(rep, r, compact=True), style="bold" if r.role == "selected" else None)
    out.print(tab)
