"""Joint vs sequential search at several latency budgets on the default model, with held-out quality.

For each budget, ``compress`` runs twice through the same machinery, data,
steps and budget — ``--strategy joint`` and ``--strategy sequential`` — and
the resulting bundles are measured (``validate``: floor of block medians on
the target's workload) and evaluated on held-out data that no search or
recovery step saw: lm-eval tasks rendered from ``--data-dir`` (ARC-Easy dev,
BoolQ, HellaSwag, WinoGrande; ``--limit`` documents each) and WikiText-2
test perplexity (the first ``--ppl-tokens`` tokens, context 512, stride 256).
The original model (fp32 bundle) and a uniform int4 (w4g32a8) bundle are
measured and evaluated the same way. Budgets default to 60/70/80 % of the
uniform int4 bundle's *predicted* latency (the
target's table; measurements on a shared VM drift).

    python benchmarks/joint_vs_sequential.py --data-dir ../shared/evaldata [--budgets 2.6,3.0,3.4]
        [--limit 500] [--steps 100] [--out runs/jvs] [--results benchmarks/results/joint_vs_sequential_cpu.txt]

Prints one row per bundle (strategy, budget, predicted and measured latency,
accuracies, mean accuracy, perplexity) and the command that made the table;
everything is also in each bundle's manifest and in ``--out/report.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _cli import sh  # benchmarks/ is on sys.path when a script in it runs

TASKS = ("arc_easy_local", "boolq_local", "hellaswag_local", "winogrande_local")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="../shared/evaldata (read-only; tasks are rendered from it)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--budgets", default=None, help="ms, comma-separated (default: 60/70/80%% of uniform int4)")
    ap.add_argument("--limit", type=int, default=500, help="documents per task (0: all)")
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=None, help="search steps (default: compress's)")
    ap.add_argument("--recovery-steps", type=int, default=None)
    ap.add_argument("--out", default="runs/joint-vs-sequential")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds over all bundles")
    ap.add_argument("--results", default=None, help="also write the table to this file")
    args = ap.parse_args()

    out = Path(args.out)
    tasks_dir = out / "tasks"
    if not (tasks_dir / "arc_easy_local.yaml").is_file():
        subprocess.run([sys.executable, str(Path(args.data_dir) / "render.py"), str(tasks_dir)], check=True)
    wiki = Path(args.data_dir) / "wikitext2" / "wiki.test.raw"
    bundles: dict[str, tuple[str, float | None]] = {}
    for name, fmt in (("original", "fp32"), ("uniform-int4", "w4g32a8")):
        b = out / "baselines" / name
        if not (b / "manifest.json").is_file():
            sh("spec", "new", "--model", args.model, "--uniform", fmt, "--out", str(out / f"{name}.json"))
            sh("export", "--model", args.model, "--spec", str(out / f"{name}.json"), "--target", args.target,
               "--out", str(b))
        bundles[name] = (str(b), None)
    # Budgets from the table's prediction for the int4 bundle, not from a measurement of it: on a shared VM a
    # measurement drifts by tens of percent within the hour, and the budgets must not depend on the neighbours.
    int4_pred = json.loads((Path(bundles["uniform-int4"][0]) / "manifest.json").read_text())["_data"][
        "predicted_latency_ms"]
    budgets = ([float(x) for x in args.budgets.split(",")] if args.budgets
               else [round(f * int4_pred, 2) for f in (0.6, 0.7, 0.8)])
    extra = (["--steps", str(args.steps)] if args.steps else []) + (
        ["--recovery-steps", str(args.recovery_steps)] if args.recovery_steps is not None else [])
    for strategy in ("joint", "sequential"):
        run = out / strategy
        flag = ["--resume"] if (run / "compress.json").is_file() else []
        sh("compress", "--model", args.model, "--target", args.target,
           "--latency", ",".join(f"{b}ms" for b in budgets), "--strategy", strategy, "--out", str(run),
           "--json", *extra, *flag)
        for b in budgets:
            bundles[f"{strategy} {b:g}ms"] = (str(run / "candidates" / f"{b:g}ms"), b)
    quality = {}
    for label, (path, _) in bundles.items():
        quality[label] = recorded_quality(path, args.limit, args.ppl_tokens)
        if quality[label] is None:  # not evaluated yet at these settings (results go into the manifest)
            lim = ["--limit", str(args.limit)] if args.limit else []
            sh("eval", path, "--tasks", ",".join(TASKS), "--include-path", str(tasks_dir), *lim,
               "--ppl", str(wiki), "--max-tokens", str(args.ppl_tokens), "--json")
            quality[label] = recorded_quality(path, args.limit, args.ppl_tokens)
    # Timed last, all together and with nothing else of this benchmark running (evaluation is CPU-bound).
    side = measure_side_by_side({k: v[0] for k, v in bundles.items()}, args.rounds, args.target)
    rows = []
    for label, (path, budget) in bundles.items():
        m = json.loads((Path(path) / "manifest.json").read_text())["_data"]
        acc, ppl = quality[label]
        rows.append((label, budget, m.get("predicted_latency_ms"), side[label], acc, ppl))
    int4_pred, int4_meas = rows[1][2], rows[1][3]
    head = ["bundle", "budget", "pred ms", "meas ms", "pred/int4", "meas/int4",
            *(t.removesuffix("_local") for t in TASKS), "mean acc", "ppl"]
    lines = [f"# {' '.join(sys.argv)}",
             f"# workload: the {args.target} target's default; meas = median over {args.rounds} interleaved rounds "
             f"(every bundle once per round) of each round's floor of block medians; accuracy on the first "
             f"{args.limit or 'all'} documents per task, 0-shot; WikiText-2 test ppl on {args.ppl_tokens} tokens "
             f"(ctx 512, stride 256); search steps {args.steps or 'default'}, recovery steps "
             f"{args.recovery_steps if args.recovery_steps is not None else 'default'}",
             " | ".join(head)]
    for label, budget, pred, meas, acc, ppl in rows:
        accs = [acc.get(t) for t in TASKS]
        mean = sum(a for a in accs if a is not None) / max(1, sum(a is not None for a in accs))
        lines.append(" | ".join([label, f"{budget:g}" if budget else "-", f"{pred:.2f}" if pred else "-",
                                 f"{meas:.2f}", f"{pred / int4_pred:.2f}" if pred else "-", f"{meas / int4_meas:.2f}",
                                 *(f"{100 * a:.1f}" if a is not None else "-" for a in accs), f"{100 * mean:.1f}",
                                 f"{ppl:.2f}"]))
    print("\n".join(lines))
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text("\n".join(lines) + "\n")


def recorded_quality(path: str, limit: int, ppl_tokens: int) -> tuple[dict[str, float], float] | None:
    """(accuracy per task, WikiText-2 ppl) that ``llmshrink eval`` recorded in the bundle's manifest at these
    settings, or None if any is missing (so a rerun of the benchmark evaluates nothing twice)."""
    from llmshrink.evaluation.harness import task_key
    from llmshrink.evaluation.perplexity import ppl_key

    q = json.loads((Path(path) / "manifest.json").read_text())["_data"].get("quality") or {}
    acc = {t: q.get(task_key(t, "acc", limit or None)) for t in TASKS}
    ppl = q.get(ppl_key("wiki.test.raw", 512, 256, ppl_tokens - 1))  # the first of N tokens is not scored
    return None if ppl is None or None in acc.values() else (acc, ppl)


def measure_side_by_side(paths: dict[str, str], rounds: int, target: str) -> dict[str, float]:
    """Per bundle, the median over ``rounds`` of its floor latency, every bundle timed once per round in turn.

    Interleaving is what makes the column comparable: on a shared VM the same bundle measures tens of percent
    apart an hour later, so bundles timed at different moments of a long run cannot be ranked by their manifests.
    """
    import statistics

    from llmshrink.api import open_bundle
    from llmshrink.exporters.timing import time_decoder
    from llmshrink.targets.profile import load_target

    default = load_target(target).default_workload
    opened = {k: open_bundle(p) for k, p in paths.items()}
    got: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds):
        for k, b in opened.items():
            m = time_decoder(b.decoder, b.manifest.workload or default, vocab_size=b.spec.base.vocab_size)
            got[k].append(m.reference_ms)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in got.items()), file=sys.stderr)
    return {k: statistics.median(v) for k, v in got.items()}


if __name__ == "__main__":
    main()
