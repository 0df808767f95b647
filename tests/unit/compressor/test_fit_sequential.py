"""The sequential strategy's extraction (``pipeline.fit_sequential``): architecture first, then formats."""

from dataclasses import replace

import numpy as np

from llmshrink.compressor.importance import Importance
from llmshrink.compressor.pipeline import fit_sequential
from llmshrink.compressor.sensitivity import HEAD, Sensitivity
from llmshrink.compressor.space import SearchSpace
from llmshrink.compressor.supernet import Supernet
from llmshrink.spec import LINEARS
from llmshrink.targets.predict import predict
from llmshrink.targets.profile import load_target

FORMATS = ("fp32", "w8g32a8", "w4g32a8")


def _table():
    # the shipped cpu table, by path: deterministic (see test_sensitivity for why not table_for)
    from llmshrink.targets.adapt import builtin_table_path
    from llmshrink.targets.table import load_table

    return load_table(builtin_table_path(load_target("cpu").table))


def test_blocks_go_by_importance_in_the_fastest_format_before_formats_are_assigned(tiny_hf, tiny_base):
    target, table = load_target("cpu"), _table()
    wl = target.default_workload
    # one width per dimension: the architecture can only move by depth
    space = SearchSpace(tiny_base, hidden=(64,), kv_groups=(2,), heads_per_group=(2,), head_dim=(16,), mlp=(128,),
                        min_layers=1, formats=FORMATS, lm_head_formats=FORMATS).validate()
    ms = lambda s: predict(s, target, wl, table=table).total_ms  # noqa: E731
    # the fastest format at this (tiny, extrapolated) shape, and the other integer one
    q = min(FORMATS, key=lambda f: ms(space.largest(f)))
    (other,) = set(FORMATS) - {"fp32", q}
    n = tiny_base.num_layers
    rng = np.random.default_rng(0)
    blocks = np.array([3.0, 1.0, 2.0, 4.0])[:n]  # block 3 matters most, block 1 least
    imp = Importance(tiny_base, rng.random((n, tiny_base.num_heads)), rng.random((n, tiny_base.head_dim)),
                     rng.random((n, tiny_base.head_dim // 2)), rng.random((n, tiny_base.intermediate_size)),
                     rng.random(tiny_base.hidden_size), blocks, 0)
    fp32 = replace(space, formats=("fp32",), lm_head_formats=("fp32",))
    net = Supernet(tiny_hf, fp32, imp, latency_formats={k: q for k in (*LINEARS, "lm_head")})
    net.init_from_spec(fp32.largest("fp32"), 3.0)  # the search kept everything: its argmax overshoots
    argmax = net.argmax_spec()
    assert len(argmax.kept_layers()) == n
    # the most important block is also the most sensitive to quantization: a sensitivity sum that may drop
    # blocks gains most by dropping it (its error terms vanish), which is what precision-first did
    err = {"fp32": 0.0, other: 0.01, q: 0.1}
    sens = Sensitivity({**{(i, nm, f): e * (10 if i == 3 else 1) for i in range(n) for nm in LINEARS
                           for f, e in err.items()}, **{(HEAD, "lm_head", f): e for f, e in err.items()}})
    one_less = replace(space.largest(q), layers=tuple(replace(ls, keep=i != 1)
                                                      for i, ls in enumerate(space.largest(q).layers)))
    budget = 0.5 * (ms(one_less) + ms(space.largest(q)))  # one block must go, even all in the fastest format
    assert ms(argmax.with_precision(q)) > budget

    seen = []
    spec, moves = fit_sequential(argmax, net, imp, space, target, wl, table, budget,
                                 lambda s: seen.append(s) or sens)
    assert ms(spec) <= budget
    assert spec.kept_layers() == [0, 2, 3]  # the least important block went, the most sensitive stayed
    # sensitivity was measured on the fitted architecture, and the format step took precision moves only
    (arch,) = seen
    assert arch.kept_layers() == spec.kept_layers()
    assert [(ls.keep, ls.num_heads, ls.intermediate_size) for ls in arch.layers] == \
        [(ls.keep, ls.num_heads, ls.intermediate_size) for ls in spec.layers]
    kinds = ["depth" if "block" in m.what else "precision" for m in moves]
    assert "depth" in kinds and kinds == sorted(kinds)  # every depth move before any precision move
