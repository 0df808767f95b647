"""Moves away from a search's start are measured before they settle (llmshrink.compressor.moves)."""

import pytest
import torch

from llmshrink.compressor.moves import MoveState, check_moves, moves_away
from llmshrink.compressor.search import SearchConfig, kd_loss, run_search
from llmshrink.compressor.space import SearchSpace
from llmshrink.compressor.supernet import Supernet


def _space(base):
    return SearchSpace(base, hidden=(32, 64), kv_groups=(1, 2), heads_per_group=(2,), head_dim=(16,),
                       mlp=(64, 96, 128), min_layers=2, formats=("fp32", "w4g32a8"),
                       lm_head_formats=("fp32", "w4g32a8")).validate()


@pytest.fixture(scope="module")
def rows(tiny_hf):
    ids = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        return ids, tiny_hf(input_ids=ids, use_cache=False).logits


def _started(tiny_hf, tiny_base):
    """A supernet sure of the widest, full-precision subnet (its start), with layer 0's MLP then moved to
    the narrowest width (a move that certainly costs KD and saves latency)."""
    net = Supernet(tiny_hf, _space(tiny_base))
    with torch.no_grad():
        for a in net.alpha.values():
            a.zero_()
            a[..., -1] = 3.0  # widest / keep / lm_head and linears: last format... see below
        net.alpha["prec"][..., 0] = 3.0  # formats ("fp32", "w4g32a8"): fp32 is the start
        net.alpha["prec"][..., 1] = 0.0
        net.alpha["lm_head"][0], net.alpha["lm_head"][1] = 3.0, 0.0
    state = MoveState(net.choice_indices(), [])
    with torch.no_grad():
        net.alpha["mlp"][0] = torch.tensor([6.0, 0.0, 3.0])
    return net, state


def test_a_move_that_costs_more_kd_than_its_saving_is_worth_is_undone_at_its_start(tiny_hf, tiny_base,
                                                                                   steady_table, rows):
    table, _ = steady_table
    from llmshrink.targets.workload import Workload

    net, state = _started(tiny_hf, tiny_base)
    assert moves_away(net, state) == [("mlp", (0,))]
    done = check_moves(net, state, moves_away(net, state), *rows, table=table, workload=Workload("decode", 1, 16),
                       price_per_ms=0.0, step=7, lead=3.0, loss=kd_loss)
    [c] = done
    assert c.decision == "layer 0 MLP size" and (c.start, c.to) == ("128", "64") and c.step == 7
    assert c.kd_with > c.kd_without and c.saved_ms > 0 and not c.accepted
    assert net.alive("mlp")[0].tolist() == [False, False, True]  # frozen at its start
    assert int(net.choice_indices()["mlp"][0]) == 2
    assert moves_away(net, state) == [] and state.checks == [c]


def test_a_move_whose_saving_pays_for_its_kd_stays_and_is_not_checked_again(tiny_hf, tiny_base, steady_table, rows):
    table, _ = steady_table
    from llmshrink.targets.workload import Workload

    net, state = _started(tiny_hf, tiny_base)
    kw = dict(table=table, workload=Workload("decode", 1, 16), step=3, lead=3.0, loss=kd_loss)
    [c] = check_moves(net, state, moves_away(net, state), *rows, price_per_ms=1e6, **kw)
    assert c.accepted and c.kd_with - c.kd_without <= c.price_per_ms * c.saved_ms
    assert net.alive("mlp")[0].all() and int(net.choice_indices()["mlp"][0]) == 0  # left as the search had it
    assert state.accepted(net.space, "mlp", (0,), 0) and moves_away(net, state) == []


def test_rows_of_a_dropped_block_are_not_moves(tiny_hf, tiny_base):
    net, state = _started(tiny_hf, tiny_base)
    with torch.no_grad():
        net.alpha["keep"][0] = torch.tensor([5.0, 0.0])  # block 0 out: its MLP width changes nothing
    assert moves_away(net, state) == [("keep", (0,))]


def test_the_prune_floor_never_drops_a_protected_start(tiny_hf, tiny_base):
    net, state = _started(tiny_hf, tiny_base)
    with torch.no_grad():
        net.alpha["mlp"][0] = torch.tensor([8.0, 0.0, 0.0])  # the start (index 2) is far below the floor
    net.settle(threshold=0.0, floor=0.2, protect=state.start)
    assert net.alive("mlp")[0].tolist() == [True, False, True]
    bare, _ = _started(tiny_hf, tiny_base)
    with torch.no_grad():
        bare.alpha["mlp"][0] = torch.tensor([8.0, 0.0, 0.0])
    bare.settle(threshold=0.0, floor=0.2)
    assert bare.alive("mlp")[0].tolist() == [True, False, False]


def test_a_search_hands_on_no_unmeasured_move_and_verify_rows_0_measures_none(tiny_hf, tiny_base, steady_table):
    table, _ = steady_table
    from llmshrink.targets.workload import Workload

    calib = torch.randint(3, 300, (16, 24), generator=torch.Generator().manual_seed(5))
    kw = dict(table=table, workload=Workload("decode", 1, 16), budget_ms=1e-3)
    cfg = dict(steps=6, batch_size=2, seq_len=24, weight_lr=0.0, arch_lr=0.5, settle_every=2, settle_after=2,
               entropy_threshold=0.9, lambda_latency=5.0)
    net = Supernet(tiny_hf, _space(tiny_base))
    res = run_search(net, tiny_hf, calib, config=SearchConfig(**cfg, verify_rows=2), **kw)
    assert res.moves, "a budget far below the subnet's latency must move something"
    state = MoveState({}, res.moves)
    start = Supernet(tiny_hf, _space(tiny_base))
    start.init_width_logits(SearchConfig().width_prior)
    if start.space.depth_search:
        start.init_keep_logits(SearchConfig().keep_prior)
    state.start = start.choice_indices()
    assert moves_away(net, state) == []  # every move left was measured and kept
    for c in res.moves:
        assert c.accepted == (c.kd_with - c.kd_without <= c.price_per_ms * c.saved_ms)
    off = run_search(Supernet(tiny_hf, _space(tiny_base)), tiny_hf, calib, config=SearchConfig(**cfg, verify_rows=0),
                     **kw)
    assert off.moves == []
