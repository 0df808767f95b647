"""The Python API: compress under several latency budgets, then read the result object.

    python examples/python_api.py                       # SmolLM2-135M on this CPU, budgets 4 and 6 ms
    python examples/python_api.py --latency 5 --steps 40 --recovery-steps 40 --out runs/api

``llmshrink.compress`` is what ``llmshrink compress`` runs: one call per job, a run directory on
disk (resumable with ``resume=True``), and a :class:`~llmshrink.compressor.pipeline.CompressResult`
back, whose ``record.candidates`` hold per budget the bundle, predicted and measured latency and
the validation verdict.
"""

from __future__ import annotations

import argparse

import llmshrink
from llmshrink.api import generate_text, open_bundle


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--latency", type=float, nargs="+", default=[4.0, 6.0], help="budgets in ms")
    ap.add_argument("--steps", type=int, default=None, help="search steps (default: the library's)")
    ap.add_argument("--recovery-steps", type=int, default=None)
    ap.add_argument("--space", default=None, help="a search-space YAML")
    ap.add_argument("--out", default="runs/python-api")
    ap.add_argument("--prompt", default="What is the capital of France?")
    args = ap.parse_args(argv)

    result = llmshrink.compress(args.model, target=args.target, latency_ms=args.latency, out=args.out,
                                steps=args.steps, recovery_steps=args.recovery_steps, space=args.space,
                                resume=False)
    print(f"run directory: {result.run_dir}\nreport: {result.report}")
    print(f"{'budget':>8} {'predicted':>10} {'measured':>10}  verdict  bundle")
    for c in result.record.candidates:
        measured = f"{c.measured_ms:.2f} ms" if c.measured_ms is not None else "not here"
        verdict = {True: "PASS", False: "FAIL", None: "build on device"}[c.validation_passed]
        print(f"{c.budget_ms:>6g}ms {c.predicted_ms:>7.2f} ms {measured:>10}  {verdict:7}  {result.run_dir / c.bundle}")

    # The fastest candidate answers a question (ONNX Runtime, from the bundle on disk).
    fastest = min(result.record.candidates, key=lambda c: c.budget_ms)
    bundle = open_bundle(result.run_dir / fastest.bundle)  # checks every file's sha256 first
    print(args.prompt, "->", "".join(generate_text(bundle, args.prompt, max_new_tokens=24)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
