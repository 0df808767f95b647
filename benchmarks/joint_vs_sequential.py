"""Joint against sequential search at budgets relative to uniform int4, on the default model, full local sets.

For each budget (default 0.7 / 0.85 / 1.0 / 1.15 x the uniform w4g32a8 export, as this machine's cpu table
predicts it) and each strategy, one ``llmshrink compress --latency B --strategy S`` run in its own directory:
the search, the baselines the budget admits, all screened alike (the run's quantizer, then KL from the
original on rows no phase read), the winner recovered and shipped. Both strategies get the same calibration
rows, baselines, quantizer and recovery; only the search differs (joint: architecture and formats together;
sequential: architecture in full precision, then formats by measured sensitivity).

Every shipped bundle, the original and uniform int4 (GPTQ, no recovery: each run's ``reference/``), and with
``--baseline-run`` uniform int4 with the same recovery (``compress --spec``), are scored on held-out data: ARC-Easy
dev, BoolQ and WinoGrande on their full sets, HellaSwag on its first 1,000, WikiText-2 test perplexity (first
``--ppl-tokens`` tokens, context 512, stride 256). Then all are timed together, interleaved, with nothing else of
this benchmark running. Per run the table says which contender shipped and the search's own screening KL: a
search that lost is visible even where its run shipped a baseline.

    python benchmarks/joint_vs_sequential.py --data-dir ../shared/evaldata
        [--budgets 0.7xint4-a8,0.85xint4-a8,1.0xint4-a8,1.15xint4-a8] [--reuse joint:1.15xint4-a8=RUN_DIR ...]
        [--baseline-run DIR] [--out runs/joint-vs-sequential] [--results benchmarks/results/joint_vs_sequential_cpu.txt]

Everything is kept under ``--out`` (runs, evaluations), so an interrupted benchmark re-run with the same
arguments resumes: finished runs and scores are read back, an unfinished ``compress`` continues (``--resume``).
``--reuse STRATEGY:BUDGET=RUN_DIR`` takes a finished ``compress`` run of that strategy and budget made elsewhere
(``benchmarks/baselines.py`` makes joint ones) instead of running it again; its strategy and budget are checked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _cli import HELLASWAG, HELLASWAG_DOCS, emit, evaluate, machine_line, sh, uniform_setup

STRATEGIES = ("joint", "sequential")
TASKS = {"arc_easy_local": "ARC-E", "boolq_local": "BoolQ", "winogrande_local": "Wino",
         HELLASWAG: f"HS{HELLASWAG_DOCS}"}


def _data(x: dict) -> dict:
    return x.get("_data", x)


def _finished(run: Path) -> bool:
    return (run / "run.json").is_file() and any(
        _data(e)["role"] == "selected" for e in _data(json.loads((run / "run.json").read_text()))["entries"])


def _run(run: Path, walls: Path, model: str, budget: str, strategy: str) -> None:
    """``compress`` once into ``run`` (continued with --resume when a previous attempt left it unfinished)."""
    if _finished(run):
        return
    resume = ["--resume"] if (run / "compress.json").is_file() else []
    t0 = time.perf_counter()
    sh("compress", "--model", model, "--target", "cpu", "--latency", budget, "--strategy", strategy,
       "--out", str(run), "--json", *resume)
    w = json.loads(walls.read_text()) if walls.is_file() else {}
    w[str(run)] = {"seconds": time.perf_counter() - t0, "resumed": bool(resume)}
    walls.write_text(json.dumps(w, indent=1))


def _check_reused(run: Path, strategy: str, budget_ms: float) -> None:
    rec = _data(json.loads((run / "compress.json").read_text()))
    got = _data(rec["config"])["strategy"]
    ms = [_data(c)["budget_ms"] for c in rec["candidates"]]
    if got != strategy or ms != [budget_ms] or not _finished(run):
        sys.exit(f"--reuse {run}: a finished {strategy} run at {budget_ms:g} ms was expected; it is a {got} run at "
                 f"{ms} ms{'' if _finished(run) else ', unfinished'}")


def _selected(run: Path) -> tuple[Path, dict]:
    """The shipped bundle of a one-budget run and that budget's record (contenders, phases)."""
    entries = [_data(e) for e in _data(json.loads((run / "run.json").read_text()))["entries"]]
    path = next(run / e["path"] for e in entries if e["role"] == "selected")
    cand = _data(_data(json.loads((run / "compress.json").read_text()))["candidates"][0])
    return path, cand


def measure_side_by_side(paths: dict[str, Path], rounds: int) -> dict[str, float]:
    """Per bundle, the median over ``rounds`` of its floor latency, every bundle timed once per round in turn.

    Interleaving is what makes the column comparable: bundles timed at different moments of a long run cannot
    be ranked by their manifests (the machine drifts, and evaluation ran in between)."""
    from llmshrink.api import open_bundle
    from llmshrink.exporters.timing import time_decoder
    from llmshrink.targets.profile import load_target

    default = load_target("cpu").default_workload
    opened = {k: open_bundle(p) for k, p in paths.items()}
    got: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds):
        for k, b in opened.items():
            m = time_decoder(b.decoder, b.manifest.workload or default, vocab_size=b.spec.base.vocab_size)
            got[k].append(m.reference_ms)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in got.items()), file=sys.stderr)
    return {k: statistics.median(v) for k, v in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="../shared/evaldata (read-only; tasks are rendered from it)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="0.7xint4-a8,0.85xint4-a8,1.0xint4-a8,1.15xint4-a8",
                    help="comma-separated compress --latency values, one run per budget and strategy")
    ap.add_argument("--reuse", action="append", default=[], metavar="STRATEGY:BUDGET=RUN_DIR",
                    help="a finished compress run of that strategy and budget to take instead of running it")
    ap.add_argument("--baseline-run", default=None,
                    help="a finished `compress --spec <uniform w4g32a8>` run: uniform int4 with the same recovery")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds over all bundles")
    ap.add_argument("--out", default="runs/joint-vs-sequential")
    ap.add_argument("--results", default=None, help="also write the table to this file")
    args = ap.parse_args()

    from llmshrink.compressor.budget import resolve_budgets
    from llmshrink.progress import NULL_PROGRESS

    out = Path(args.out)
    tasks_dir, wiki, _ = uniform_setup(out, args.data_dir, args.model, "w4g32a8")
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    reuse = {}
    for r in args.reuse:
        key, _, path = r.partition("=")
        strategy, _, budget = key.partition(":")
        if strategy not in STRATEGIES or budget not in budgets or not path:
            ap.error(f"--reuse {r!r}: write STRATEGY:BUDGET=RUN_DIR, STRATEGY in {STRATEGIES}, BUDGET one of --budgets")
        reuse[(strategy, budget)] = Path(path)
    ms = {b: resolve_budgets(b, args.model, "cpu", None, NULL_PROGRESS)[0][0] for b in budgets}
    walls = out / "walls.json"
    runs = {}
    for budget in budgets:  # a budget's two runs back to back: a partial benchmark compares like with like
        for strategy in STRATEGIES:
            run = reuse.get((strategy, budget)) or out / strategy / budget
            if (strategy, budget) in reuse:
                _check_reused(run, strategy, ms[budget])
            else:
                _run(run, walls, args.model, budget, strategy)
            runs[(strategy, budget)] = run
    # The budgets as the runs priced them: on a CPU the shipped table is not from, the first ``compress``
    # adapts the table, so what resolved before it (used only to check reused runs) can differ.
    ms = {b: _selected(runs[(STRATEGIES[0], b)])[1]["budget_ms"] for b in budgets}

    first = runs[(STRATEGIES[0], budgets[0])]
    bundles: dict[str, Path] = {"original": first / "reference" / "fp32",
                                "uniform int4 (gptq, no recovery)": first / "reference" / "w4g32a8"}
    if args.baseline_run:
        bundles["uniform int4 + recovery"] = _selected(Path(args.baseline_run))[0]
    info = {}
    for (strategy, budget), run in runs.items():
        path, cand = _selected(run)
        label = f"{strategy} {budget}"
        bundles[label] = path
        kls = {_data(c)["name"]: _data(c)["screen_kd"] for c in cand.get("contenders", ())}
        shipped = next((_data(c)["name"] for c in cand.get("contenders", ()) if _data(c).get("shipped")), "-")
        info[label] = (shipped, kls.get("search"), kls, cand)
    scores = {label: evaluate(path, out / "evals" / (label.replace(" ", "_").replace("/", "_") + ".json"), full=True,
                              tasks_dir=tasks_dir, wiki=wiki, ppl_tokens=args.ppl_tokens)
              for label, path in bundles.items()}
    meas = measure_side_by_side(bundles, args.rounds)  # last: evaluation is CPU-bound

    int4 = meas["uniform int4 (gptq, no recovery)"]
    lines = ["$ python benchmarks/joint_vs_sequential.py " + " ".join(sys.argv[1:]),
             machine_line(),
             f"budgets relative to uniform w4g32a8 on this machine's cpu table ({', '.join(f'{b} = {ms[b]:g} ms' for b in budgets)}); "
             "decode, batch 1, 256 tokens in cache; ORT bundles as shipped. shipped: the contender the run screened "
             "best and recovered (search, or a baseline: uniform-<format>, importance). search KL: the search's own "
             "subnet's screening KL from the original (quantizer only, 64 rows). meas: median over "
             f"{args.rounds} interleaved rounds of each bundle's floor of block medians. Tasks 0-shot: ARC-E dev, BoolQ, "
             f"Wino full; HellaSwag first {HELLASWAG_DOCS}. wiki: WikiText-2 test, first {args.ppl_tokens} tokens, "
             "context 512, stride 256.",
             "",
             f"{'bundle':<34}{'shipped':>18}{'search KL':>10}{'pred ms':>9}{'meas ms':>9}{'/int4':>7}"
             + "".join(f"{v:>8}" for v in TASKS.values()) + f"{'mean4':>8}{'wiki':>8}"]
    for label, path in bundles.items():
        m = _data(json.loads((path / "manifest.json").read_text()))
        ev = scores[label]
        accs = [ev["acc"].get(t) for t in TASKS]
        shipped, skl, _, _ = info.get(label, ("-", None, None, None))
        f = lambda x, p=2: f"{x:.{p}f}" if x is not None else "-"  # noqa: E731
        mean = sum(accs) / len(accs) if None not in accs else None
        lines.append(f"{label[:33]:<34}{shipped:>18}{f(skl, 4):>10}{f(m.get('predicted_latency_ms')):>9}"
                     f"{meas[label]:>9.2f}{meas[label] / int4:>7.3f}"
                     + "".join(f"{a * 100:>8.2f}" if a is not None else f"{'-':>8}" for a in accs)
                     + f"{f(mean * 100 if mean is not None else None):>8}{ev['ppl']:>8.2f}")
    lines.append("")
    w = json.loads(walls.read_text()) if walls.is_file() else {}
    for label, (_, _, kls, cand) in info.items():
        run = runs[tuple(label.split(" ", 1))]
        wall = w.get(str(run))
        lines.append(f"{label}: screening KL " + ", ".join(f"{k} {v:.4f}" for k, v in kls.items())
                     + "; phases (s) " + ", ".join(f"{k} {v:.0f}" for k, v in cand.get("seconds", {}).items())
                     + (f"; wall {wall['seconds'] / 60:.1f} min{' (resumed)' if wall['resumed'] else ''}" if wall
                        else f"; run reused from {run}"))
    emit(lines, args.results)


if __name__ == "__main__":
    main()
