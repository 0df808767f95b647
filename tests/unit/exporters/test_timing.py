"""Timing two graphs in turn: the ratio must not move with a machine whose speed drifts."""

import types

import pytest

from llmshrink.exporters import timing
from llmshrink.targets.workload import parse_workload


class _FakeClock:
    """perf_counter/sleep on a clock only the fakes advance: the test controls every duration."""

    def __init__(self):
        self.t = 0.0

    def perf_counter(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_time_in_turn_interleaves_blocks_and_takes_the_median_pair_ratio(monkeypatch):
    clock = _FakeClock()
    order = []

    def speed():  # neighbours in 1-second spells: the machine runs 1x, 4x, 2x slower in turn
        return (1.0, 4.0, 2.0)[int(clock.t) % 3]

    def unit(decoder, workload, vocab_size, seed):
        def once():
            order.append(decoder.name)
            clock.t += decoder.cost_s * speed()
        return once

    monkeypatch.setattr(timing, "time", clock)
    monkeypatch.setattr(timing, "_timed_unit", unit)
    a = types.SimpleNamespace(name="a", cost_s=0.020, threads=None)  # twice the reference's cost
    b = types.SimpleNamespace(name="b", cost_s=0.010, threads=None)
    p = timing.time_in_turn(a, b, parse_workload("decode:ctx=16"), vocab_sizes=(10, 10), runs=40, blocks=8,
                            warmup=0, warmup_s=0.0)

    # Blocks of 5 runs, the order alternating per pair so a drift within a pair favours neither graph.
    timed = order  # no warm-up asked for
    blocks = [timed[i:i + 5] for i in range(0, len(timed), 5)]
    assert [blk[0] for blk in blocks] == ["a", "b", "b", "a"] * 4 and all(len(set(blk)) == 1 for blk in blocks)
    assert len(p.block_ratios) == 8
    # The run spans spells 4x apart (a pair straddling two spells is off), yet the median ratio is the graphs' own.
    assert p.first.p90_ms >= 3.9 * p.first.floor_ms
    assert p.ratio == pytest.approx(2.0)
    assert p.first.runs == p.second.runs == 40 and p.first.blocks == 8
    assert p.first.floor_ms == pytest.approx(20.0) and p.second.floor_ms == pytest.approx(10.0)
