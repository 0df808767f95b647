"""Does ``compress`` ship the best model at a latency? One run against the baselines it builds and uniform int4.

For one budget (default ``1.0xint4-a8``: the uniform w4g32a8 export's predicted latency on this machine's cpu
table):

* ``llmshrink compress --target cpu --latency L``: the search, its contenders (uniform formats that fit, the
  importance heuristic), screened alike; the winner recovered and shipped, the rest exported as screened, the
  original and uniform int4 exported beside them (``RUN_DIR/reference``). Wall time from this script.
* ``llmshrink compress --spec <uniform int4> --target cpu``: uniform int4 with the same quantizer *and the same
  recovery*: the baseline the shipped model must match or beat (``--baseline-run`` reuses one).

Every bundle is scored as shipped (ONNX Runtime) by ``llmshrink eval``: WikiText-2 test perplexity (first
``--ppl-tokens`` tokens, context 512, stride 256); ``--full-tasks`` adds the four local tasks to the shipped
model and the recovered baseline. The shipped bundle is then timed in turn against the uniform int4 reference
(``validate --reference``, both orders).

    python benchmarks/baselines.py --data-dir ../shared/evaldata [--latency 1.0xint4-a8] [--out runs/baselines]
        [--baseline-run DIR] [--run DIR] [--full-tasks] [--results benchmarks/results/baselines_cpu.txt]

``--run DIR`` scores a finished (or resumed) ``compress --latency L --out DIR`` run instead of starting one; its
wall time is then not this script's to measure, and the table gives the run's phase seconds only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from _cli import (  # benchmarks/ is on sys.path when a script in it runs
    HELLASWAG,
    HELLASWAG_DOCS,
    emit,
    evaluate,
    machine_line,
    sh,
    timed_in_turn,
    uniform_args,
    uniform_setup,
)


def _compress(run: Path, record: Path, *args: str) -> dict:
    """``llmshrink compress ARGS --out run --json``, once: its answer (with this script's wall time) is kept."""
    if not record.is_file():
        t0 = time.perf_counter()
        rec = json.loads(sh("compress", *args, "--out", str(run), "--json"))
        rec["wall_seconds"] = time.perf_counter() - t0
        record.write_text(json.dumps(rec, indent=1))
    return json.loads(record.read_text())


def _data(x: dict) -> dict:
    return x.get("_data", x)


def main() -> None:
    ap = uniform_args(__doc__)
    ap.add_argument("--latency", default="1.0xint4-a8")
    ap.add_argument("--out", default="runs/baselines")
    ap.add_argument("--baseline-run", default=None,
                    help="a finished `compress --spec <uniform FORMAT>` run directory to reuse as the recovered baseline")
    ap.add_argument("--run", default=None,
                    help="a finished `compress --latency L` run directory to score instead of running compress")
    ap.add_argument("--full-tasks", action="store_true", help="score the shipped and baseline models on the four tasks")
    ap.add_argument("--results", default=None, help="also write the table to this file")
    args = ap.parse_args()

    out = Path(args.out)
    tasks_dir, wiki, spec = uniform_setup(out, args.data_dir, args.model, args.format)
    if args.run:
        run = Path(args.run)
        rec, wall = _data(json.loads((run / "compress.json").read_text())), None
    else:
        run = out / "compress"
        rec = _data(_compress(run, out / "compress.json", "--model", args.model, "--target", "cpu",
                              "--latency", args.latency))
        wall = json.loads((out / "compress.json").read_text())["wall_seconds"]
    if args.baseline_run:
        base_run = Path(args.baseline_run)
        base = _data(json.loads((base_run / "compress.json").read_text()))
        base_cand = _data(base["candidates"][0])
        base_wall = None
    else:
        base_run = out / "baseline"
        answer = _compress(base_run, out / "baseline.json", "--model", args.model, "--target", "cpu", "--spec",
                           str(spec))
        base_cand, base_wall = _data(_data(answer)["candidates"][0]), answer["wall_seconds"]

    runrec = _data(json.loads((run / "run.json").read_text()))
    entries = [_data(e) for e in runrec["entries"]]
    cands = {_data(c)["label"]: _data(c) for c in rec["candidates"]}
    kl = {}
    for c in cands.values():
        for k in map(_data, c.get("contenders", ())):
            kl[k["bundle"]] = (k["name"], k["screen_kd"], k["shipped"])
    rows = []
    for e in entries + [{"path": str(base_run / base_cand["bundle"]), "role": "baseline",
                         "label": f"uniform {args.format} + recovery (compress --spec)"}]:
        bundle = Path(e["path"]) if Path(e["path"]).is_absolute() or e["path"].startswith(str(base_run)) \
            else run / e["path"]
        m = json.loads((bundle / "manifest.json").read_text())
        m = _data(m)
        held = next((v for k, v in m.get("quality", {}).items() if k.startswith("ppl:held-out")), None)
        meas = [_data(x) for x in m.get("measured") or ()]
        measured = (meas[-1].get("floor_ms") or meas[-1]["median_ms"]) if meas else None
        full = args.full_tasks and (e["role"] == "selected" or "compress --spec" in e["label"])
        ev = evaluate(bundle, out / "evals" / (e["label"].replace(" ", "_").replace("/", "_") + ".json"),
                      full=full, tasks_dir=tasks_dir, wiki=wiki, ppl_tokens=args.ppl_tokens)
        name, skl, _ = kl.get(e["path"], ("", None, False))
        rows.append((e["label"], e["role"], m.get("predicted_latency_ms"), measured, skl, held, ev))

    budgets = ", ".join(f"{c['budget_ms']:g} ms" for c in cands.values())
    names = {"arc_easy_local": "ARC-E", "boolq_local": "BoolQ", "winogrande_local": "Wino",
             HELLASWAG: f"HS{HELLASWAG_DOCS}"}
    lines = [f"$ python benchmarks/baselines.py --data-dir {args.data_dir} --latency {args.latency} --out {args.out}"
             + (f" --baseline-run {args.baseline_run}" if args.baseline_run else "")
             + (f" --run {args.run}" if args.run else "")
             + (" --full-tasks" if args.full_tasks else ""),
             machine_line(),
             f"budget {args.latency} = {budgets} on this "
             f"machine's cpu table; decode, batch 1, 256 tokens in cache. ORT bundles as shipped. KL: the screening "
             "KL from the original (quantizer only). held: perplexity on the run's held-out calibration rows. "
             f"wiki: WikiText-2 test, first {args.ppl_tokens} tokens, context 512, stride 256.",
             "",
             f"{'bundle':<58}{'role':>10}{'pred ms':>9}{'meas ms':>9}{'KL':>8}{'held':>8}{'wiki':>8}"
             + "".join(f"{v:>8}" for v in names.values()) + f"{'mean4':>8}"]
    for label, role, pred, meas, skl, held, ev in rows:
        accs = [ev["acc"].get(t) for t in names]
        cells = "".join(f"{a * 100:>8.2f}" if a is not None else f"{'-':>8}" for a in accs)
        mean = f"{sum(accs) / len(accs) * 100:>8.2f}" if all(a is not None for a in accs) else f"{'-':>8}"
        f = lambda x, p=2: f"{x:.{p}f}" if x is not None else "-"  # noqa: E731
        lines.append(f"{label[:57]:<58}{role:>10}{f(pred):>9}{f(meas):>9}{f(skl, 4):>8}{f(held):>8}{ev['ppl']:>8.2f}"
                     f"{cells}{mean}" + ("  (eval reused)" if ev.get("reused") else ""))
    lines += [""] + [n for n in runrec.get("notes", ()) if "search" in n and ("won" in n or "win" in n)]
    for c in cands.values():
        secs = c.get("seconds", {})
        took = f"wall {wall / 60:.1f} min" if wall else "wall not timed here (--run)"
        lines.append(f"compress --latency {args.latency}: {took}; phases (s) for {c['label']}: "
                     + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()))
    if base_wall:
        lines.append(f"compress --spec {args.format} (the recovered baseline): wall {base_wall / 60:.1f} min")
    ref = next(run / e["path"] for e in entries if e["path"].startswith("reference/w"))
    shipped = next(run / e["path"] for e in entries if e["role"] == "selected")
    lines.append(timed_in_turn(shipped, ref, "shipped", f"uniform {args.format}").replace(
        " (predicted 1.000x: same graph, other codes)", ""))
    emit(lines, args.results)


if __name__ == "__main__":
    main()
