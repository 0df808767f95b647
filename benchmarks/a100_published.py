"""The analytical a100 table against published A100 measurements of real models.

The a100 target's YAML lists published batch-1 measurements (TensorRT-LLM,
LMDeploy TurboMind, gpt-fast), each with its source; this predicts each one
with the target's analytical roofline table and prints the error. It is the
only ground truth for A100 available without an A100. The roofline's
efficiency assumptions were set before this comparison and are not tuned to it.

    python benchmarks/a100_published.py [--target a100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="a100")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from llmshrink.targets import load_target
    from llmshrink.targets.published import check_published

    target = load_target(args.target)
    rows = check_published(target)
    print(f"# {' '.join(sys.argv)}")
    print(f"# target {target.name}: analytical roofline table; assumptions {target.roofline}")
    print(f"{'model':<12} {'format':<6} {'workload':<28} {'runtime':<44} {'published':>10} {'predicted':>10} {'error':>8}")
    for r in rows:
        print(f"{r['model']:<12} {r['format']:<6} {r['workload']:<28} {r['runtime'][:44]:<44} "
              f"{r['measured_ms']:>8.1f}ms {r['predicted_ms']:>8.1f}ms {r['error_pct']:>+7.1f}%")
    e = np.abs([r["error_pct"] for r in rows])
    print(f"\nmean |error| {e.mean():.1f}% over {len(rows)} published measurements (max {e.max():.1f}%)")
    for r in rows:
        print(f"  source: {r['source']}  ({r['metric']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
