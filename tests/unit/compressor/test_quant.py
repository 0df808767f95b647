import numpy as np
import pytest
import torch

from llmshrink.compressor.quant import quantize_activation, quantize_weight
from llmshrink.formats import parse_format


@pytest.fixture
def w():
    g = torch.Generator().manual_seed(0)
    return torch.randn(48, 256, generator=g) * 0.05


@pytest.mark.parametrize("name,lo,hi", [("w4g32", -8, 7), ("w2g64", -2, 1), ("w8g128", -128, 127),
                                        ("w4g32z", 0, 15), ("w8a8", -127, 127)])
def test_codes_stay_in_range_and_dequantize_close(w, name, lo, hi):
    fmt = parse_format(name)
    q = quantize_weight(w, fmt)
    assert q.codes.dtype == torch.int16 and q.codes.shape == w.shape
    assert int(q.codes.min()) >= lo and int(q.codes.max()) <= hi
    rel = ((q.dequantize() - w).norm() / w.norm()).item()
    bound = {2: 0.6, 4: 0.15, 8: 0.01}[fmt.weight_bits]
    assert rel < bound, rel


def test_more_bits_less_error(w):
    errs = [(quantize_weight(w, parse_format(f"w{b}g32")).dequantize() - w).norm() for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]


def test_clip_search_never_worse_than_plain_absmax(w):
    fmt = parse_format("w4g32")
    q = quantize_weight(w, fmt)
    wg = w.view(48, -1, 32)
    s = wg.abs().amax(-1, keepdim=True) / 7
    plain = (torch.round(wg / s).clamp(-8, 7) * s).view_as(w)
    assert ((q.dequantize() - w) ** 2).sum() <= ((plain - w) ** 2).sum() + 1e-9


def test_int8_tensor_activation_matches_onnx_dynamic_quantize_linear():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = torch.randn(3, 5, 64) * 3 + 0.5
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x.numpy()})[0]
    ours = quantize_activation(x, parse_format("w8a8")).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    del onnx


def test_int8_block_activation_is_per_token_per_block():
    x = torch.zeros(2, 64)
    x[0, :32] = torch.linspace(-1, 1, 32)
    x[0, 32:] = 100.0  # a large block must not coarsen the other block
    y = quantize_activation(x, parse_format("w4g32a8"))
    assert torch.allclose(y[0, :32], x[0, :32], atol=1 / 127)
    assert torch.equal(y[1], x[1])


def test_int8_static_activation_uses_the_given_scale_and_saturates_like_quantize_linear():
    fmt = parse_format("w8a8s")
    assert fmt.act == "int8-static" and fmt.name == "w8a8s" and fmt.group_size is None
    x = torch.tensor([[0.0, 0.05, 0.26, -0.26, 20.0, -20.0]])
    y = quantize_activation(x, fmt, scale=0.1)
    # round half to even (0.5 -> 0, 2.6 -> 3), then int8 saturation at -128 and 127 (not a symmetric 127)
    assert torch.allclose(y, torch.tensor([[0.0, 0.0, 0.3, -0.3, 12.7, -12.8]]))
    # Without a scale (the search, before calibration) the tensor's own max calibration stands in for it.
    z = torch.randn(3, 64)
    s = float(torch.tensor(float(z.abs().max()) / 127).half().float())
    assert torch.equal(quantize_activation(z, fmt), torch.round(z / s).clamp(-128, 127) * s)


def test_an_even_importance_leaves_the_clip_search_unchanged_and_a_skewed_one_moves_it():
    import torch

    from llmshrink.compressor.quant import weight_grid
    from llmshrink.formats import parse_format

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    f = parse_format("w4g32")
    plain = weight_grid(w, f)
    assert torch.equal(weight_grid(w, f, importance=torch.full((64,), 3.0)).scales, plain.scales)
    skew = torch.ones(64)
    skew[::7] = 1e4  # a few columns whose errors dominate the output
    assert not torch.equal(weight_grid(w, f, importance=skew).scales, plain.scales)
