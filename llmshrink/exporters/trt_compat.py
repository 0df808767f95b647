"""Static check: will TensorRT's ONNX parser accept this graph?

Walks every node, initializer and graph input/output and reports what the
parser rejects, citing the rule. The operator table is
``data/trt10_onnx_ops.json``, extracted from onnx-tensorrt's
``docs/operators.md`` (TensorRT 10.0); the quantization rules are the
parser's own checks in ``onnxOpImporters.cpp`` (QuantizeLinear /
DequantizeLinear: zero points must be zero, scales positive and constant,
blocked scales have the input's rank with one blocked axis, INT4 tensors
have an even last dimension). Opset 21 (blocked DequantizeLinear) needs a
TensorRT 10 release whose parser reads opset 21; current TensorRT parses up
to opset 25.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from llmshrink.errors import UsageError

MAX_OPSET = 25
# Element types TensorRT 10 takes (operators.md header); INT4/INT8/FP8 only as quantized weights.
TRT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32, TensorProto.INT64,
             TensorProto.INT8, TensorProto.INT4, TensorProto.UINT8, TensorProto.BOOL, TensorProto.FLOAT8E4M3FN}
_ONNX_TO_TABLE = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
                  TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8",
                  TensorProto.INT4: "INT4", TensorProto.BOOL: "BOOL", TensorProto.UINT8: "UINT8"}
# Inputs that operators.md says must be initializers / constants.
_CONST_INPUTS = {"Slice": (3,), "ReduceMean": (1,), "ReduceSum": (1,), "Squeeze": (1,), "Unsqueeze": (1,)}


@dataclass(frozen=True)
class Violation:
    """One thing TensorRT's parser would reject."""

    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}"


@cache
def operator_table() -> dict:
    """The TensorRT ONNX operator support table and its source."""
    text = resources.files("llmshrink.exporters").joinpath("data/trt10_onnx_ops.json").read_text()
    return json.loads(text)


def check_model(model: onnx.ModelProto) -> list[Violation]:
    """Every violation found in ``model`` (empty when TensorRT should parse it)."""
    table = operator_table()["operators"]
    out: list[Violation] = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > MAX_OPSET:
            out.append(Violation("<model>", "opset", f"opset {imp.version} > {MAX_OPSET}, the newest TensorRT parses"))
    inits = {i.name: i for i in model.graph.initializer}
    for t in model.graph.initializer:
        if t.data_type not in TRT_TYPES:
            out.append(Violation(t.name, "initializer", f"element type {TensorProto.DataType.Name(t.data_type)} is not a TensorRT type"))
    for vi in list(model.graph.input) + list(model.graph.output):
        et = vi.type.tensor_type.elem_type
        if et not in TRT_TYPES or et in (TensorProto.INT4, TensorProto.INT8):
            out.append(Violation(vi.name, "graph I/O", f"element type {TensorProto.DataType.Name(et)} is not allowed at the network boundary"))
    for node in model.graph.node:
        name = node.name or node.output[0]
        if node.domain not in ("", "ai.onnx"):
            out.append(Violation(name, node.op_type, f"custom domain {node.domain!r}: TensorRT's parser has no importer for it"))
            continue
        entry = table.get(node.op_type)
        if entry is None or not entry["supported"]:
            out.append(Violation(name, node.op_type, "not supported by TensorRT's ONNX parser (operators.md)"))
            continue
        for idx in _CONST_INPUTS.get(node.op_type, ()):
            if len(node.input) > idx and node.input[idx] and node.input[idx] not in inits:
                out.append(Violation(name, node.op_type, f"input {idx} must be an initializer (operators.md restriction)"))
        if node.op_type in ("DequantizeLinear", "QuantizeLinear"):
            out.extend(_check_qdq(node, name, inits))
    return out


def _check_qdq(node: onnx.NodeProto, name: str, inits: dict) -> list[Violation]:
    out = []
    scale = inits.get(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        return [Violation(name, node.op_type, "scale must be a constant (dynamic scales are not supported)")]
    s = numpy_helper.to_array(scale).astype(np.float32)
    if not (s > 0).all():
        out.append(Violation(name, node.op_type, "scale coefficients must all be positive"))
    if len(node.input) > 2 and node.input[2]:
        zp = inits.get(node.input[2])
        if zp is None or np.any(numpy_helper.to_array(zp) != 0):
            out.append(Violation(name, node.op_type, "zero point must be zero (symmetric quantization only)"))
    if node.op_type == "DequantizeLinear":
        x = inits.get(node.input[0])
        if x is None:
            return out  # activation Q/DQ: quantized tensor produced by QuantizeLinear
        if x.data_type not in (TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN):
            out.append(Violation(name, node.op_type, f"quantized type {TensorProto.DataType.Name(x.data_type)}; TensorRT takes INT8, INT4, FP8"))
        dims = list(x.dims)
        if s.ndim == len(dims) and s.size > 1:
            blocked = [d // sd for d, sd in zip(dims, s.shape, strict=True) if sd != d]
            if len(blocked) != 1:
                out.append(Violation(name, node.op_type, "blocked quantization needs exactly one blocked axis"))
            if x.data_type != TensorProto.INT4:
                out.append(Violation(name, node.op_type, "block quantization is for INT4 weights only"))
        elif s.ndim not in (0, 1) and s.size > 1:
            out.append(Violation(name, node.op_type, f"scale of rank {s.ndim} for a rank-{len(dims)} input"))
        if x.data_type == TensorProto.INT4 and dims and dims[-1] % 2:
            out.append(Violation(name, node.op_type, "INT4 tensors need an even last dimension"))
    return out


def assert_compatible(model: onnx.ModelProto) -> None:
    """Raise UsageError listing every violation (at most 20 shown)."""
    bad = check_model(model)
    if bad:
        shown = "\n  ".join(str(v) for v in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise UsageError(f"The graph is not TensorRT-compatible ({len(bad)} problems):\n  {shown}{more}",
                         f"Rules from {operator_table()['source']} and the parser's Q/DQ checks.")
