"""Recovery on a fixed plan: ``compress --spec`` (GPTQ + the default recovery) against the quantizers alone, one run.

For one uniform spec of the default model (w4g32a8 unless ``--format``):

* ``fp32 original`` -- ``llmshrink export`` of the unquantized model;
* ``rtn`` and ``gptq`` -- ``llmshrink export --spec S --quantizer Q``, no training;
* ``gptq + recovery`` -- ``llmshrink compress --spec S --target cpu``: GPTQ, then the default recovery
  (quantization-aware distillation from the original), exported and validated as ``compress`` ships it.
  Its wall time, training tokens and held-out KD come from the run's own record.
* ``recovery on other text`` (with ``--other-text D``) -- the same ``compress --spec`` with ``--calib-data D``
  (``self``, ``wiki``, a file): GPTQ and recovery on another calibration text than the default, the comparison
  that decides the default. Text from a benchmark's own source (WikiText-2 valid, or Wikipedia at all) flatters
  that benchmark's perplexity: judge it on the four tasks.

Every bundle is scored as shipped (ONNX Runtime) by ``llmshrink eval``: WikiText-2 test perplexity (first
``--ppl-tokens`` tokens, context 512, stride 256). The rows named by ``--full-tasks`` also get the four local
tasks: ARC-Easy dev, BoolQ and WinoGrande on their full sets, HellaSwag on its first 1,000 (accuracy; their mean
is the issue's quality bar: within 1 point of the fp32 model); the others perplexity only (the four tasks take
about 20 minutes per bundle on 2 Zen 4 cores, BoolQ most of it; ``benchmarks/quantizer.py`` scores ARC-Easy for
RTN and GPTQ).
Finally the recovered bundle is timed in turn with the RTN bundle (``llmshrink validate --reference``, both
orders; same graph, other codes, so the ratio should be 1).

Evaluations are kept in ``--out/evals/NAME.json`` and reused by a rerun into the same ``--out`` (the table says
which); delete them to score again.

    python benchmarks/recovery.py --data-dir ../shared/evaldata [--format w4g32a8] [--out runs/recovery]
        [--full-tasks "fp32 original,gptq + recovery"] [--results benchmarks/results/recovery_cpu.txt]
        [--other-text self]
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
    sh,
    timed_in_turn,
    uniform_args,
    uniform_setup,
)

from llmshrink.models.data import DEFAULT_CALIB_DATA

ROWS = ("fp32 original", "rtn", "gptq", "gptq + recovery")
OTHER = "recovery on other text"  # the row --other-text adds (no comma: --full-tasks splits on commas)
_COMPRESSED = {"gptq + recovery": ("recovered", "compress"), OTHER: ("recovered-other", "compress-other")}


def _slug(name: str) -> str:
    return _COMPRESSED[name][0] if name in _COMPRESSED else name.split()[0]


def _build(name: str, out: Path, spec: Path, model: str, other_text: str | None = None) -> tuple[Path, dict]:
    """The bundle of row ``name`` (built unless a previous run left it) and what its build reported."""
    if name in _COMPRESSED:
        run = out / _COMPRESSED[name][1]
        rec_file = out / f"{_COMPRESSED[name][1]}.json"
        if not rec_file.is_file():
            t0 = time.perf_counter()
            calib = ("--calib-data", other_text) if name == OTHER else ()
            rec = json.loads(sh("compress", "--model", model, "--target", "cpu", "--spec", str(spec), "--out", str(run),
                                *calib, "--json"))
            rec["wall_seconds"] = time.perf_counter() - t0
            rec_file.write_text(json.dumps(rec, indent=1))
        rec = json.loads(rec_file.read_text())
        data = rec.get("_data", rec)
        cand = data["candidates"][0]
        cand = cand.get("_data", cand)
        return run / cand["bundle"], {"wall_seconds": rec["wall_seconds"], **cand}
    bundle = out / _slug(name)
    if not (bundle / "manifest.json").is_file():
        spec_args = [] if name == "fp32 original" else ["--spec", str(spec), "--quantizer", name]
        sh("export", "--model", model, *spec_args, "--target", "cpu", "--out", str(bundle), "--json")
    return bundle, {}


def main() -> None:
    ap = uniform_args(__doc__)
    ap.add_argument("--full-tasks", default="fp32 original,gptq + recovery",
                    help=f"rows scored on all four tasks (others: perplexity only); of {', '.join(ROWS)}")
    ap.add_argument("--out", default="runs/recovery")
    ap.add_argument("--results", default=None, help="also write the table to this file")
    ap.add_argument("--other-text", default=None, metavar="D",
                    help=f"also run compress --spec with --calib-data D: self, wiki or a file (row {OTHER!r})")
    args = ap.parse_args()
    all_rows = ROWS + ((OTHER,) if args.other_text else ())
    full_rows = {r.strip() for r in args.full_tasks.split(",") if r.strip()}
    if full_rows - set(all_rows):
        ap.error(f"--full-tasks: unknown rows {sorted(full_rows - set(all_rows))} (rows: {', '.join(all_rows)})")

    out = Path(args.out)
    tasks_dir, wiki, spec = uniform_setup(out, args.data_dir, args.model, args.format)

    rows, bundles = [], {}
    for name in all_rows:
        bundle, built = _build(name, out, spec, args.model, args.other_text)
        bundles[name] = bundle
        ev = evaluate(bundle, out / "evals" / f"{_slug(name)}.json", full=name in full_rows, tasks_dir=tasks_dir,
                       wiki=wiki, ppl_tokens=args.ppl_tokens)
        rows.append((name, built, ev))

    names = {"arc_easy_local": "ARC-E", "boolq_local": "BoolQ", "winogrande_local": "Wino",
             HELLASWAG: f"HS{HELLASWAG_DOCS}"}
    lines = [f"$ python benchmarks/recovery.py --data-dir {args.data_dir} --format {args.format} --out {args.out} "
             f"--full-tasks \"{args.full_tasks}\""
             + (f" --other-text {args.other_text}" if args.other_text else ""),
             f"uniform {args.format}, ORT bundles as shipped. ppl: WikiText-2 test, first {args.ppl_tokens} tokens, "
             f"context 512, stride 256. acc: ARC-Easy dev, BoolQ, WinoGrande (full sets), HellaSwag (first "
             f"{HELLASWAG_DOCS}); mean4 = their mean.",
             "",
             f"{'model':<24}{'ppl':>7}" + "".join(f"{v:>8}" for v in names.values()) + f"{'mean4':>8}"]
    for name, _built, ev in rows:
        accs = [ev["acc"].get(t) for t in names]
        cells = "".join(f"{a * 100:>8.2f}" if a is not None else f"{'-':>8}" for a in accs)
        mean = f"{sum(accs) / len(accs) * 100:>8.2f}" if all(a is not None for a in accs) else f"{'-':>8}"
        lines.append(f"{name:<24}{ev['ppl']:>7.2f}{cells}{mean}" + ("   (eval reused)" if ev.get("reused") else ""))
    lines.append("")
    for name, built, _ev in rows:
        if name not in _COMPRESSED:
            continue
        secs = built.get("seconds", {})
        kd_b, kd_a = built.get("kd_before_recovery"), built.get("kd_after_recovery")
        what = f"--calib-data {args.other_text}" if name == OTHER else f"default calibration text, {DEFAULT_CALIB_DATA}"
        lines.append(f"{name}: compress --spec (GPTQ + default recovery, {what}): wall "
                     f"{built['wall_seconds'] / 60:.1f} min, recovery {built.get('recovery_tokens')} training tokens, "
                     f"held-out KD (on its own calibration text's held-out rows) {kd_b if kd_b is None else round(kd_b, 4)}"
                     f" -> {kd_a if kd_a is None else round(kd_a, 4)}; phases (s): "
                     + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()))
    lines.append(timed_in_turn(bundles["gptq + recovery"], bundles["rtn"], "recovered bundle", "RTN bundle"))
    emit(lines, args.results)


if __name__ == "__main__":
    main()
