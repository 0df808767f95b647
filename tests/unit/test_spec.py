from dataclasses import replace

import pytest

from llmshrink.spec import BaseShape, LayerOrder, SpecError, SubnetSpec, random_spec

BASE = BaseShape(num_layers=4, hidden_size=128, num_heads=6, num_kv_heads=2, head_dim=32,
                 intermediate_size=256, vocab_size=300, tied_embeddings=True)


def test_original_and_uniform_round_trip():
    for spec in (SubnetSpec.original(BASE), SubnetSpec.uniform(BASE, "int4"),
                 random_spec(BASE, 3, formats=("fp32", "w4g32", "w8a8", "w2g64a8z"))):
        back = SubnetSpec.from_json(spec.to_json())
        assert back == spec and back.fingerprint() == spec.fingerprint()


def test_round_trip_with_orders():
    spec = SubnetSpec.original(BASE)
    order = LayerOrder.identity(BASE)
    order = replace(order, mlp=tuple(reversed(order.mlp)), kv_groups=(1, 0))
    spec = replace(spec, layers=(replace(spec.layers[0], order=order),) + spec.layers[1:],
                   hidden_order=tuple(reversed(range(128))))
    back = SubnetSpec.from_json(spec.to_json())
    assert back == spec and back.layers[0].order.kv_groups == (1, 0)


def test_fingerprint_changes_with_content_not_with_notes():
    a = SubnetSpec.original(BASE)
    assert a.fingerprint() == replace(a, model="elsewhere", notes={"x": "y"}).fingerprint()
    assert a.fingerprint() != a.with_precision("w4g32").fingerprint()
    assert a.fingerprint() != replace(a, hidden_size=96).fingerprint()


def test_random_spec_is_seeded_and_valid():
    assert random_spec(BASE, 7) == random_spec(BASE, 7)
    assert random_spec(BASE, 7) != random_spec(BASE, 8)
    for s in range(20):
        random_spec(BASE, s).validate()


def _layer0(spec, **kw):
    return replace(spec, layers=(replace(spec.layers[0], **kw),) + spec.layers[1:])


ORIG = SubnetSpec.original(BASE)


@pytest.mark.parametrize("spec,rule", [
    (_layer0(ORIG, num_heads=5), "heads-divisible"),
    (_layer0(ORIG, num_kv_heads=3, num_heads=6), "kv-heads-range"),
    (_layer0(ORIG, num_kv_heads=1, num_heads=4), "heads-per-group"),
    (_layer0(ORIG, head_dim=31), "head-dim"),
    (_layer0(ORIG, head_dim=64), "head-dim"),
    (_layer0(ORIG, intermediate_size=300), "mlp-range"),
    (replace(ORIG, hidden_size=200), "hidden-range"),
    (replace(ORIG, layers=tuple(replace(ls, keep=False) for ls in ORIG.layers)), "keep-one-layer"),
    (replace(ORIG, layers=ORIG.layers[:3]), "layer-count"),
    (_layer0(ORIG, precision={**ORIG.layers[0].precision, "q_proj": "w3g32"}), "known-format"),
    (_layer0(ORIG, precision={**ORIG.layers[0].precision, "q_proj": "int4"}), "canonical-format"),
    (_layer0(ORIG, precision={"q_proj": "fp32"}), "precision-keys"),
    (_layer0(ORIG.with_precision("w4g128"), intermediate_size=192), "group-divides-k"),
    (replace(ORIG, hidden_order=(0,) * 128), "hidden-order"),
    (replace(ORIG, embedding="w4g32a8"), "embedding-format"),
    (replace(ORIG, embedding="w2g32"), "embedding-format"),
])
def test_broken_rules_are_named(spec, rule):
    with pytest.raises(SpecError) as ei:
        spec.validate()
    assert ei.value.rule == rule and rule in str(ei.value)
    assert ei.value.exit_code == 2


def test_target_kernel_rule():
    spec = ORIG.with_precision("w4g32")
    spec.validate(allowed_formats={"w4g32", "fp32"})
    with pytest.raises(SpecError) as ei:
        spec.validate(allowed_formats={"fp32", "w8a8"})
    assert ei.value.rule == "target-kernel" and "w8a8" in ei.value.hint


def test_from_json_validates():
    bad = _layer0(ORIG, num_heads=5)
    with pytest.raises(SpecError):
        SubnetSpec.from_json(bad.to_json())


def test_hidden_channels_follow_order():
    spec = replace(ORIG, hidden_size=3, hidden_order=tuple(reversed(range(128))))
    assert spec.hidden_channels() == [125, 126, 127]
