"""llmshrink's GPTQ against ONNX Runtime's on single layers of the default model: output error on held-out inputs.

ONNX Runtime ships GPTQ in ``onnxruntime.quantization`` (vendored from Intel
Neural Compressor, ``neural_compressor.weight_only.gptq_quantize``; it needs
``pip install onnx_ir``, which is not an llmshrink dependency). Each layer
below runs alone as a one-MatMul ONNX model: both quantizers see the same
calibration inputs (the layer's inputs on the run's self-generated
calibration rows, through the float model), and are scored on the layer's
inputs from the held-out rows: relative output error
``||X (W_q - W)^T||² / ||X W^T||²``. Round-to-nearest (llmshrink's grid) is
the baseline.

    python benchmarks/gptq_vs_ort.py [--format w4g32] [--layers 3,15,27]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

ACT_ORDER = True


class _Loader:
    """What ORT's GPTQ reads: an iterable of ``(inputs, label)`` with a ``batch_size``."""

    batch_size = 1

    def __init__(self, xs: list[np.ndarray]) -> None:
        self.xs = xs

    def __iter__(self):
        return iter(({"X": x[None]}, None) for x in self.xs)


def one_matmul(w: np.ndarray) -> onnx.ModelProto:
    """``Y = X @ W^T`` as an ONNX model (what ORT's quantizer rewrites to MatMulNBits)."""
    n, k = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="layer")], "one",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, None, n])],
        [numpy_helper.from_array(w.T.astype(np.float32).copy(), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def ort_gptq(w: np.ndarray, calib: list[np.ndarray], bits: int, group: int, sym: bool) -> onnx.ModelProto:
    from onnxruntime.quantization.neural_compressor.weight_only import gptq_quantize

    q = gptq_quantize(one_matmul(w), _Loader(calib), num_bits=bits, group_size=group,
                      scheme="sym" if sym else "asym", n_samples=len(calib), actorder=ACT_ORDER, percdamp=0.01)
    return q.model if hasattr(q, "model") else q


def ort_rtn(w: np.ndarray, bits: int, group: int, sym: bool) -> onnx.ModelProto:
    from onnxruntime.quantization.neural_compressor.weight_only import rtn_quantize

    q = rtn_quantize(one_matmul(w), num_bits=bits, group_size=group, scheme="sym" if sym else "asym")
    return q.model if hasattr(q, "model") else q


def run(model: onnx.ModelProto, xs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"X": x[None]})[0][0] for x in xs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="w4g32")
    ap.add_argument("--layers", default="3,15,27")
    args = ap.parse_args()

    from llmshrink.compressor.calibration_text import calibration_splits
    from llmshrink.compressor.config import CompressConfig
    from llmshrink.compressor.gptq import HessianAccumulator
    from llmshrink.compressor.quant import quantize_weight
    from llmshrink.formats import parse_format
    from llmshrink.models import load_model, load_tokenizer, resolve_model
    from llmshrink.models.load import fingerprint

    fmt = parse_format(args.format)
    src = resolve_model("smollm2-135m")
    hf, tok = load_model(src).float().eval(), load_tokenizer(src)
    splits = calibration_splits(CompressConfig(model="smollm2-135m", target="cpu", budgets_ms=(1.0,)), hf, tok,
                                fingerprint(src))
    print(f"$ python benchmarks/gptq_vs_ort.py --format {args.format} --layers {args.layers}")
    print(f"calibration: {tuple(splits.calib.shape)} self-generated rows; scored on {tuple(splits.eval.shape)} "
          "held-out rows; relative output error (lower is better)\n")
    print(f"{'layer':<28}{'RTN (ours)':>12}{'GPTQ (ours)':>13}{'RTN (ORT)':>12}{'GPTQ (ORT)':>12}")
    for i in map(int, args.layers.split(",")):
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            mod = hf.model.layers[i].get_submodule(name)
            seen: list[torch.Tensor] = []
            hook = mod.register_forward_pre_hook(lambda _m, a, seen=seen: seen.append(a[0].detach()))
            with torch.no_grad():
                for ids in (splits.calib, splits.eval):
                    for b in ids.split(8):
                        hf(input_ids=b)
            hook.remove()
            xs = torch.cat(seen)  # [rows, T, K]
            calib, held = xs[: len(splits.calib)], xs[len(splits.calib):]
            w = mod.weight.detach().float()
            acc = HessianAccumulator(w.shape[1])
            acc.add(calib)
            ref = held.reshape(-1, w.shape[1]) @ w.T
            x2 = held.reshape(-1, w.shape[1])

            def rel(wq: torch.Tensor, x2=x2, ref=ref, w=w) -> float:
                return float(((x2 @ (wq - w).T) ** 2).sum() / (ref**2).sum())

            ours_rtn = rel(quantize_weight(w, fmt).dequantize())
            ours = rel(quantize_weight(w, fmt, hessian=acc.hessian).dequantize())
            qm = ort_gptq(w.numpy(), [c.numpy() for c in calib], fmt.weight_bits, fmt.group_size, fmt.symmetric)
            y = torch.from_numpy(run(qm, held.numpy()))
            theirs = float(((y - ref) ** 2).sum() / (ref**2).sum())
            y = torch.from_numpy(run(ort_rtn(w.numpy(), fmt.weight_bits, fmt.group_size, fmt.symmetric), held.numpy()))
            theirs_rtn = float(((y - ref) ** 2).sum() / (ref**2).sum())
            print(f"{f'layers.{i}.{name}':<28}{ours_rtn:>12.3e}{ours:>13.3e}{theirs_rtn:>12.3e}{theirs:>12.3e}",
                  flush=True)


if __name__ == "__main__":
    main()
