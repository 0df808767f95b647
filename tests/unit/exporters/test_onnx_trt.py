import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from llmshrink.compressor.materialize import materialize
from llmshrink.errors import UsageError
from llmshrink.exporters.onnx_ort import build_ort_graph
from llmshrink.exporters.onnx_trt import _pack_int4, build_trt_graph
from llmshrink.exporters.ort_session import OrtDecoder
from llmshrink.exporters.parity import check_parity
from llmshrink.exporters.trt_compat import assert_compatible, check_model
from llmshrink.spec import SubnetSpec, random_spec

IDS = np.random.default_rng(7).integers(3, 300, 40)


@pytest.mark.parametrize("make", [
    lambda b: SubnetSpec.original(b),
    lambda b: SubnetSpec.uniform(b, "fp16"),
    lambda b: SubnetSpec.uniform(b, "w4g32", lm_head="fp16"),
    lambda b: random_spec(b, 4, formats=("fp16", "w4g32", "w4g64", "fp32")),
    lambda b: random_spec(b, 9, formats=("fp16", "w4g32")),
])
def test_trt_graph_is_compatible_and_matches_torch_in_ort(tiny_hf, tiny_base, make):
    cm = materialize(tiny_hf, make(tiny_base))
    graph = build_trt_graph(cm, max_length=64)
    assert check_model(graph) == []
    assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node)
    dec = OrtDecoder(graph.SerializeToString())
    assert not dec.shared_buffer and dec.kv_dtype == np.float16
    report = check_parity(cm, dec, IDS, fp16_activations=True)
    assert report.passed and report.max_abs_diff < 0.05, report


def test_w4a16_uses_blocked_int4_dequantize(tiny_hf, tiny_base):
    graph = build_trt_graph(materialize(tiny_hf, SubnetSpec.uniform(tiny_base, "w4g32")), max_length=32)
    inits = {i.name: i for i in graph.graph.initializer}
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 4 * 7 + 1
    w = inits[dq[0].input[0]]
    assert w.data_type == TensorProto.INT4
    attrs = {a.name: helper.get_attribute_value(a) for a in dq[0].attribute}
    assert attrs == {"axis": 0, "block_size": 32}


def test_int4_packing_is_twos_complement_low_nibble_first():
    assert _pack_int4(np.array([[-8, 7], [-1, 0]], np.int8)).tolist() == [0x78, 0x0F]


def test_ort_flavour_graph_is_rejected_with_reasons(tiny_hf, tiny_base):
    graph = build_ort_graph(materialize(tiny_hf, SubnetSpec.uniform(tiny_base, "w4g32a8")), max_length=32)
    bad = check_model(graph)
    ops = {v.op for v in bad}
    assert {"MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    assert all("custom domain" in v.reason for v in bad if v.op == "MatMulNBits")
    with pytest.raises(UsageError, match="not TensorRT-compatible"):
        assert_compatible(graph)


def _dq_model(zero_point: int = 0, scale: float = 0.5, block: bool = True, dtype=TensorProto.INT4, k: int = 64):
    x = helper.make_tensor("w", dtype, [k, 4], bytes(k * 4 // (2 if dtype == TensorProto.INT4 else 1)), raw=True)
    s = numpy_helper.from_array(np.full((k // 32, 4) if block else (4,), scale, np.float16), "s")
    inits, ins = [x, s], ["w", "s"]
    if zero_point:
        inits.append(helper.make_tensor("z", dtype, list(s.dims), bytes([zero_point] * max(1, int(np.prod(s.dims)) // (2 if dtype == TensorProto.INT4 else 1))), raw=True))
        ins.append("z")
    attrs = {"axis": 0, "block_size": 32} if block else {"axis": 1}
    node = helper.make_node("DequantizeLinear", ins, ["y"], name="dq", **attrs)
    g = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def test_qdq_rules():
    assert check_model(_dq_model()) == []
    assert any("zero point" in v.reason for v in check_model(_dq_model(zero_point=1)))
    assert any("positive" in v.reason for v in check_model(_dq_model(scale=-0.5)))
    assert any("INT4 weights only" in v.reason for v in check_model(_dq_model(dtype=TensorProto.INT8)))
    assert check_model(_dq_model(dtype=TensorProto.INT8, block=False)) == []


def test_unsupported_op_and_dtype():
    node = helper.make_node("Unique", ["a"], ["y"], name="unique")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.DOUBLE, [3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    bad = check_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))
    assert {(v.node, v.op) for v in bad} == {("unique", "Unique"), ("a", "graph I/O")}


def test_formats_without_trt_pattern_are_refused_before_building(tiny_hf, tiny_base):
    for fmt in ("w4g32a8", "w8a8", "w4g32z", "w8g32"):
        with pytest.raises(UsageError, match="no TensorRT pattern"):
            build_trt_graph(materialize(tiny_hf, SubnetSpec.uniform(tiny_base, fmt)))
    with pytest.raises(UsageError, match="static scales: w8a8s"):
        build_trt_graph(materialize(tiny_hf, SubnetSpec.uniform(tiny_base, "w8a8")))


CALIB = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("make", [
    lambda b: SubnetSpec.uniform(b, "w8a8s", lm_head="fp16"),
    lambda b: random_spec(b, 5, formats=("w8a8s", "w4g32", "fp16")),
])
def test_w8a8_is_int8_qdq_with_the_calibrated_scales_and_matches_torch(tiny_hf, tiny_base, make):
    cm = materialize(tiny_hf, make(tiny_base), calib=CALIB)
    graph = build_trt_graph(cm, max_length=64)
    assert check_model(graph) == []
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    q_nodes = {n.name: n for n in graph.graph.node if n.op_type == "QuantizeLinear"}
    static = [(j, name) for j, b in enumerate(cm.blocks) for name in ("q_proj", "k_proj", "v_proj", "o_proj",
              "gate_proj", "up_proj", "down_proj") if getattr(b, name).fmt.name == "w8a8s"]
    assert static and len(q_nodes) == len(static)
    for j, name in static:
        part = "attn" if name[0] in "qkvo" else "mlp"
        node = q_nodes[f"/model/layers.{j}/{part}/{name}/MatMul/InputQuantizeLinear"]
        scale, zp = inits[node.input[1]], inits[node.input[2]]
        assert scale.shape == () and scale.dtype == np.float16 and zp.dtype == np.int8 and zp == 0
        assert float(scale) == float(getattr(cm.blocks[j], name).act_scale)  # the torch reference's own scale
        wdq = next(n for n in graph.graph.node if n.name == f"/model/layers.{j}/{part}/{name}/MatMul/DequantizeLinear")
        w, ws = inits[wdq.input[0]], inits[wdq.input[1]]
        assert w.dtype == np.int8 and w.shape == (getattr(cm.blocks[j], name).in_features, ws.shape[0])
        assert {a.name: helper.get_attribute_value(a) for a in wdq.attribute} == {"axis": 1}
    report = check_parity(cm, OrtDecoder(graph.SerializeToString()), IDS, fp16_activations=True)
    assert report.passed and report.top1_agreement >= 0.9, report


def test_w8a8s_is_refused_by_the_ort_flavour(tiny_hf, tiny_base):
    cm = materialize(tiny_hf, SubnetSpec.uniform(tiny_base, "w8a8s"), calib=CALIB)
    with pytest.raises(UsageError, match="TensorRT pattern; the ort flavour has none"):
        build_ort_graph(cm, max_length=32)


def test_static_int8_parity_is_judged_against_the_references_own_fp16_stability(tiny_hf, tiny_base):
    from llmshrink.exporters.parity import STATIC_RULE

    cm = materialize(tiny_hf, SubnetSpec.uniform(tiny_base, "w8a8s", lm_head="fp16"), calib=CALIB)
    graph = build_trt_graph(cm, max_length=64)
    good = check_parity(cm, OrtDecoder(graph.SerializeToString()), IDS, fp16_activations=True)
    assert good.rule == STATIC_RULE and good.passed and 0 < good.reference_stability <= 1, good
    # A graph whose outputs are wrong (here: logits shifted along the vocabulary) fails, whatever the floor.
    dec = OrtDecoder(graph.SerializeToString())

    class Shifted:
        def forward(self, ids, past=None):
            logits, present = dec.forward(ids, past)
            return np.roll(logits, 7, axis=-1), present

    bad = check_parity(cm, Shifted(), IDS, fp16_activations=True)
    assert not bad.passed and bad.top1_in_top5 < 0.5, bad
