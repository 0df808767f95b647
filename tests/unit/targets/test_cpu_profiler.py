import pytest

from llmshrink.targets.profilers.cpu import (
    CACHE_BYTES,
    MAX_CHAIN,
    MIN_CHAIN,
    fanout_count,
    time_attention,
    time_layer_glue,
    time_linear,
)


def test_fanout_covers_the_cache_within_bounds():
    from llmshrink.formats import parse_format

    for k, n, fmt in [(576, 1536, "fp32"), (576, 1536, "w4g32a8"), (64, 64, "w2g32"), (576, 49152, "fp32")]:
        c = fanout_count(k, n, fmt)
        assert MIN_CHAIN <= c <= MAX_CHAIN
        per = k * n * parse_format(fmt).bits_per_weight() / 8
        if MIN_CHAIN < c < MAX_CHAIN:  # the fewest copies whose weights exceed the cache
            assert (c - 1) * per < CACHE_BYTES <= c * per
    # fewer bits per weight need more copies to stream the same bytes
    assert fanout_count(576, 1536, "w4g32") > fanout_count(576, 1536, "fp32")


@pytest.mark.parametrize("fmt", ["fp32", "w4g32a8", "w8a8"])
def test_linear_timing_runs_and_scales_with_size(fmt, monkeypatch):
    import llmshrink.targets.profilers.cpu as cpu

    monkeypatch.setattr(cpu, "CACHE_BYTES", 1 << 20)  # small and fast for a unit test
    small = time_linear(64, 64, fmt, 1, runs=5, warmup=1)
    big = time_linear(512, 512, fmt, 1, runs=5, warmup=1)
    assert small.median_s > 0 and big.count >= MIN_CHAIN
    assert big.median_s > small.median_s


def test_attention_and_glue_timings_run():
    a = time_attention(4, 2, 16, 8, 1, layers=2, runs=3, warmup=1)
    g = time_layer_glue(64, 128, 1, layers=2, runs=3, warmup=1)
    assert a.median_s > 0 and g.median_s > 0 and a.count == 2
