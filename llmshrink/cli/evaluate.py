"""`llmshrink eval`: quality of a model or a shipped bundle."""

from __future__ import annotations

from pathlib import Path

import click

from llmshrink.cli.ui import err, kv_table, out, print_json, progress


@click.command("eval")
@click.argument("target")
@click.option("--ppl", "ppl_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="Text file to compute perplexity on (repeatable).")
@click.option("--context", default=512, show_default=True, type=click.IntRange(2), help="Window length in tokens.")
@click.option("--stride", default=256, show_default=True, type=click.IntRange(1),
              help="Tokens between window starts; each window scores only tokens no earlier window scored.")
@click.option("--max-tokens", default=None, type=click.IntRange(2), help="Score only the first N tokens of each file.")
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With a model TARGET: evaluate this subnet (materialized in torch) instead of the original.")
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads (bundles).")
@click.option("--no-record", is_flag=True, help="With a bundle TARGET: do not write the results into its manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def evaluate(target: str, ppl_files: tuple[Path, ...], context: int, stride: int, max_tokens: int | None,
             spec_path: Path | None, threads: int | None, no_record: bool, as_json: bool) -> None:
    """Evaluate TARGET — a bundle directory (run by ONNX Runtime, as shipped) or a model (run in torch).

    Perplexity uses the standard sliding window: windows of --context tokens
    every --stride tokens, each token predicted once. The same command on a
    model and on its bundle gives numbers you can compare directly.

    \b
    Examples:
      llmshrink eval smollm2-135m --ppl ../shared/evaldata/wikitext2/wiki.test.raw --max-tokens 8192
      llmshrink eval bundles/int4 --ppl wiki.test.raw --context 256 --stride 128 --json
    """
    from llmshrink import serde
    from llmshrink.evaluation import load_scorer, perplexity
    from llmshrink.evaluation.scoring import is_bundle

    with progress(not as_json) as p:
        with p.task(f"Loading {target}"):
            scorer = load_scorer(target, threads=threads, spec=spec_path)
        results = []
        for f in ppl_files:
            ids = scorer.encode(f.read_text(encoding="utf-8"))
            if max_tokens:
                ids = ids[:max_tokens]
            results.append(perplexity(scorer, ids, context=context, stride=stride, source=str(f), progress=p))
    if is_bundle(target) and not no_record:
        from llmshrink.exporters.bundle import load_manifest, update_manifest

        quality = dict(load_manifest(target).quality)
        for r in results:
            quality[f"ppl:{Path(r.source).name}:ctx{r.context}:stride{r.stride}:tokens{r.tokens}"] = r.ppl
        update_manifest(target, quality=quality)
    if as_json:
        print_json({"target": target, "backend": scorer.kind,
                    "perplexity": [serde.to_dict(r)["_data"] for r in results]})
        return
    for r in results:
        out.print(kv_table({"file": r.source, "perplexity": f"{r.ppl:.4f}", "tokens scored": f"{r.tokens:,}",
                            "method": f"sliding window, context {r.context}, stride {r.stride} ({r.windows} windows)"},
                           title=f"{target} ({scorer.kind})"))
    if is_bundle(target) and not no_record:
        err.print("recorded in manifest.json", style="dim")
