"""Peak memory of the importance phase on the default model: the whole-model path against layer streaming.

Each path runs in its own fresh interpreter, one after the other, on the rows ``compress`` measures importance on
(its first ``n_calib`` calibration rows, in batches of 4, block drop costs on the first 4 batches):

* ``whole`` -- ``load_model`` then ``importance.measure_importance``: what ``compress`` does;
* ``streamed`` -- ``LazyModel`` + ``importance.measure_importance_streamed``: one decoder layer read from
  safetensors at a time, the block-drop branches carried along.

Peak RSS is the child's ``ru_maxrss``; the baseline is its RSS after importing torch and transformers and
reading the calibration rows, before any weight is loaded. "expected" is ``plan.importance_bytes`` (the formula
``llmshrink plan`` prints). The scores of the two paths are compared (every one equal; the hidden-channel sums,
added in another order, to 1e-12).

    python benchmarks/importance_streaming.py [--model smollm2-135m] [--rows 128]
        [--results benchmarks/results/importance_streaming_cpu.txt]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _cli import emit, peak_table, run_children

MODES = ("whole", "streamed")
SCORES = ("heads", "v_dims", "rope_pairs", "mlp", "hidden", "blocks")

CHILD = r"""
import json, resource, sys, time
import numpy as np
import torch
import transformers  # noqa: F401  (counted in the baseline, as the whole path imports it)
from llmshrink.models import resolve_model
mode, model, calib_path, out_path = sys.argv[1:5]
calib = torch.load(calib_path)
batches = [calib[i:i + 4] for i in range(0, len(calib), 4)]  # as compress batches them
src = resolve_model(model)
def rss_now():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
baseline = rss_now()
t0 = time.perf_counter()
if mode == "whole":
    from llmshrink.models import load_model
    from llmshrink.compressor.importance import measure_importance
    imp = measure_importance(load_model(src), batches)
else:
    from llmshrink.models.lazy import LazyModel
    from llmshrink.compressor.importance import measure_importance_streamed
    imp = measure_importance_streamed(LazyModel(src), batches)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
np.savez(out_path, **{k: getattr(imp, k) for k in ("heads", "v_dims", "rope_pairs", "mlp", "hidden", "blocks")})
print(json.dumps({"baseline": baseline, "peak": peak, "seconds": seconds}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=None, help="calibration rows (default: compress's n_calib)")
    ap.add_argument("--results", default=None)
    args = ap.parse_args()

    import numpy as np
    import torch

    from llmshrink.compressor.calibration_text import calibration_splits
    from llmshrink.compressor.config import CompressConfig
    from llmshrink.compressor.plan import ModelShape, importance_bytes
    from llmshrink.host import cpu_features, cpu_model
    from llmshrink.models import load_model, load_tokenizer, resolve_model
    from llmshrink.models.info import count_params
    from llmshrink.models.load import fingerprint, load_config
    from llmshrink.spec import BaseShape

    src = resolve_model(args.model)
    config = load_config(src)
    cfg = CompressConfig(model=src.describe(), target="cpu", budgets_ms=(1.0,))
    rows = args.rows or cfg.n_calib
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # compress's importance rows (the calibration text is cached after a first run)
        hf = load_model(src)
        calib = calibration_splits(cfg, hf, load_tokenizer(src), fingerprint(src)).calib[:rows]
        del hf
        seq = calib.shape[1]
        torch.save(calib, tmp / "calib.pt")
        res = run_children(CHILD, MODES, lambda m: [m, args.model, str(tmp / "calib.pt"), str(tmp / f"{m}.npz")])
        a, b = np.load(tmp / "whole.npz"), np.load(tmp / "streamed.npz")
        equal = all(np.array_equal(a[k], b[k]) for k in SCORES if k != "hidden") \
            and np.allclose(a["hidden"], b["hidden"], rtol=1e-12, atol=0)
    shape = ModelShape(BaseShape.from_config(config), count_params(config))
    expected = {m: importance_bytes(shape, rows, seq, 4, streamed=m == "streamed") for m in res}
    lines = [f"$ python benchmarks/importance_streaming.py --model {args.model} --rows {rows}",
             f"on {cpu_model()} ({', '.join(cpu_features())}); {torch.get_num_threads()} threads; importance "
             f"statistics and block drop costs on {rows} of compress's default calibration rows ({seq} tokens, "
             "batches of 4, drop costs on the first 4); each path in a fresh interpreter; peak = ru_maxrss, "
             "above = peak - RSS before any weight is loaded",
             ""]
    lines += peak_table(res, expected)
    above = {m: r["peak"] - r["baseline"] for m, r in res.items()}
    lines += ["",
              f"whole / streamed, above base: measured {above['whole'] / above['streamed']:.2f}x, expected "
              f"{expected['whole'] / expected['streamed']:.2f}x; time "
              f"{res['streamed']['seconds'] / res['whole']['seconds']:.2f}x",
              f"scores of both paths equal: {equal}"]
    emit(lines, args.results)
    if not equal:
        sys.exit("the streamed path's scores differ from the whole-model path's")


if __name__ == "__main__":
    main()
