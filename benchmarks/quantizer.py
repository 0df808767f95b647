"""Round-to-nearest vs GPTQ on one uniform spec of the default model, no recovery, side by side in one run.

For each quantizer, ``llmshrink export --spec S --quantizer Q`` builds the
ORT bundle (GPTQ on the run's self-generated calibration text; the export
checks the bundle against its torch reference and records the check in the
manifest), then ``llmshrink eval`` scores it as shipped (ONNX Runtime):
WikiText-2 test perplexity (first ``--ppl-tokens`` tokens, context 512,
stride 256) and ARC-Easy dev accuracy (all 570 questions). The fp32 original
is scored the same way for reference. Finally the GPTQ bundle is timed in
turn with the RTN bundle (``llmshrink validate --reference``): same graph,
other codes, so the measured ratio should be 1.

    python benchmarks/quantizer.py --data-dir ../shared/evaldata [--format w4g32a8] [--out runs/quantizer]
        [--results benchmarks/results/quantizer_cpu.txt]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from _cli import (  # benchmarks/ is on sys.path when a script in it runs
    emit,
    sh,
    timed_in_turn,
    uniform_args,
    uniform_setup,
)


def main() -> None:
    ap = uniform_args(__doc__)
    ap.add_argument("--out", default="runs/quantizer")
    ap.add_argument("--results", default=None, help="also write the table to this file")
    args = ap.parse_args()

    out = Path(args.out)
    tasks_dir, wiki, spec = uniform_setup(out, args.data_dir, args.model, args.format)
    rows = []
    for name, export_args in (("fp32 original", []), ("rtn", ["--spec", str(spec), "--quantizer", "rtn"]),
                              ("gptq", ["--spec", str(spec), "--quantizer", "gptq"])):
        bundle = out / name.split()[0]
        t0 = time.perf_counter()
        if not (bundle / "manifest.json").is_file():
            sh("export", "--model", args.model, *export_args, "--target", "cpu", "--out", str(bundle), "--json")
        export_s = time.perf_counter() - t0
        manifest = json.loads((bundle / "manifest.json").read_text())["_data"]
        res = json.loads(sh("eval", str(bundle), "--tasks", "arc_easy_local", "--include-path", str(tasks_dir),
                            "--ppl", wiki, "--max-tokens", str(args.ppl_tokens), "--context", "512", "--stride", "256",
                            "--json"))
        ppl = res["perplexity"][0]["ppl"]
        acc = next(t["metrics"]["acc"] for t in res["tasks"] if t["task"] == "arc_easy_local")
        parity = manifest.get("parity", {})
        rows.append((name, args.format if export_args else "fp32", manifest.get("quantizer") or "-", ppl, acc,
                     parity.get("top1_agreement"), parity.get("max_abs_diff"), export_s))
    lines = [f"$ python benchmarks/quantizer.py --data-dir {args.data_dir} --format {args.format} --out {args.out}",
             f"WikiText-2 test: first {args.ppl_tokens} tokens, context 512, stride 256; ARC-Easy dev: all 570 "
             "(acc); ORT bundles as shipped; parity: the export's check against the torch model (64 tokens)",
             "",
             f"{'model':<15}{'format':<10}{'quantizer':<11}{'ppl':>8}{'ARC-E acc':>11}{'parity top1':>13}"
             f"{'max|d|':>9}{'export s':>10}"]
    for name, fmt, q, ppl, acc, top1, diff, secs in rows:
        top1_s = f"{top1:.1%}" if top1 is not None else "-"
        diff_s = f"{diff:.3g}" if diff is not None else "-"
        lines.append(f"{name:<15}{fmt:<10}{q:<11}{ppl:>8.2f}{acc:>11.4f}{top1_s:>13}{diff_s:>9}{secs:>10.0f}")
    lines += ["", timed_in_turn(out / "gptq", out / "rtn", "GPTQ bundle", "RTN bundle")]
    emit(lines, args.results)


if __name__ == "__main__":
    main()
