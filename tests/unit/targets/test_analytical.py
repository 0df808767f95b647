import pytest

from llmshrink.spec import BaseShape, SubnetSpec
from llmshrink.targets import load_target
from llmshrink.targets.analytical import roofline_table
from llmshrink.targets.predict import predict
from llmshrink.targets.published import check_published
from llmshrink.targets.workload import parse_workload

LLAMA2_7B = BaseShape(32, 4096, 32, 32, 128, 11008, 32000, False)


def test_a100_table_is_analytical_and_cites_its_numbers():
    t = load_target("a100")
    table = roofline_table(t)
    assert table.kind == "analytical" and "max(bytes" in table.provenance.formula
    assert table.provenance.sources == t.sources and table.provenance.datasheet["memory_bandwidth_gbps"] == 2039
    spec = SubnetSpec.uniform(LLAMA2_7B, "fp16")
    p = predict(spec, t, parse_workload("decode:ctx=256"))
    assert p.table_kind == "analytical" and set(p.coverage) == {"analytical"}
    assert "analytical" in p.summary()


def test_decode_is_bandwidth_bound_on_the_roofline():
    t = load_target("a100")
    spec = SubnetSpec.uniform(LLAMA2_7B, "fp16", lm_head="fp16")
    weights = 2 * (32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32000)
    floor_ms = weights / (2039e9 * t.roofline["memory_efficiency"]) * 1e3
    p = predict(spec, t, parse_workload("decode:ctx=16")).total_ms
    assert floor_ms < p < floor_ms * 1.2
    int4 = predict(SubnetSpec.uniform(LLAMA2_7B, "w4g32", lm_head="fp16"), t, parse_workload("decode:ctx=16")).total_ms
    assert int4 < p / 2.5  # ~4.5 bits per weight instead of 16


def test_published_a100_checks_are_predicted_with_their_errors():
    rows = check_published(load_target("a100"))
    trt = [r for r in rows if r["runtime"].startswith("TensorRT")]
    assert len(trt) >= 3 and all(r["source"].startswith("https://") for r in rows)
    for r in rows:
        assert r["error_pct"] == pytest.approx((r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] * 100)
        assert abs(r["error_pct"]) < 50, r  # a roofline should land within 2x of real engines
