from dataclasses import replace

import pytest

from llmshrink.compressor.budget import (
    MOVE_KINDS,
    _MovePricer,
    check_budget,
    fastest_reachable,
    fit_to_budget,
    grow_to_budget,
    moves,
    up_moves,
)
from llmshrink.compressor.space import SearchSpace
from llmshrink.errors import InfeasibleBudgetError
from llmshrink.spec import SubnetSpec
from llmshrink.targets.predict import predict
from llmshrink.targets.profile import load_target


@pytest.fixture(scope="module")
def setup(tiny_base, steady_table):
    table, yaml_path = steady_table
    target = load_target(str(yaml_path))
    space = SearchSpace(tiny_base, hidden=(32, 64), kv_groups=(1, 2), heads_per_group=(2,), head_dim=(16,),
                        mlp=(64, 96, 128), min_layers=2, formats=("fp32", "w4g32a8"),
                        lm_head_formats=("fp32", "w4g32a8")).validate()
    return space, target, target.default_workload, table


def test_every_move_stays_in_the_space_and_changes_one_thing(setup, tiny_base):
    space, *_ = setup
    spec = space.largest("fp32")
    seen = list(moves(spec, space))
    assert len({w for w, _ in seen}) == len(seen)
    for what, new in seen:
        new.validate()
        assert new != spec, what
    assert any(w.startswith("drop block") for w, _ in seen) and any("w4g32a8" in w for w, _ in seen)


def test_fit_to_budget_meets_the_budget_and_follows_the_preference(setup):
    space, target, wl, table = setup
    spec = space.largest("fp32")
    top = predict(spec, target, wl, table=table).total_ms
    fastest, _ = fastest_reachable(space, target, wl, table)
    assert fastest < top
    budget = fastest + 0.5 * (top - fastest)
    fitted, taken = fit_to_budget(spec, space, target, wl, table, budget)
    assert predict(fitted, target, wl, table=table).total_ms <= budget and taken
    # a preference that forbids dropping blocks: the fit finds its savings elsewhere
    no_drop_floor = min(predict(space._uniform(min, f, keep=4), target, wl, table=table).total_ms
                        for f in space.formats)
    budget2 = max(budget, 1.05 * no_drop_floor)
    keep_all = lambda s: -1000.0 * (len(s.layers) - len(s.kept_layers()))  # noqa: E731
    fitted2, taken2 = fit_to_budget(spec, space, target, wl, table, budget2, preference=keep_all)
    assert len(fitted2.kept_layers()) == len(spec.layers) and not any("drop" in m.what for m in taken2)
    assert predict(fitted2, target, wl, table=table).total_ms <= budget2


def test_a_budget_below_the_fastest_subnet_is_refused_with_the_floor(setup):
    space, target, wl, table = setup
    fastest, spec = fastest_reachable(space, target, wl, table)
    assert check_budget(space, target, wl, table, fastest * 1.01) == fastest
    with pytest.raises(InfeasibleBudgetError, match=f"{fastest:.2f} ms") as e:
        check_budget(space, target, wl, table, fastest * 0.5)
    assert e.value.exit_code == 3
    with pytest.raises(InfeasibleBudgetError):
        fit_to_budget(SubnetSpec.original(space.base), space, target, wl, table, fastest * 0.5)


def test_grow_to_budget_spends_what_is_left_and_follows_the_preference(setup):
    space, target, wl, table = setup
    fastest, small = fastest_reachable(space, target, wl, table)
    top = predict(space.largest("fp32"), target, wl, table=table).total_ms
    budget = fastest + 0.5 * (top - fastest)
    grown, taken = grow_to_budget(small, space, target, wl, table, budget, preference=lambda s: 0.0)
    ms = predict(grown, target, wl, table=table).total_ms
    assert taken and fastest < ms <= budget and taken[-1].latency_ms == pytest.approx(ms)
    # maximal: no single step up still fits
    assert all(predict(new, target, wl, table=table).total_ms > budget or
               predict(new, target, wl, table=table).total_ms <= ms + 1e-9 for _, new in up_moves(grown, space))
    # a preference against blocks: capacity goes to widths and bits first
    few_blocks = lambda s: -1000.0 * len(s.kept_layers())  # noqa: E731
    grown2, taken2 = grow_to_budget(small, space, target, wl, table, budget, preference=few_blocks)
    assert len(grown2.kept_layers()) == len(small.kept_layers()) and not any("keep block" in m.what for m in taken2)
    assert predict(grown2, target, wl, table=table).total_ms <= budget
    # nothing to spend: unchanged
    same, none = grow_to_budget(grown, space, target, wl, table, ms, preference=lambda s: 0.0)
    assert same == grown and none == []


def test_fit_to_budget_takes_a_ruled_out_move_only_when_nothing_else_fits(setup):
    space, target, wl, table = setup
    spec = space.largest("fp32")
    top = predict(spec, target, wl, table=table).total_ms
    fastest, _ = fastest_reachable(space, target, wl, table)
    budget = fastest + 0.5 * (top - fastest)
    # the search pruned every narrower candidate: each move is -inf to it (Supernet.log_prob)
    only_start = lambda s: 0.0 if s == spec else float("-inf")  # noqa: E731
    fitted, taken = fit_to_budget(spec, space, target, wl, table, budget, preference=only_start)
    assert predict(fitted, target, wl, table=table).total_ms <= budget and taken


def test_uniform_fits_are_the_unpruned_formats_under_the_budget_that_nothing_fitting_beats(setup, tiny_base):
    from llmshrink.compressor.budget import uniform_fits

    space, target, wl, table = setup
    ms = {f: predict(SubnetSpec.uniform(tiny_base, f), target, wl, table=table).total_ms
          for f in ("fp32", "w4g32", "w4g32a8", "w8a8")}
    top = max(ms.values())
    everything = uniform_fits(space, target, wl, table, top + 1, formats=("w4g32", "w4g32a8", "w8a8"))
    # w4g32 (float activations) is at least as faithful as w4g32a8 on every axis, so w4g32a8 adds nothing;
    # w8a8 (8-bit weights, per-tensor int8 activations) and w4g32 are not comparable: both stay, 8 bits first
    assert [f.spec.lm_head for f in everything] == ["w8a8", "w4g32"]
    budget = min(ms["w4g32"], ms["w8a8"]) - 1e-6
    if ms["w4g32a8"] <= budget:  # the faster, coarser format is the baseline once the finer ones no longer fit
        (only,) = uniform_fits(space, target, wl, table, budget, formats=("w4g32", "w4g32a8", "w8a8"))
        assert only.spec == SubnetSpec.uniform(tiny_base, "w4g32a8") and only.predicted_ms <= budget
    assert uniform_fits(space, target, wl, table, min(ms.values()) - 1e-6) == []
    assert uniform_fits(space, target, wl, table, top + 1, formats=("w4g32",), accepts=lambda s: False) == []


def test_grow_to_budget_moves_only_the_kinds_it_is_given(setup):
    space, target, wl, table = setup
    small = space.smallest("w4g32a8")
    top = predict(space.largest("w4g32a8"), target, wl, table=table).total_ms
    grown, taken = grow_to_budget(small, space, target, wl, table, top, preference=lambda s: 0.0,
                                  kinds=("width", "depth"))
    assert taken and predict(grown, target, wl, table=table).total_ms <= top
    assert {f for ls in grown.layers for f in ls.precision.values()} | {grown.lm_head} == {"w4g32a8"}


def test_a_grow_step_never_buys_a_coarser_format_and_takes_a_gain_that_costs_no_time(setup):
    """Table prices are not one per linear (fused q/k/v on an adapted cpu table; at these tiny shapes a 4-bit
    linear costs more than an fp32 one): a step up may cost no time, and a coarser format may cost more."""
    space, target, wl, table = setup
    top = predict(space.largest("fp32"), target, wl, table=table).total_ms
    coarse = space.largest("w4g32a8")
    assert predict(coarse, target, wl, table=table).total_ms > top  # this table, these shapes: 4 bits are slower
    # everything in fp32, time to spare: nothing to buy (a coarser format costing time is no step up)
    same, none = grow_to_budget(space.largest("fp32"), space, target, wl, table, top * 2, preference=lambda s: 0.0)
    assert none == [] and same == space.largest("fp32")
    # from 4 bits at its own latency, no time to spare: the steps to fp32 that save time gain, so they are taken
    fidelity = lambda s: -sum(f != "fp32" for ls in s.layers for f in ls.precision.values())  # noqa: E731
    budget = predict(coarse, target, wl, table=table).total_ms
    grown, taken = grow_to_budget(coarse, space, target, wl, table, budget, preference=fidelity,
                                  kinds=("precision",))
    assert taken and all(m.what.endswith("->fp32") and m.cost < 0 for m in taken)
    assert fidelity(grown) > fidelity(coarse) and predict(grown, target, wl, table=table).total_ms <= budget


@pytest.mark.parametrize("preference", [
    lambda s: 0.0,  # a search with no preference left
    None,  # no search at all
    "settled",  # a search that settled everything: every move ruled out
])
def test_the_fit_step_drops_blocks_in_importance_order_when_the_preference_cannot_tell(setup, tiny_base, preference):
    space, target, wl, table = setup
    spec = space.largest("w4g32a8")
    if preference == "settled":
        preference = lambda s: 0.0 if s == spec else float("-inf")  # noqa: E731
    influence = [0.1, 0.4, 0.3, 0.2][:tiny_base.num_layers]  # block 0 ranks last, block 1 first
    prior = lambda s: -sum(influence[i] for i, ls in enumerate(s.layers) if not ls.keep)  # noqa: E731
    one_block = predict(spec, target, wl, table=table).total_ms - predict(
        replace(spec, layers=(replace(spec.layers[0], keep=False), *spec.layers[1:])), target, wl,
        table=table).total_ms
    budget = predict(spec, target, wl, table=table).total_ms - 1.5 * one_block  # two blocks must go
    fitted, taken = fit_to_budget(spec, space, target, wl, table, budget, preference=preference, fallback=prior,
                                  kinds=("depth",))
    dropped = [i for i, ls in enumerate(fitted.layers) if not ls.keep]
    assert sorted(dropped) == [0, 3], [m.what for m in taken]
    # the same cuts among every kind of move: never a block the order ranks above one it keeps
    fitted, taken = fit_to_budget(spec, space, target, wl, table, budget, preference=preference, fallback=prior)
    assert predict(fitted, target, wl, table=table).total_ms <= budget
    dropped = {i for i, ls in enumerate(fitted.layers) if not ls.keep}
    assert all(influence[d] <= influence[k] for d in dropped for k in fitted.kept_layers())


def test_the_preference_overrules_the_importance_order_when_it_has_a_view(setup, tiny_base):
    space, target, wl, table = setup
    spec = space.largest("w4g32a8")
    influence = [0.1, 0.4, 0.3, 0.2][:tiny_base.num_layers]
    prior = lambda s: -sum(influence[i] for i, ls in enumerate(s.layers) if not ls.keep)  # noqa: E731
    # the search wants block 1 gone, whatever the importance order says
    wants_1_out = lambda s: sum(-5.0 if ls.keep != (i != 1) else 0.0 for i, ls in enumerate(s.layers))  # noqa: E731
    budget = predict(spec, target, wl, table=table).total_ms - 1e-3
    fitted, _ = fit_to_budget(spec, space, target, wl, table, budget, preference=wants_1_out, fallback=prior,
                              kinds=("depth",))
    assert [i for i, ls in enumerate(fitted.layers) if not ls.keep] == [1]


def test_with_a_block_order_depth_follows_it_whatever_the_preference(setup, tiny_base):
    """compress's joint fit passes the measured drop-cost order: a search that learnt to want an important block
    gone (SmolLM2's block 11) must not drop it while a less important one is kept, and blocks come back in order."""
    space, target, wl, table = setup
    spec = space.largest("w4g32a8")
    order = (1, 2, 3, 0)[:tiny_base.num_layers]  # most important first: block 0 is the cheapest to drop
    wants_1_out = lambda s: sum(-5.0 if ls.keep != (i != 1) else 0.0 for i, ls in enumerate(s.layers))  # noqa: E731
    budget = predict(spec, target, wl, table=table).total_ms - 1e-3
    fitted, taken = fit_to_budget(spec, space, target, wl, table, budget, preference=wants_1_out,
                                  kinds=("depth",), block_order=order)
    assert [i for i, ls in enumerate(fitted.layers) if not ls.keep] == [0], [m.what for m in taken]
    # among every kind of move, the kept blocks stay a prefix of the order
    two = replace(spec, layers=tuple(replace(ls, keep=i in (1, 2)) for i, ls in enumerate(spec.layers)))
    fitted, _ = fit_to_budget(spec, space, target, wl, table, predict(two, target, wl, table=table).total_ms,
                              preference=wants_1_out, block_order=order)
    kept = set(fitted.kept_layers())
    assert kept == set(order[:len(kept)])
    # growing back from the two least important blocks: the most important dropped block returns first
    low = replace(spec, layers=tuple(replace(ls, keep=i in (3, 0)) for i, ls in enumerate(spec.layers)))
    three = predict(replace(low, layers=tuple(replace(ls, keep=i != 2) for i, ls in enumerate(spec.layers))),
                    target, wl, table=table).total_ms
    wants_2_back = lambda s: 5.0 if s.layers[2].keep else 0.0  # noqa: E731
    grown, taken = grow_to_budget(low, space, target, wl, table, three, preference=wants_2_back, kinds=("depth",),
                                  block_order=order)
    assert [m.what for m in taken] == ["keep block 1"]


def test_moves_are_priced_as_if_each_were_predicted_afresh_after_every_step(setup):
    """The fit and grow steps keep a move's price until its layer, the hidden width or the lm_head changes:
    after any sequence of moves, every cached price must equal the latency and scores computed anew."""
    space, target, wl, table = setup
    weights = {"w4g32a8": 0.3, "fp32": 0.0}
    pref = lambda s: -sum((i + 1) * (0.01 * (128 - ls.intermediate_size) + 0.2 * (2 - ls.num_kv_heads)  # noqa: E731
                                     + sum(weights[f] for f in ls.precision.values())) if ls.keep else 5.0 * (i + 1)
                          for i, ls in enumerate(s.layers)) - 0.001 * (64 - s.hidden_size) * len(s.kept_layers())
    prior = lambda s: -sum(1.0 / (i + 1) for i, ls in enumerate(s.layers) if not ls.keep)  # noqa: E731
    pricer = _MovePricer(space, target, wl, table, pref, prior)
    spec = space.largest("fp32")
    now = pricer.scores(spec)
    for step in range(8):
        priced = list(pricer.moves(spec, now, -1, MOVE_KINDS))
        assert priced
        for m in priced:
            assert (m.ms, m.pref, m.prior) == pytest.approx(pricer.scores(m.spec), rel=1e-9, abs=1e-12), m.what
        # the hidden width first (it changes every layer's price), then moves spread over the layers
        pick = next((m for m in priced if m.what.startswith("hidden")), None) if step == 0 else \
            priced[(7 * step) % len(priced)]
        spec, now = pick.spec, pricer.scores(pick.spec)
