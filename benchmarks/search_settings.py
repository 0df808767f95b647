"""The joint search alone, under SearchConfig variants, on the pieces of one finished (or killed) ``compress`` run.

Reads from ``--run`` what the run already made (its config, calibration rows, importance scores, the unpruned
model quantized in each search format) and, per variant, runs the search at the run's budget from the run's own
start (its most faithful baseline), extracts and fits the subnet as ``compress`` does, quantizes it with the run's
quantizer and scores it on the run's screening rows (KL from the original): the number ``compress`` ranks its
contenders by. Printed beside the baselines' screening KLs the run recorded (``screen.json``). No recovery, no
export: a search setting is judged by what it hands the screening. "moves" counts the search's moves away from its
start that it measured before they settled (``verify_rows``), kept/undone.

    python benchmarks/search_settings.py --run runs/joint-vs-sequential/joint/1.0xint4-a8 \\
        --variant default: --variant lr0.05:arch_lr=0.05 [--results FILE]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from _cli import emit


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a compress run directory with one searched budget")
    ap.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=VALUE,...",
                    help="a SearchConfig override set (NAME: for the run's own settings)")
    ap.add_argument("--start", default=None, metavar="NAME",
                    help="start every variant from this baseline of the run (e.g. 'mixed precision') instead of the "
                         "run's own start")
    ap.add_argument("--results", default=None)
    ap.add_argument("--out", default=None, help="write each variant's fitted spec here (NAME.json)")
    args = ap.parse_args()

    from llmshrink import serde
    from llmshrink.compressor.contenders import screen_kd
    from llmshrink.compressor.materialize import materialize
    from llmshrink.compressor.model import CompressedModel
    from llmshrink.compressor.pipeline import (
        RECORD,
        CompressRecord,
        _baselines,
        _Context,
        _Inputs,
        _search_start,
        fit_searched,
    )
    from llmshrink.compressor.search import run_search
    from llmshrink.compressor.space import default_space, load_space
    from llmshrink.compressor.supernet import Supernet
    from llmshrink.models import load_config, resolve_model
    from llmshrink.progress import NULL_PROGRESS
    from llmshrink.spec import BaseShape
    from llmshrink.targets.predict import predict, table_for
    from llmshrink.targets.profile import load_target

    run = Path(args.run)
    rec = serde.loads((run / RECORD).read_text(), expect=CompressRecord)
    config = rec.config
    (budget,) = config.budgets_ms
    target = load_target(config.target)
    table = table_for(target)
    workload = config.workload or target.default_workload
    source = resolve_model(config.model)
    base = BaseShape.from_config(load_config(source))
    fmts = target.search_formats or target.formats
    space = (load_space(config.space, base, target.formats, search_formats=fmts) if config.space
             else default_space(base, target.formats, search_formats=fmts))
    inputs = _Inputs(config, source, run, NULL_PROGRESS)
    ctx = _Context(config, run, target, table, workload, space, base, source, True, (), inputs)
    targets = inputs.teacher_targets({})
    quantized = {d.name: CompressedModel.load(d) for d in sorted((run / "search-quant").iterdir())
                 if (d / "spec.json").is_file()}
    baselines = _baselines(ctx, budget)
    start = _search_start(ctx, budget, baselines)
    if args.start:
        named = {c.name: c.spec for c in baselines}
        if args.start not in named:
            sys.exit(f"--start {args.start!r}: the run's baselines are {', '.join(map(repr, named))}")
        start = named[args.start]
    label = f"{budget:g}ms"
    screened = json.loads((run / f"search-{label}" / "screen.json").read_text())
    lines = [f"$ python benchmarks/search_settings.py {shlex.join(sys.argv[1:])}",
             f"run {run}: {config.model} on {config.target} at {budget:g} ms ({config.calib_data} text), search from "
             f"{'the ' + next(c.name for c in baselines if c.spec == start) + ' baseline' if start in [c.spec for c in baselines] else 'a uniform search format'}; "
             f"screening KL: the fitted subnet quantized by {config.quantizer}, KL from the original on the run's "
             f"{len(inputs.screen_rows)} screening rows. The run's own screening: "
             + ", ".join(f"{k} {v:.4f}" for k, v in screened.items()), "",
             f"{'variant':<22}{'kd 1-10':>9}{'kd 91-100':>10}{'E[lat]':>8}{'pred ms':>9}{'blocks':>7}{'heads cut':>10}"
             f"{'mlp cut':>8}{'8-bit':>6}{'head':>9}{'moves':>8}{'screen KL':>10}{'min':>6}"]
    for v in args.variant:
        name, _, kv = v.partition(":")
        overrides = {k: _value(x) for k, _, x in (p.partition("=") for p in kv.split(",") if p)}
        cfg = replace(config.search, **overrides)
        t0 = time.perf_counter()
        net = Supernet(inputs.hf, space, inputs.importance)
        net.use_quantized(quantized)
        res = run_search(net, inputs.hf, inputs.search_calib, table=table, workload=workload, budget_ms=budget,
                         params_budget=config.params_budget, config=cfg, targets=targets, start_from=start)
        spec = net.argmax_spec(model=source.describe())
        spec, _ = fit_searched(spec, net, inputs.importance, space, target, workload, table, budget)
        del net
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"{name}.json").write_text(spec.to_json())
        cm = materialize(inputs.hf, spec, inputs.tok, calib=inputs.quant_calib, quantizer=config.quantizer)
        kl = screen_kd(cm, inputs.hf, inputs.screen_rows)
        h = res.history
        # moves away from the start measured by the search (llmshrink.compressor.moves): kept/undone
        moves = f"{sum(c.accepted for c in res.moves)}/{sum(not c.accepted for c in res.moves)}"
        kept = [ls for ls in spec.layers if ls.keep]
        dropped = [i for i, ls in enumerate(spec.layers) if not ls.keep]
        eight = sum(1 for ls in kept for f in ls.precision.values() if f.startswith("w8"))
        lines.append(
            f"{name:<22}{statistics.mean(x.kd for x in h[:10]):>9.3f}{statistics.mean(x.kd for x in h[-10:]):>10.3f}"
            f"{h[-1].latency_ms:>8.2f}{predict(spec, target, workload, table=table).total_ms:>9.3f}{len(kept):>7}"
            f"{sum(base.num_heads - ls.num_heads for ls in kept):>10}"
            f"{sum(base.intermediate_size - ls.intermediate_size for ls in kept):>8}{eight:>6}{spec.lm_head:>9}"
            f"{moves:>8}{kl:>10.4f}{(time.perf_counter() - t0) / 60:>6.1f}  dropped {dropped}")
        print(lines[-1], flush=True)
    emit(lines, args.results)


if __name__ == "__main__":
    main()
