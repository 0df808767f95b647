"""Predicted vs measured latency on the cpu target, over seeded random specs of SmolLM2-135M.

For each seed, a random spec (widths, kept layers and a format per linear
drawn from the cpu target's kernels) is materialized from the real weights
and exported with the ``ort`` flavour; ``predict`` gives its latency from
the target's table; ONNX Runtime measures it. Measurement interleaves the
specs: ``--rounds`` passes over all of them, each timing ``--decode-runs`` /
``--prefill-runs`` calls in blocks after a warm-up and keeping the floor (the
fastest block median, what ``validate`` compares; see
``llmshrink/exporters/timing.py``); the reported figure is the median over
rounds. The errors against plain medians are printed too.

    python benchmarks/latency_model.py [--specs 30] [--table PATH] [--json out.json] [--save-tables DIR]

Prints one row per spec and, per workload, the mean and median absolute
percentage error (MAPE, MdAPE), the worst error and the mean signed error.

Several tables can be judged on one measurement (``--table NAME=SOURCE``, repeatable; the first one's
predictions fill the per-spec rows, every table gets its summary lines). SOURCE is a table JSON, or:

* ``shipped``: the table packaged with llmshrink (measured on whatever CPU made it);
* ``profiled``: this machine's table written by ``llmshrink targets profile`` (skipped if there is none);
* ``adapted``: the shipped table adapted to this CPU by the quick profile (``targets profile --quick``),
  measured by this run before the specs are timed (its wall time is printed).

SOURCE may also be ``OTHER:no-anchors``, OTHER the NAME of a table judged before it: that table without its
uniform anchor calls (``LatencyTable.without_anchors``), so one profile is judged with and without what the
anchors add (``--table full=profiled --table full-bare=full:no-anchors``); ``OTHER:anchor-fit`` predicts with
the relative factors fitted on the anchor calls (``LatencyTable.with_anchor_fit``; not the default).

``--formats`` says which kernels the random specs draw from: ``stable`` (default) is the target's formats
without the 2- and 8-bit MatMulNBits kernels at accuracy level 0 (float activations), whose times swing up
to 2x between runs on the same machine and which the cpu target never searches (its ``search_formats`` are
int8-activation kernels); ``all`` keeps them; ``search`` uses the search formats only.

    python benchmarks/latency_model.py --table shipped=shipped --table adapted=adapted --table full=profiled
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--table", action="append", default=None, metavar="NAME=SOURCE",
                    help="a table to judge (repeatable): SOURCE is shipped, profiled, adapted or a JSON path; "
                         "default: the target's own")
    ap.add_argument("--formats", choices=("stable", "all", "search"), default="stable",
                    help="which kernels the random specs draw from (see above)")
    ap.add_argument("--specs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1000, help="first spec seed (the profiler samples its own)")
    ap.add_argument("--uniform", default="", metavar="FMT,FMT",
                    help="also judge the unpruned model in each of these formats (what compress's uniform baselines "
                         "are; seed column -1, -2, ...)")
    ap.add_argument("--workloads", nargs="+", default=["decode:ctx=256", "prefill:ctx=128"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-runs", type=int, default=40)
    ap.add_argument("--prefill-runs", type=int, default=10)
    ap.add_argument("--reference", default="int4-a8", metavar="FMT",
                    help="also time the unpruned model in FMT in turn with the specs (every --reference-every specs "
                         "in each round) and judge predicted against measured ratios to it; 'none' to skip")
    ap.add_argument("--reference-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the per-spec results here")
    ap.add_argument("--save-tables", default=None, metavar="DIR",
                    help="write every judged table to DIR/NAME.json (the adapted one is otherwise lost with the run)")
    args = ap.parse_args()
    if args.reference_every < 1:
        ap.error("--reference-every must be at least 1")

    from llmshrink.compressor.materialize import materialize
    from llmshrink.exporters.onnx_ort import build_ort_graph
    from llmshrink.exporters.ort_session import OrtDecoder
    from llmshrink.exporters.timing import time_decoder
    from llmshrink.models import load_model, load_tokenizer, resolve_model
    from llmshrink.spec import BaseShape, random_spec
    from llmshrink.targets import load_target, parse_workload
    from llmshrink.targets.predict import NoTableError, predict

    target = load_target(args.target)
    tables = dict(_tables(args.table, target))
    table = next(iter(tables.values()))
    if args.save_tables:
        from pathlib import Path

        Path(args.save_tables).mkdir(parents=True, exist_ok=True)
        for name, t in tables.items():
            t.save(f"{args.save_tables}/{name}.json")
    formats = _formats(target, args.formats)
    workloads = [parse_workload(w) for w in args.workloads]
    source = resolve_model(args.model)
    hf = load_model(source)
    tok = load_tokenizer(source)
    base = BaseShape.from_config(hf.config)
    max_len = max(w.context + w.new_tokens for w in workloads) + 2

    t0 = time.time()
    rows, missing = [], []
    from llmshrink.spec import SubnetSpec

    uniform = [f for f in args.uniform.split(",") if f]
    for i in range(args.specs + len(uniform)):
        if i < args.specs:
            seed = args.seed + i
            spec = random_spec(base, seed, formats, model=args.model)
        else:  # a uniform baseline; its "seed" says which
            seed = args.specs - i - 1
            spec = SubnetSpec.uniform(base, uniform[i - args.specs], model=args.model)
        try:
            preds = {name: [predict(spec, target, w, table=t) for w in workloads] for name, t in tables.items()}
        except NoTableError as e:  # a table gap is a failure of the table, shown as such
            print(f"seed {seed}: no prediction ({e.message})", file=sys.stderr)
            missing.append(seed)
            continue
        graph = build_ort_graph(materialize(hf, spec, tok), max_length=max_len).SerializeToString()
        dec = OrtDecoder(graph, threads=args.threads)
        mix = Counter(f for j in spec.kept_layers() for f in spec.layers[j].precision.values())
        rows.append({"seed": seed, "spec": spec, "decoder": dec, "pred": preds[next(iter(tables))], "preds": preds,
                     "meas": [[] for _ in workloads],
                     "med": [[] for _ in workloads],
                     "layers": len(spec.kept_layers()), "hidden": spec.hidden_size,
                     "formats": ",".join(f"{f}:{n}" for f, n in mix.most_common(3)), "lm_head": spec.lm_head})
        print(f"exported spec {i + 1}/{args.specs + len(uniform)} (seed {seed})", file=sys.stderr, flush=True)
    ref = None
    if args.reference != "none":  # the budgets' yardstick, timed in turn with the specs (see _ratio_errors)
        from llmshrink.formats import parse_format

        ref_spec = SubnetSpec.uniform(base, parse_format(args.reference).name, model=args.model)
        ref = {"spec": ref_spec, "preds": {name: [predict(ref_spec, target, w, table=t) for w in workloads]
                                           for name, t in tables.items()},
               "decoder": OrtDecoder(build_ort_graph(materialize(hf, ref_spec, tok), max_length=max_len)
                                     .SerializeToString(), threads=args.threads),
               "times": [[] for _ in workloads]}  # per workload: (position in the run's timing order, floor)
    del hf

    def timed(decoder, k, w, r):
        runs = args.decode_runs if w.phase == "decode" else args.prefill_runs
        return time_decoder(decoder, w, vocab_size=base.vocab_size, runs=runs, seed=r)

    clock = 0  # the order of timings, so each spec's reference is the nearest ones in turn
    for r in range(args.rounds):
        for i, row in enumerate(rows + [None]):
            if ref is not None and (row is None or i % args.reference_every == 0):
                for k, w in enumerate(workloads):
                    ref["times"][k].append((clock, timed(ref["decoder"], k, w, r).floor_ms))
                clock += 1
            if row is None:
                break
            row.setdefault("clock", []).append(clock)
            for k, w in enumerate(workloads):
                m = timed(row["decoder"], k, w, r)
                row["meas"][k].append(m.floor_ms)
                row["med"][k].append(m.median_ms)
            clock += 1
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    print(f"# {' '.join(sys.argv)}")
    from llmshrink.host import cpu_features, cpu_model

    print(f"# on {cpu_model()} ({', '.join(f for f in cpu_features() if 'avx512' in f or 'amx' in f) or 'no AVX-512'}); "
          f"model {args.model}; {args.specs} specs drawing from {args.formats} formats ({len(formats)}), "
          f"{args.rounds} interleaved rounds; {time.time() - t0:.0f} s")
    for name, t in tables.items():
        prov = t.provenance
        extra = f"; {prov.notes[0]}" if t.kind == "adapted" else ""
        print(f"# table {name}: {t.name} ({t.kind}), {prov.date}, measured on {prov.host.get('cpu', '?')}{extra}")
    print(f"# per-spec rows: table {next(iter(tables))}")
    head = f"{'seed':>5} {'L':>3} {'hid':>4} {'lm_head':>9} {'top formats':<34}"
    for w in workloads:
        head += f" | {str(w.phase)[:3]}:{w.context:<4} pred   meas    err"
    print(head)
    errs = [[] for _ in workloads]
    errs_median = [[] for _ in workloads]
    out = []
    for row in rows:
        line = f"{row['seed']:>5} {row['layers']:>3} {row['hidden']:>4} {row['lm_head']:>9} {row['formats'][:34]:<34}"
        rec = {"seed": row["seed"], "fingerprint": row["spec"].fingerprint(), "layers": row["layers"],
               "hidden": row["hidden"], "workloads": {}}
        for k, w in enumerate(workloads):
            pred = row["pred"][k].total_ms
            meas = float(np.median(row["meas"][k]))
            med = float(np.median(row["med"][k]))
            e = (pred - meas) / meas * 100
            if row["seed"] >= 0:  # the summaries are over the random specs; uniform ones get their own lines
                errs[k].append(e)
                errs_median[k].append((pred - med) / med * 100)
            line += f" | {'':>8} {pred:6.2f} {meas:6.2f} {e:+6.1f}%"
            rec["workloads"][str(w)] = {"predicted_ms": pred, "measured_ms": meas, "rounds_ms": row["meas"][k],
                                        "median_ms": med, "rounds_median_ms": row["med"][k],
                                        "error_pct": e, "coverage": row["pred"][k].coverage}
        print(line)
        out.append(rec)
    print()
    judged = [row for row in rows if row["seed"] >= 0]
    if missing:
        print(f"NO PREDICTION (table gap) for seeds {missing}: {len(missing)} of {args.specs} specs")
    for k, w in enumerate(workloads):
        e = np.abs(errs[k])
        print(f"{w.describe():40s} MAPE {e.mean():5.1f}%  MdAPE {np.median(e):5.1f}%  max {e.max():5.1f}%  "
              f"mean signed {np.mean(errs[k]):+5.1f}%  within 10%: {(e <= 10).sum()}/{len(e)}")
        em = np.abs(errs_median[k])
        print(f"{'  (vs the plain medians instead of floors)':40s} MAPE {em.mean():5.1f}%  MdAPE {np.median(em):5.1f}%  "
              f"mean signed {np.mean(errs_median[k]):+5.1f}%")
    if args.rounds > 1:  # how far the same graph's floor moves between rounds: the noise any table is judged against
        for k, w in enumerate(workloads):
            spread = np.array([(max(row["meas"][k]) - min(row["meas"][k])) / np.median(row["meas"][k]) * 100
                               for row in judged])
            print(f"run-to-run spread of the floor, {w.phase}: median {np.median(spread):4.1f}%, max {spread.max():4.1f}% "
                  f"((max - min) / median of each spec's {args.rounds} rounds)")
    # Scale-free: each table's predictions times the one factor (median measured/predicted) that best matches
    # this run. What is left is how well the table ranks and spaces subnets (what a search needs), apart from
    # how fast the machine happens to be today (a shared VM's floor drifts by tens of percent between hours).
    print("tables (every row: the same measurements):")
    for name in tables:
        for k, w in enumerate(workloads):
            pred = np.array([row["preds"][name][k].total_ms for row in judged])
            meas = np.array([np.median(row["meas"][k]) for row in judged])
            e, a = (pred - meas) / meas * 100, np.abs(pred - meas) / meas * 100
            f = float(np.median(meas / pred))
            a_free = np.abs(pred * f - meas) / meas * 100
            print(f"  {name:8s} {w.phase:8s} MAPE {a.mean():5.1f}%  max {a.max():5.1f}%  mean signed {e.mean():+5.1f}%  "
                  f"within 10%: {(a <= 10).sum():>2}/{len(a)}  | scale-free (x{f:.3f}): MAPE {a_free.mean():5.1f}%  "
                  f"max {a_free.max():5.1f}%")
    if ref is not None:
        _ratio_errors(judged, ref, tables, workloads, args.reference)
        _uniform_ratios([row for row in rows if row["seed"] < 0], ref, tables, workloads, args.reference)
    for name in tables:
        for rec, row in zip(out, rows, strict=True):
            for k, w in enumerate(workloads):
                rec["workloads"][str(w)].setdefault("predicted_by", {})[name] = row["preds"][name][k].total_ms
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "table": table.name, "tables": list(tables), "specs": out}, f,
                      indent=1)


def _ratio_errors(rows, ref, tables, workloads, reference: str) -> None:
    """Each table judged on ratios to the reference model instead of milliseconds.

    A spec's measured ratio in a round is its floor over the mean of the reference floors timed just before and
    just after it (in turn, minutes apart at most); the figure is the median over rounds. The predicted ratio is
    the table's prediction of the spec over its prediction of the reference. What a relative budget
    (``0.85xint4-a8``) and ``validate --reference`` rely on, with the VM's drift since the table was measured
    taken out by a measurement, not fitted to the answers (as the scale-free figure is).
    """
    print(f"ratios to the unpruned {reference} model timed in turn (every row: the same measurements):")
    for k, w in enumerate(workloads):
        marks = ref["times"][k]
        meas = np.array([_measured_ratio(row, k, marks) for row in rows])
        spread = np.array([f for _, f in marks])
        for name in tables:
            pref = ref["preds"][name][k].total_ms
            pred = np.array([row["preds"][name][k].total_ms for row in rows]) / pref
            e = (pred - meas) / meas * 100
            a = np.abs(e)
            print(f"  {name:8s} {w.phase:8s} ratio MAPE {a.mean():5.1f}%  max {a.max():5.1f}%  mean signed "
                  f"{e.mean():+5.1f}%  within 10%: {(a <= 10).sum():>2}/{len(a)}  | reference predicted "
                  f"{pref:6.2f} ms")
        print(f"  (reference floor over the run: median {np.median(spread):.2f} ms, min {spread.min():.2f}, "
              f"max {spread.max():.2f}, {len(spread)} timings)")


def _measured_ratio(row, k: int, marks) -> float:
    """Median over rounds of the row's floor over the mean of the reference floors timed just before and after."""
    per_round = []
    for c, floor in zip(row["clock"], row["meas"][k], strict=True):
        before = max((m for m in marks if m[0] < c), key=lambda m: m[0])
        after = min((m for m in marks if m[0] > c), key=lambda m: m[0])
        per_round.append(floor / ((before[1] + after[1]) / 2))
    return float(np.median(per_round))


def _uniform_ratios(rows, ref, tables, workloads, reference: str) -> None:
    """The ``--uniform`` baselines one by one: measured ratio to the reference beside each table's prediction."""
    if not rows:
        return
    print(f"uniform unpruned models, ratio to the unpruned {reference} model timed in turn: measured | predicted by "
          + ", ".join(tables))
    for row in rows:
        for k, w in enumerate(workloads):
            meas = _measured_ratio(row, k, ref["times"][k])
            preds = [row["preds"][n][k].total_ms / ref["preds"][n][k].total_ms for n in tables]
            print(f"  {row['spec'].lm_head:>9} {w.phase:8s} {meas:6.3f} | "
                  + "  ".join(f"{p:6.3f} ({(p - meas) / meas * 100:+5.1f}%)" for p in preds))


def _formats(target, which: str) -> list[str]:
    from llmshrink.targets.profilers.cpu import volatile_kernel

    if which == "search":
        return list(target.search_formats or target.formats)
    if which == "all":
        return list(target.formats)
    return [f for f in target.formats if not volatile_kernel(f)]


# OTHER:suffix table sources: a table judged before, without its anchor calls or with the anchor fit
VARIANTS = {":no-anchors": lambda t: t.without_anchors(), ":anchor-fit": lambda t: t.with_anchor_fit()}


def _tables(specs: list[str] | None, target):
    """(name, table) per ``--table NAME=SOURCE``, in order (see the module docstring)."""
    from llmshrink.targets.adapt import builtin_table_path, quick_adapt
    from llmshrink.targets.predict import table_for
    from llmshrink.targets.table import load_table, profiled_table_path

    if not specs:
        yield "target", table_for(target)
        return
    made: dict[str, object] = {}
    for item in specs:
        name, _, src = item.partition("=")
        src = src or name
        variant = next((v for v in VARIANTS if src.endswith(v)), None)
        if variant:  # a table judged above, without part of what its anchors add
            of = src.removesuffix(variant)
            if of not in made:
                raise SystemExit(f"--table {item}: name a table judged before it ({', '.join(made) or 'none yet'})")
            table = VARIANTS[variant](made[of])
        elif src == "shipped":
            table = load_table(builtin_table_path(target.table))
        elif src == "profiled":
            path = profiled_table_path(target.table)
            if not path.is_file():
                print(f"table {name}: no profiled table at {path}; skipped", file=sys.stderr)
                continue
            table = load_table(path)
        elif src == "adapted":
            t0 = time.time()
            table = quick_adapt(load_table(builtin_table_path(target.table)), target.formats,
                                search_formats=target.search_formats, anchors=target.adaptation_anchors,
                                command=" ".join(sys.argv))
            print(f"table {name}: quick adaptation took {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        else:
            table = load_table(src)
        made[name] = table
        yield name, table


if __name__ == "__main__":
    main()
