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

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _cli import sh  # benchmarks/ is on sys.path when a script in it runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="../shared/evaldata (read-only; tasks are rendered from it)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--format", default="w4g32a8")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--out", default="runs/quantizer")
    ap.add_argument("--results", default=None, help="also write the table to this file")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks_dir = out / "tasks"
    if not (tasks_dir / "arc_easy_local.yaml").is_file():
        subprocess.run([sys.executable, str(Path(args.data_dir) / "render.py"), str(tasks_dir)], check=True)
    wiki = str(Path(args.data_dir) / "wikitext2" / "wiki.test.raw")
    spec = out / f"{args.format}.json"
    if not spec.is_file():
        sh("spec", "new", "--model", args.model, "--uniform", args.format, "--out", str(spec))
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
    # timed in turn both ways round (this bundle's blocks first, then the reference's): a shared VM drifts
    # within a round, and the order it drifts in favours one side
    ratios = []
    for a, b in (("gptq", "rtn"), ("rtn", "gptq")):
        v = json.loads(sh("validate", str(out / a), "--reference", str(out / b), "--target", "cpu", "--rounds", "7",
                          "--no-record", "--json", check=False))  # exit 4 (outside tolerance) still prints it
        ratios.append(v.get("_data", v))
    gptq_over_rtn = (ratios[0]["measured_ratio"] / ratios[1]["measured_ratio"]) ** 0.5
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
    wl = ratios[0].get("workload") or {}
    wl = wl.get("_data", wl)
    lines += ["", f"latency, GPTQ bundle / RTN bundle, timed in turn ({wl.get('phase')}, ctx {wl.get('context')}, "
              f"batch {wl.get('batch')}; 7 rounds each way): GPTQ first {ratios[0]['measured_ratio']:.3f}x, RTN first "
              f"1/{ratios[1]['measured_ratio']:.3f}x, geometric mean {gptq_over_rtn:.3f}x (predicted 1.000x: "
              "same graph, other codes)"]
    text = "\n".join(lines)
    print(text)
    if args.results:
        Path(args.results).write_text(text + "\n")


if __name__ == "__main__":
    main()
