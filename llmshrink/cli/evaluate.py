"""`llmshrink eval`: quality of a model or a shipped bundle."""

from __future__ import annotations

from pathlib import Path

import click

from llmshrink.cli.ui import err, kv_table, out, print_json, progress


@click.command("eval")
@click.argument("target")
@click.option("--tasks", default=None, help="lm-eval tasks, comma-separated; `paper` = the paper's seven, "
              "`paper-local` = their offline copies (with --include-path). Needs the eval extra.")
@click.option("--include-path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of lm-eval task YAMLs (e.g. rendered by ../shared/evaldata/render.py).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate only the first N documents per task.")
@click.option("--ppl", "ppl_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file to compute perplexity on (repeatable).")
@click.option("--context", default=512, show_default=True, type=click.IntRange(2), help="Window length in tokens.")
@click.option("--stride", default=256, show_default=True, type=click.IntRange(1),
              help="Tokens between window starts; each window scores only tokens no earlier window scored.")
@click.option("--max-tokens", default=None, type=click.IntRange(2), help="Score only the first N tokens of each file.")
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With a model TARGET: evaluate this subnet (materialized in torch) instead of the original.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1),
              help="Choices of one question scored as one batch (torch; a bundle runs them one by one after "
              "reading the shared context once).")
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads (bundles).")
@click.option("--no-record", is_flag=True, help="With a bundle TARGET: do not write the results into its manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def evaluate(target: str, tasks: str | None, include_path: str | None, limit: int | None,
             ppl_files: tuple[Path, ...], context: int, stride: int, max_tokens: int | None,
             spec_path: Path | None, batch_size: int, threads: int | None, no_record: bool, as_json: bool) -> None:
    """Evaluate TARGET — a bundle directory (run by ONNX Runtime, as shipped) or a model (run in torch).

    Tasks run through lm-evaluation-harness with llmshrink's lm-eval model
    (the same numbers as lm-eval's own `hf` model on the same weights).
    Perplexity uses the standard sliding window: each token is predicted
    once, with up to --context tokens read per window, --stride new ones
    scored. The same command on a model and on its bundle gives numbers you
    can compare directly. With a bundle, results go into its manifest.

    \b
    Examples:
      python ../shared/evaldata/render.py tasks/ && llmshrink eval bundles/int4 --tasks paper-local --include-path tasks/ --limit 200
      llmshrink eval smollm2-135m --ppl ../shared/evaldata/wikitext2/wiki.test.raw --max-tokens 8192
      llmshrink eval bundles/int4 --ppl wiki.test.raw --context 256 --stride 128 --json
    """
    from llmshrink import serde
    from llmshrink.errors import UsageError
    from llmshrink.evaluation import load_scorer, perplexity
    from llmshrink.evaluation.harness import expand_tasks, require_lm_eval, run_tasks
    from llmshrink.evaluation.scoring import is_bundle

    if not tasks and not ppl_files:
        raise UsageError("Nothing to evaluate.", "Give --tasks (lm-eval tasks) and/or --ppl FILE.")
    task_results = []
    if tasks:
        require_lm_eval()
        with progress(not as_json) as p:
            task_results = run_tasks(target, expand_tasks(tasks), include_path=include_path, limit=limit,
                                     spec=str(spec_path) if spec_path else None, threads=threads,
                                     batch_size=batch_size, progress=p)
    results = []
    with progress(not as_json and bool(ppl_files)) as p:
        scorer = None
        if ppl_files:
            with p.task(f"Loading {target}"):
                scorer = load_scorer(target, threads=threads, spec=spec_path)
        for f in ppl_files:
            ids = scorer.encode(f.read_text(encoding="utf-8"))
            if max_tokens:
                ids = ids[:max_tokens]
            results.append(perplexity(scorer, ids, context=context, stride=stride, source=str(f), progress=p))
    if is_bundle(target) and not no_record:
        from llmshrink.exporters.bundle import load_manifest, update_manifest

        quality = dict(load_manifest(target).quality)
        for r in results:
            quality[r.quality_key] = r.ppl
        for t in task_results:
            quality.update(t.quality_keys())
        update_manifest(target, quality=quality)
    backend = "onnxruntime" if is_bundle(target) else "torch"
    if as_json:
        print_json({"target": target, "backend": backend,
                    "tasks": [serde.to_dict(t)["_data"] for t in task_results],
                    "perplexity": [serde.to_dict(r)["_data"] for r in results]})
        return
    if task_results:
        from rich.table import Table

        tab = Table(title=f"{target} ({backend}) — lm-eval" + (f", first {limit} docs per task" if limit else ""))
        for col in ("task", "acc", "acc_norm", "n"):
            tab.add_column(col)
        def cell(m: dict[str, float], k: str) -> str:
            return f"{m[k]:.4f} ± {m.get(k + '_stderr', float('nan')):.4f}" if k in m else "-"

        for t in task_results:
            tab.add_row(t.task, cell(t.metrics, "acc"), cell(t.metrics, "acc_norm"), str(t.samples or "-"))
        out.print(tab)
    for r in results:
        out.print(kv_table({"file": r.source, "perplexity": f"{r.ppl:.4f}", "tokens scored": f"{r.tokens:,}",
                            "method": f"sliding window, context {r.context}, stride {r.stride} ({r.windows} windows)"},
                           title=f"{target} ({backend})"))
    if is_bundle(target) and not no_record:
        err.print("recorded in manifest.json", style="dim")
