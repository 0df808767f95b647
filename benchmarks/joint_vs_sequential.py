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
uniform int4 bundle's measured latency.

    python benchmarks/joint_vs_sequential.py --data-dir ../shared/evaldata [--budgets 2.6,3.0,3.4]
        [--limit 500] [--steps 120] [--out runs/jvs]

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

TASKS = ("arc_easy_local", "boolq_local", "hellaswag_local", "winogrande_local")


def sh(*args: str) -> str:
    print("$ llmshrink " + " ".join(args), file=sys.stderr)
    res = subprocess.run([sys.executable, "-m", "llmshrink", *args], check=True, capture_output=True, text=True)
    return res.stdout


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
    int4 = json.loads(sh("validate", bundles["uniform-int4"][0], "--tolerance", "100%", "--json"))["measured"]
    int4_ms = int4["floor_ms"] or int4["median_ms"]
    budgets = ([float(x) for x in args.budgets.split(",")] if args.budgets
               else [round(f * int4_ms, 2) for f in (0.6, 0.7, 0.8)])
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
    rows = []
    for label, (path, budget) in bundles.items():
        m = json.loads((Path(path) / "manifest.json").read_text())["_data"]
        if not m.get("validation"):
            sh("validate", path, "--tolerance", "100%", "--json")
        lim = ["--limit", str(args.limit)] if args.limit else []
        res = json.loads(sh("eval", path, "--tasks", ",".join(TASKS), "--include-path", str(tasks_dir), *lim,
                            "--ppl", str(wiki), "--max-tokens", str(args.ppl_tokens), "--json"))
        m = json.loads((Path(path) / "manifest.json").read_text())["_data"]
        acc = {t["task"]: t["metrics"].get("acc") for t in res["tasks"]}
        meas = m["measured"][-1]
        rows.append((label, budget, m.get("predicted_latency_ms"), meas.get("floor_ms") or meas["median_ms"], acc,
                     res["perplexity"][0]["ppl"]))
    print(f"# {' '.join(sys.argv)}")
    print(f"# workload: the {args.target} target's default; latency = floor of block medians (llmshrink validate); "
          f"accuracy on the first {args.limit or 'all'} documents per task, 0-shot; "
          f"WikiText-2 test ppl on {args.ppl_tokens} tokens (ctx 512, stride 256)")
    head = ["bundle", "budget", "pred ms", "meas ms", *(t.removesuffix("_local") for t in TASKS), "mean acc", "ppl"]
    print(" | ".join(head))
    for label, budget, pred, meas, acc, ppl in rows:
        accs = [acc.get(t) for t in TASKS]
        mean = sum(a for a in accs if a is not None) / max(1, sum(a is not None for a in accs))
        print(" | ".join([label, f"{budget:g}" if budget else "-", f"{pred:.2f}" if pred else "-", f"{meas:.2f}",
                          *(f"{100 * a:.1f}" if a is not None else "-" for a in accs), f"{100 * mean:.1f}",
                          f"{ppl:.2f}"]))


if __name__ == "__main__":
    main()
