import pytest
import torch

from llmshrink.compressor.budget import fastest_reachable
from llmshrink.compressor.contenders import (
    MIXED,
    Contender,
    baselines,
    screen,
    screen_kd,
    search_start,
)
from llmshrink.compressor.importance import measure_importance
from llmshrink.compressor.materialize import materialize
from llmshrink.compressor.space import SearchSpace
from llmshrink.spec import SubnetSpec
from llmshrink.targets.predict import predict
from llmshrink.targets.profile import load_target


@pytest.fixture(scope="module")
def setup(tiny_hf, tiny_base, steady_table):
    table, yaml_path = steady_table
    target = load_target(str(yaml_path))
    space = SearchSpace(tiny_base, hidden=(32, 64), kv_groups=(1, 2), heads_per_group=(2,), head_dim=(16,),
                        mlp=(64, 96, 128), min_layers=2, formats=("w4g32a8", "fp32"),
                        lm_head_formats=("w4g32a8", "fp32")).validate()
    ids = torch.randint(3, 300, (6, 24), generator=torch.Generator().manual_seed(2))
    imp = measure_importance(tiny_hf, [ids[:3], ids[3:]])
    return space, target, target.default_workload, table, imp


def test_the_importance_baseline_fits_the_budget_in_the_fastest_format_by_width_and_depth(setup, tiny_base):
    space, target, wl, table, imp = setup
    fastest_fmt = min(space.formats, key=lambda f: predict(space.largest(f), target, wl, table=table).total_ms)
    floor, _ = fastest_reachable(space, target, wl, table)
    top = predict(space.largest(fastest_fmt), target, wl, table=table).total_ms
    budget = floor + 0.5 * (top - floor)
    found = baselines(space, target, wl, table, budget, imp)
    (h,) = [c for c in found if c.name == "importance"]
    assert h.predicted_ms <= budget and h.predicted_ms == pytest.approx(predict(h.spec, target, wl, table=table).total_ms)
    used = {f for i in h.spec.kept_layers() for f in h.spec.layers[i].precision.values()} | {h.spec.lm_head}
    assert used == {fastest_fmt}  # cut by width and depth, never by format
    assert h.spec != space.largest(fastest_fmt)
    # every uniform baseline is unpruned and under the budget
    for c in found:
        if c.name.startswith("uniform "):
            assert c.spec == SubnetSpec.uniform(tiny_base, c.name.split()[1]) and c.predicted_ms <= budget
    # a budget below what the fastest format alone reaches leaves the heuristic out rather than failing, and
    # so does one its unpruned model meets (that is a uniform model, not a heuristic)
    own_floor = predict(space.smallest(fastest_fmt), target, wl, table=table).total_ms
    assert all(c.name != "importance" for c in baselines(space, target, wl, table, own_floor / 2, imp))
    assert all(c.name != "importance" for c in baselines(space, target, wl, table, top, imp))


def test_screen_ranks_by_kl_and_resumes_without_rescoring(tiny_base):
    specs = {n: SubnetSpec.uniform(tiny_base, f) for n, f in (("search", "w4g32a8"), ("uniform fp32", "fp32"),
                                                               ("importance", "w4g32"))}
    pool = [Contender(n, s, 1.0, "") for n, s in specs.items()]
    kl = {"search": 0.3, "uniform fp32": 0.1, "importance": 0.3}
    built, saved = [], {}
    ranked = screen(pool, build=lambda c: built.append(c.name) or c.name, score=kl.__getitem__,
                    on_scored=saved.__setitem__)
    assert [c.name for c, _ in ranked] == ["uniform fp32", "search", "importance"]  # ties keep the given order
    assert built == ["search", "uniform fp32", "importance"] and saved == kl
    built.clear()
    again = screen(pool, build=lambda c: built.append(c.name) or c.name, score=kl.__getitem__,
                   done={"search": 0.3, "uniform fp32": 0.1})
    assert built == ["importance"] and again == ranked


def test_the_search_starts_from_mixed_precision_else_the_most_faithful_baseline_it_can_express(tiny_base):
    pool = [Contender(n, SubnetSpec.uniform(tiny_base, f), 1.0, "") for n, f in
            (("uniform fp32", "fp32"), ("uniform w4g32", "w4g32"), (MIXED, "w4g32a8"), ("importance", "w4g32a8"))]
    every = lambda s: True  # noqa: E731
    assert search_start(pool, every).name == MIXED  # though listed after two more faithful uniform models
    without = [c for c in pool if c.name != MIXED]
    assert search_start(without, every).name == "uniform fp32"
    # a space without fp32 cannot express the first: the next in order, not the mixed one it cannot either
    no_fp32_no_a8 = lambda s: s.lm_head == "w4g32"  # noqa: E731
    assert search_start(pool, no_fp32_no_a8).name == "uniform w4g32"
    assert search_start(pool, lambda s: False) is None


def test_screen_kd_is_zero_for_the_original_and_grows_with_coarser_weights(tiny_hf, tiny_base):
    rows = torch.randint(3, 300, (5, 16), generator=torch.Generator().manual_seed(4))
    original = materialize(tiny_hf, SubnetSpec.original(tiny_base))
    assert screen_kd(original, tiny_hf, rows, batch_size=2) == pytest.approx(0.0, abs=1e-5)
    w4 = screen_kd(materialize(tiny_hf, SubnetSpec.uniform(tiny_base, "w4g32a8"), quantizer="rtn"), tiny_hf, rows)
    w2 = screen_kd(materialize(tiny_hf, SubnetSpec.uniform(tiny_base, "w2g32a8"), quantizer="rtn"), tiny_hf, rows)
    assert 0 < w4 < w2


@pytest.fixture(scope="module")
def two_formats(setup, tiny_hf, tiny_base):
    """(space, the unpruned model in fp32, its sensitivity, uniform w8a8's and fp32's predicted ms, a budget
    half way between) for the mixed-precision contender's tests."""
    from llmshrink.compressor.sensitivity import measure_sensitivity

    _, target, wl, table, imp = setup
    # on the steady table's tiny shapes w8a8 is faster than fp32: a budget between them needs a mix
    space = SearchSpace(tiny_base, hidden=(64,), kv_groups=(2,), heads_per_group=(2,), head_dim=(16,), mlp=(128,),
                        min_layers=2, formats=("fp32", "w8a8"), lm_head_formats=("fp32", "w8a8")).validate()
    ids = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(5))
    full = imp.apply(space.largest("fp32"), choose_blocks=False)
    sens = measure_sensitivity(tiny_hf, full, space.formats, space.lm_head_formats, [ids[:2], ids[2:]])
    lo = predict(space.largest("w8a8"), target, wl, table=table).total_ms
    hi = predict(space.largest("fp32"), target, wl, table=table).total_ms
    assert lo < hi
    return space, full, sens, lo, hi, lo + 0.5 * (hi - lo)


def test_the_mixed_precision_contender_is_unpruned_under_the_budget_with_the_sensitive_linears_kept_wide(
        setup, two_formats, tiny_base):
    _, target, wl, table, imp = setup
    space, _, sens, lo, _, budget = two_formats
    found = baselines(space, target, wl, table, budget, imp, sensitivity=sens)
    (m,) = [c for c in found if c.name == "mixed precision"]
    assert m.predicted_ms <= budget and len(m.spec.kept_layers()) == tiny_base.num_layers
    assert m.spec.hidden_size == tiny_base.hidden_size
    assert all(ls.num_heads == tiny_base.num_heads and ls.intermediate_size == tiny_base.intermediate_size
               for ls in m.spec.layers)
    formats = {(i, n): f for i in m.spec.kept_layers() for n, f in m.spec.layers[i].precision.items()}
    formats[(-1, "lm_head")] = m.spec.lm_head
    assert set(formats.values()) == {"fp32", "w8a8"}  # mixed, not a uniform model
    # the linears left in fp32 are those 8-bit hurts most per millisecond: among linears of one shape (the same
    # millisecond saved), every fp32 one is at least as sensitive as every w8a8 one
    for name in ("q_proj", "down_proj"):
        wide = [sens.scores[(*k, "w8a8")] for k, f in formats.items() if f == "fp32" and k[1] == name]
        narrow = [sens.scores[(*k, "w8a8")] for k, f in formats.items() if f == "w8a8" and k[1] == name]
        if wide and narrow:
            assert min(wide) >= max(narrow), name
    # precision alone cannot reach a budget well below the fastest format's unpruned model: no mixed contender
    assert all(c.name != "mixed precision"
               for c in baselines(space, target, wl, table, lo * 0.9, imp, sensitivity=sens))
    # without a sensitivity, no mixed contender at all
    assert all(c.name != "mixed precision" for c in baselines(space, target, wl, table, budget, imp))


def test_when_one_linear_steps_stall_the_mixed_contender_steps_up_from_the_fastest_format(
        setup, two_formats, tiny_base, monkeypatch):
    """An adapted table prices q/k/v in one format as one fused call, so stepping one linear down can cost
    time and the greedy steps down stall over the budget (SmolLM2 at 0.85x int4). The contender is then the
    fastest format stepped up where the budget allows, not missing."""
    from llmshrink.compressor import sensitivity as sensitivity_mod
    from llmshrink.errors import InfeasibleBudgetError

    _, target, wl, table, imp = setup
    space, full, sens, lo, _, budget = two_formats

    def stalls(*args, **kwargs):
        raise InfeasibleBudgetError("the steps down stalled", "")

    monkeypatch.setattr(sensitivity_mod, "fit_to_budget", stalls)
    (m,) = [c for c in baselines(space, target, wl, table, budget, imp, sensitivity=sens) if c.name == MIXED]
    assert m.predicted_ms <= budget and len(m.spec.kept_layers()) == tiny_base.num_layers
    used = {f for ls in m.spec.layers for f in ls.precision.values()} | {m.spec.lm_head}
    assert used == {"fp32", "w8a8"}
    assert sens.error(m.spec) < sens.error(full.with_precision("w8a8"))  # stepped up from the fastest format
    # under the fastest format's own latency the floor does not fit either: still no contender
    assert all(c.name != MIXED for c in baselines(space, target, wl, table, lo * 0.9, imp, sensitivity=sens))


def test_reprice_puts_the_measured_excess_on_the_format_the_reference_does_not_use(setup, tiny_base):
    """Corrected, the table predicts the measured ratio exactly; only the blamed format's predictions move."""
    from dataclasses import replace

    from llmshrink.compressor.contenders import reprice

    _, target, wl, table, _ = setup
    ref = SubnetSpec.uniform(tiny_base, "w4g32a8")
    layers = list(ref.layers)
    layers[0] = replace(layers[0], precision={**layers[0].precision, "q_proj": "fp32", "gate_proj": "fp32"})
    spec = replace(ref, layers=tuple(layers))  # two fp32 linears, the rest the reference's format
    mine, theirs = (predict(s, target, wl, table=table).total_ms for s in (spec, ref))
    want = 1.3 * mine / theirs
    rp = reprice(table, target, wl, spec, ref, want)
    assert rp.fmt == "fp32" and rp.factor > 1 and "measured" in rp.note and rp.note in rp.table.provenance.notes
    assert predict(spec, target, wl, table=rp.table).total_ms / predict(ref, target, wl, table=rp.table).total_ms \
        == pytest.approx(want, rel=1e-6)
    assert predict(ref, target, wl, table=rp.table).total_ms == pytest.approx(theirs, rel=1e-9)  # untouched
    uniform_fp32 = SubnetSpec.uniform(tiny_base, "fp32")
    before = predict(uniform_fp32, target, wl, table=table).total_ms
    assert predict(uniform_fp32, target, wl, table=rp.table).total_ms > before  # every fp32 linear costs more
    assert predict(uniform_fp32, target, wl, table=table).total_ms == before  # the run's table is not changed
    assert reprice(table, target, wl, spec, ref, 0.9 * mine / theirs) is None  # over-priced: nothing to add
    assert reprice(table, target, wl, ref, ref, 2.0) is None  # no format of its own to blame
