"""Peak memory of GPTQ on the default model: the whole-model path against layer streaming from safetensors.

Each path runs in its own fresh interpreter, one after the other, on the same calibration rows:

* ``whole`` -- ``load_model`` then ``materialize(..., quantizer="gptq")``: what ``compress`` does, and ``export
  --layer-streaming off``;
* ``streamed`` -- ``LazyModel`` + ``streamed.materialize_streamed``: one decoder layer read from disk at a time,
  the quantized model kept (what ``export`` does by default);
* ``codes`` -- ``LazyModel`` + ``streamed.gptq_streamed``: the same, keeping the codes only.

Peak RSS is the child's ``ru_maxrss``; the baseline is its RSS after importing torch and transformers and
reading the calibration rows, before any weight is loaded. "expected" is ``plan.gptq_bytes`` (the formula
``llmshrink plan`` prints), for the same rows. The codes of the two paths are compared (they must be equal).

    python benchmarks/gptq_streaming.py [--model smollm2-135m] [--format w4g32a8] [--rows 128]
        [--results benchmarks/results/gptq_streaming_cpu.txt]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _cli import emit, peak_table, run_children

MODES = ("whole", "streamed", "codes")

CHILD = r"""
import json, resource, sys, time
import torch
import transformers  # noqa: F401  (counted in the baseline, as the whole path imports it)
from llmshrink.models import resolve_model, load_tokenizer
from llmshrink.models.load import load_config
from llmshrink.spec import BaseShape, SubnetSpec
mode, model, fmt, calib_path, out_path = sys.argv[1:6]
calib = torch.load(calib_path)
src = resolve_model(model)
base = BaseShape.from_config(load_config(src))
spec = SubnetSpec.uniform(base, fmt, lm_head=fmt, model=src.describe())
def rss_now():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
baseline = rss_now()
t0 = time.perf_counter()
if mode in ("whole", "streamed"):
    from llmshrink.compressor.model import QuantLinear
    if mode == "whole":
        from llmshrink.models import load_model
        from llmshrink.compressor.materialize import materialize
        cm = materialize(load_model(src), spec, calib=calib, quantizer="gptq")
    else:
        from llmshrink.models.lazy import LazyModel
        from llmshrink.compressor.streamed import materialize_streamed
        cm = materialize_streamed(LazyModel(src), spec, calib=calib, quantizer="gptq")
    codes = {n: m.quantized.codes for n, m in cm.named_modules()
             if isinstance(m, QuantLinear) and m.quantized is not None and n != "embedding"}
else:
    from llmshrink.models.lazy import LazyModel
    from llmshrink.compressor.streamed import gptq_streamed
    codes = {n: q.codes for n, q in gptq_streamed(LazyModel(src), spec, calib).items()}
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
torch.save(codes, out_path)
print(json.dumps({"baseline": baseline, "peak": peak, "seconds": seconds}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--format", default="w4g32a8")
    ap.add_argument("--rows", type=int, default=128, help="calibration rows of 128 tokens")
    ap.add_argument("--results", default=None)
    args = ap.parse_args()

    import torch

    from llmshrink.compressor.calibration_text import calibration_splits
    from llmshrink.compressor.config import CompressConfig
    from llmshrink.compressor.plan import ModelShape, gptq_bytes
    from llmshrink.host import cpu_features, cpu_model
    from llmshrink.models import load_model, load_tokenizer, resolve_model
    from llmshrink.models.info import count_params
    from llmshrink.models.load import fingerprint, load_config
    from llmshrink.spec import BaseShape

    src = resolve_model(args.model)
    config = load_config(src)
    seq = 128
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the first rows of the calibration text compress quantizes on (cached after a first run)
        hf = load_model(src)
        cfg = CompressConfig(model=src.describe(), target="cpu", budgets_ms=(1.0,))
        calib = calibration_splits(cfg, hf, load_tokenizer(src), fingerprint(src)).calib[:args.rows, :seq]
        del hf
        torch.save(calib, tmp / "calib.pt")
        res = run_children(CHILD, MODES, lambda m: [m, args.model, args.format, str(tmp / "calib.pt"), str(tmp / f"{m}.pt")])
        a = torch.load(tmp / "whole.pt")
        equal = all(set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
                    for b in (torch.load(tmp / f"{m}.pt") for m in MODES[1:]))
    shape = ModelShape(BaseShape.from_config(config), count_params(config))
    expected = {m: gptq_bytes(shape, args.rows, seq, 4, streamed=m != "whole", codes_only=m == "codes") for m in res}
    lines = [f"$ python benchmarks/gptq_streaming.py --model {args.model} --format {args.format} --rows {args.rows}",
             f"on {cpu_model()} ({', '.join(cpu_features())}); {torch.get_num_threads()} threads; uniform "
             f"{args.format} (lm_head too), GPTQ on the first {args.rows} of compress's default calibration rows ({seq} tokens); each path in a "
             "fresh interpreter; peak = ru_maxrss, above = peak - RSS before any weight is loaded",
             ""]
    lines += peak_table(res, expected)
    above = {m: r["peak"] - r["baseline"] for m, r in res.items()}
    lines.append("")
    for m in MODES[1:]:
        lines.append(f"whole / {m}, above base: measured {above['whole'] / above[m]:.2f}x, expected "
                     f"{expected['whole'] / expected[m]:.2f}x; time {res[m]['seconds'] / res['whole']['seconds']:.2f}x")
    lines.append(f"codes of every path equal to the whole model's: {equal}")
    emit(lines, args.results)
    if not equal:
        sys.exit("a streamed path's codes differ from the whole-model path's")


if __name__ == "__main__":
    main()
