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
    # w4g128a8 cannot take SmolLM2's 576-wide inputs, so it is left out by default
    assert "w4g128a8" not in space.formats and "w4g64a8" in space.formats
    step = grid_step(space.formats)
    assert step == 64 and grid_step(("fp32", "w8a8")) == 1
    assert space.hidden == (576,) and space.mlp[-1] == 1536  # the residual width is not searched by default
    assert all(m % step == 0 for m in space.mlp) and space.mlp[0] >= 384
    wide = default_space(SMOL, CPU, hidden_frac=0.5).hidden
    assert wide[-1] == 576 and wide[0] >= 288 and len(wide) > 2 and all(h % step == 0 for h in wide)
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
    expect = math.log10(d["hidden"] * d["lm_head"]) + 30 * (
        math.log10(2 * 3 * 3 * 1 * len(space.mlp)) + 7 * math.log10(len(space.formats)))
    assert space.log10_size() == pytest.approx(expect)


def test_space_yaml_overrides_and_rejects_what_cannot_be_built(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("hidden: [448, 576]\nmlp: [768, 1536]\nmin_layers: 30\nformats: [w4g32a8]\n")
    space = load_space(f, SMOL, CPU)
    assert space.hidden == (448, 576) and space.mlp == (768, 1536) and not space.depth_search
    assert space.formats == space.lm_head_formats == ("w4g32a8",)
    cases = {
        "hidden: [500, 576]\nformats: [w4g32a8]\n": "multiples of 32",
        "formats: [w4g128a8]\n": "multiples of 128",
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
