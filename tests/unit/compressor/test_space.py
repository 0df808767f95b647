import math

import pytest

from llmshrink import serde
from llmshrink.compressor.space import default_space, grid_step, load_space
from llmshrink.errors import UsageError
from llmshrink.spec import BaseShape

SMOL = BaseShape(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                 vocab_size=49152)
CPU = ("fp32", "w8a8", "w4g32a8", "w4g64a8", "w4g128a8", "w8g64a8")


def test_default_space_for_smollm2_builds_every_extreme():
    space = default_space(SMOL, CPU)
    assert space.formats == CPU and grid_step(("fp32", "w8a8")) == 1
    # w4g128a8 cannot take SmolLM2's 576-wide inputs (q/k/v, gate, up, lm_head) nor o_proj's 64..576
    # (one head is 64 wide); the MLP widths sit on a 128 grid (1536 = 12 x 128), so down_proj takes it
    assert space.hidden == (576,) and space.mlp[-1] == 1536  # the residual width is not searched by default
    assert all(m % 128 == 0 for m in space.mlp) and space.mlp[0] >= 384
    assert space.linear_formats("down_proj") == CPU
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "lm_head"):
        assert space.linear_formats(name) == tuple(f for f in CPU if f != "w4g128a8"), name
    assert space.fit_format("w4g128a8", "q_proj") == "w4g64a8"  # same bits and activations, nearest group
    assert space.fit_format("w4g128a8", "down_proj") == "w4g128a8"
    wide = default_space(SMOL, CPU, hidden_frac=0.5).hidden  # 128 does not divide 576: a 64 grid
    assert wide[-1] == 576 and wide[0] >= 288 and len(wide) > 2 and all(h % 64 == 0 for h in wide)
    assert space.kv_groups == (1, 2, 3) and space.heads_per_group == (1, 2, 3)
    assert space.min_layers == 18 and space.depth_search
    for fmt in space.formats:
        big, small = space.largest(fmt), space.smallest(fmt)
        big.validate(set(CPU))
        small.validate(set(CPU))
        assert len(big.kept_layers()) == 30 and len(small.kept_layers()) == 18
        assert big.layers[0].num_heads == 9 and small.layers[0].num_heads == 1
    assert serde.loads(serde.dumps(space)) == space
    d = space.decisions()
    expect = math.log10(d["hidden"] * (d["lm_head"] - 1)) + 30 * (  # w4g128a8 only for down_proj
        math.log10(2 * 3 * 3 * 1 * len(space.mlp)) + 6 * math.log10(len(CPU) - 1) + math.log10(len(CPU)))
    assert space.log10_size() == pytest.approx(expect)


def test_space_yaml_overrides_and_rejects_what_cannot_be_built(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("hidden: [448, 576]\nmlp: [768, 1536]\nmin_layers: 30\nformats: [w4g32a8]\n")
    space = load_space(f, SMOL, CPU)
    assert space.hidden == (448, 576) and space.mlp == (768, 1536) and not space.depth_search
    assert space.formats == space.lm_head_formats == ("w4g32a8",)
    cases = {
        "hidden: [500, 576]\nformats: [w4g32a8]\n": "no candidate format fits q_proj: its input widths \\[500, 576\\]",
        "formats: [w4g128a8]\n": "no candidate format fits q_proj",
        "formats: [w2g32]\n": "not a kernel of the target",
        "mlp: [1536, 768]\n": "ascending",
        "kv_groups: [1, 4]\n": "1..3",
        "min_layers: 0\n": "min_layers",
        "depth: 3\n": "unknown fields depth",
        "head_dim: [33, 64]\n": "even",
    }
    for text, match in cases.items():
        f.write_text(text)
        with pytest.raises(UsageError, match=match):
            load_space(f, SMOL, CPU)
    with pytest.raises(UsageError, match="No such"):
        load_space(tmp_path / "none.yaml", SMOL, CPU)


def test_a_space_expresses_the_specs_made_of_its_candidates_only():
    from dataclasses import replace

    from llmshrink.spec import SubnetSpec

    space = default_space(SMOL, ("fp32", "w4g32a8", "w4g32a8z", "w8g64a8"), search_formats=("w8g64a8", "w4g32a8"))
    assert space.expresses(space.largest("w4g32a8")) and space.expresses(space.smallest("w8g64a8"))
    assert not space.expresses(SubnetSpec.uniform(SMOL, "w4g32a8z"))  # a target format, not a search format
    spec = space.largest("w4g32a8")
    assert not space.expresses(replace(spec, lm_head="w4g32a8z"))
    odd = list(spec.layers)
    odd[3] = replace(odd[3], intermediate_size=1000)  # not a candidate width
    assert not space.expresses(replace(spec, layers=tuple(odd)))
    odd[3] = replace(odd[3], keep=False)  # a dropped block's widths do not matter
    assert space.expresses(replace(spec, layers=tuple(odd)))
