"""A thin builder over ``onnx.helper`` that names nodes the onnxruntime-genai way.

Node names are ``/model/layers.{i}/attn/q_proj/MatMul``; a node's outputs are
``{name}/output_{k}``; initializers are named after the tensor they hold
(``model.layers.{i}.attn.q_proj.MatMul.weight_Q4``). Identical constant
tensors (rotary caches shared by layers) are stored once.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
MS_DOMAIN = "com.microsoft"


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs; :meth:`model` builds the ModelProto."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self._by_hash: dict[str, str] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []

    def const(self, name: str, array: np.ndarray, *, dedupe: bool = False) -> str:
        """Add an initializer (at least 1-D); with ``dedupe``, return an existing one holding the same bytes."""
        return self._initializer(name, np.ascontiguousarray(array), dedupe)

    def scalar(self, name: str, value: float, dtype, *, dedupe: bool = False) -> str:
        """Add a rank-0 initializer (``const`` would store shape [1]; Q/DQ read rank 0 as per-tensor)."""
        return self._initializer(name, np.array(value, dtype), dedupe)

    def _initializer(self, name: str, array: np.ndarray, dedupe: bool) -> str:
        if dedupe:
            key = hashlib.sha256(array.tobytes() + str((array.dtype, array.shape)).encode()).hexdigest()
            if key in self._by_hash:
                return self._by_hash[key]
            self._by_hash[key] = name
        if name in self.initializers:
            raise ValueError(f"initializer {name} added twice")
        self.initializers[name] = numpy_helper.from_array(array, name)
        return name

    def node(self, op: str, inputs: list[str], name: str, *, outputs: int | list[str] = 1,
             domain: str = "", **attrs) -> list[str]:
        """Add node ``name`` and return its output names (``{name}/output_{k}`` unless given)."""
        outs = [f"{name}/output_{k}" for k in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], name: str, **kw) -> str:
        """Add a single-output node; return its output name."""
        return self.node(op, inputs, name, **kw)[0]

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def model(self, *, producer: str = "llmshrink", doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  initializer=list(self.initializers.values()))
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              ir_version=10, producer_name=producer, doc_string=doc)
        return m


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
INT32 = TensorProto.INT32
