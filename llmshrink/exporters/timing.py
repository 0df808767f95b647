"""Measure a Workload on a built decoder: warm-up, timed runs, median and p90.

What is timed is the runtime call(s) the workload names, on seeded random
token ids (latency of a dense decoder does not depend on which tokens):
one decode step with ``context`` tokens already cached, one prefill of
``context`` tokens, or a prefill plus ``new_tokens`` decode steps.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import numpy as np

from llmshrink import serde
from llmshrink.targets.workload import Workload

DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3
# Warm-up is also timed: on this class of VM the first ~100 decode steps of a
# fresh session run ~1.5x slower (allocator growth, page first-touch, thread
# pool settling), so a count of warm-up runs alone measures a transient.
DEFAULT_WARMUP_S = 1.0
# Timed runs are taken in blocks with short pauses between them, and the
# fastest block median is reported as the *floor* beside the overall median.
# On a shared machine, neighbours' memory traffic comes in spells of seconds
# that lift a median by up to 30 %; the floor (the machine's uncontended
# speed) repeats within a few percent, and it is what latency tables and
# `validate` compare. On a dedicated device the two agree.
DEFAULT_BLOCKS = 8
BLOCK_PAUSE_S = 0.05


def floor_of(times_s, blocks: int) -> float:
    """Fastest median among ``blocks`` consecutive blocks of ``times_s`` (seconds in, seconds out)."""
    chunks = [c for c in np.array_split(np.asarray(times_s, dtype=np.float64), max(1, min(blocks, len(times_s)))) if len(c)]
    return float(min(np.median(c) for c in chunks))


@serde.serializable("LatencyMeasurement")
@dataclass(frozen=True)
class LatencyMeasurement:
    """One measured latency, with everything needed to say what it means."""

    workload: Workload
    median_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    runs: int
    warmup: int
    threads: int | None
    runtime: str
    runtime_version: str
    host: str
    floor_ms: float | None = None  # fastest block median (see DEFAULT_BLOCKS)
    blocks: int = 1

    @property
    def reference_ms(self) -> float:
        """What predictions are compared with: the floor when measured in blocks, else the median."""
        return self.floor_ms if self.floor_ms is not None else self.median_ms

    def summary(self) -> str:
        floor = f", floor {self.floor_ms:.2f}" if self.floor_ms is not None else ""
        return (f"{self.median_ms:.2f} ms median (p90 {self.p90_ms:.2f}{floor}, n={self.runs}) — "
                f"{self.workload.describe()}, {self.runtime} {self.runtime_version}, {self.threads or 'default'} threads")


def summarize(times_s: list[float], workload: Workload, *, warmup: int, threads: int | None,
              runtime: str, runtime_version: str, blocks: int = 1) -> LatencyMeasurement:
    """Turn per-run seconds into a :class:`LatencyMeasurement` (milliseconds)."""
    from llmshrink.host import cpu_model

    ms = np.asarray(times_s) * 1e3
    return LatencyMeasurement(
        workload=workload, median_ms=float(np.median(ms)), p90_ms=float(np.percentile(ms, 90)),
        mean_ms=float(ms.mean()), std_ms=float(ms.std()), runs=len(ms), warmup=warmup, threads=threads,
        runtime=runtime, runtime_version=runtime_version, host=f"{cpu_model()} ({platform.machine()})",
        floor_ms=floor_of(times_s, blocks) * 1e3, blocks=blocks,
    )


def warm_up(once, runs: int, seconds: float) -> None:
    """Call ``once`` at least ``runs`` times and for at least ``seconds``."""
    t_end = time.perf_counter() + seconds
    n = 0
    while n < runs or time.perf_counter() < t_end:
        once()
        n += 1


def time_decoder(decoder, workload: Workload, *, vocab_size: int, runs: int = DEFAULT_RUNS,
                 warmup: int = DEFAULT_WARMUP, warmup_s: float = DEFAULT_WARMUP_S, blocks: int = DEFAULT_BLOCKS,
                 seed: int = 0) -> LatencyMeasurement:
    """Time ``workload`` on an :class:`~llmshrink.exporters.ort_session.OrtDecoder`.

    Uses the path generation uses: the shared-buffer
    :class:`~llmshrink.exporters.ort_session.KVSession` for ort-flavour graphs,
    functional calls with a growing cache for trt-flavour graphs.
    """
    import onnxruntime as ort

    once = _timed_unit(decoder, workload, vocab_size, seed)
    warm_up(once, warmup, warmup_s)
    times = timed_blocks(once, runs, blocks)
    return summarize(times, workload, warmup=warmup, threads=decoder.threads,
                     runtime="onnxruntime-cpu", runtime_version=ort.__version__, blocks=min(blocks, runs))


@dataclass(frozen=True)
class PairedTiming:
    """Two decoders timed in turn, block by block (see :func:`time_in_turn`)."""

    first: LatencyMeasurement
    second: LatencyMeasurement
    block_ratios: tuple[float, ...]  # per block pair: median of first's block / median of second's block

    @property
    def ratio(self) -> float:
        """Median over block pairs of first/second: what the two graphs' speeds compare as."""
        return float(np.median(self.block_ratios))


def time_in_turn(first, second, workload: Workload, *, vocab_sizes: tuple[int, int], runs: int = DEFAULT_RUNS,
                 warmup: int = DEFAULT_WARMUP, warmup_s: float = DEFAULT_WARMUP_S, blocks: int = DEFAULT_BLOCKS,
                 seed: int = 0) -> PairedTiming:
    """Time ``workload`` on two decoders with their blocks of runs interleaved.

    Block k of one decoder runs right beside block k of the other (order
    alternating, first-second then second-first, so a drift within a pair
    favours neither), and the ratio is the median over block pairs. On a
    machine whose speed swings in spells of seconds, two graphs timed a
    block apart see the same neighbours; timed one after the other (each
    ``runs`` long) they do not, and their ratio moves by tens of percent.
    Each decoder's own :class:`LatencyMeasurement` is returned as well.
    """
    import onnxruntime as ort

    onces = [_timed_unit(d, workload, v, seed) for d, v in zip((first, second), vocab_sizes, strict=True)]
    for once in onces:
        warm_up(once, warmup, warmup_s)
    n = max(1, min(blocks, runs))
    times: tuple[list[list[float]], list[list[float]]] = ([], [])
    for k, chunk in enumerate(np.array_split(np.arange(runs), n)):
        for i in ((0, 1) if k % 2 == 0 else (1, 0)):
            time.sleep(BLOCK_PAUSE_S)
            times[i].append(timed_blocks(onces[i], len(chunk), 1))
    ratios = tuple(float(np.median(a) / np.median(b)) for a, b in zip(*times, strict=True))
    first_m, second_m = (
        summarize([t for blk in ts for t in blk], workload, warmup=warmup, threads=d.threads,
                  runtime="onnxruntime-cpu", runtime_version=ort.__version__, blocks=n)
        for ts, d in zip(times, (first, second), strict=True))
    return PairedTiming(first=first_m, second=second_m, block_ratios=ratios)


def _timed_unit(decoder, workload: Workload, vocab_size: int, seed: int):
    """The callable one timed run makes, on seeded random token ids (see :func:`time_decoder`)."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, vocab_size, size=(workload.batch, workload.context), dtype=np.int64)
    step = rng.integers(0, vocab_size, size=(workload.batch, 1), dtype=np.int64)
    run = _shared_buffer_run if decoder.shared_buffer else _growing_cache_run
    return run(decoder, workload, prompt, step)


def timed_blocks(once, runs: int, blocks: int) -> list[float]:
    """Seconds of ``runs`` calls of ``once``, in ``blocks`` blocks with a short pause between them."""
    times: list[float] = []
    for chunk in np.array_split(np.arange(runs), max(1, min(blocks, runs))):
        if times:
            time.sleep(BLOCK_PAUSE_S)
        for _ in chunk:
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
    return times


def _shared_buffer_run(decoder, workload: Workload, prompt, step):
    """One timed unit on a KVSession (ort flavour): the path generation uses (logits not copied)."""
    kv = decoder.kv_session(workload.context + workload.new_tokens + 1, batch=workload.batch)
    # A prompt only needs its last row of logits (time to first token).
    if workload.phase == "decode":
        kv.step(prompt, last_only=True, copy=False)

        def once() -> None:
            kv.rewind(workload.context)  # the same context length every run
            kv.step(step, copy=False)
    elif workload.phase == "prefill":
        def once() -> None:
            kv.rewind(0)
            kv.step(prompt, last_only=True, copy=False)
    else:
        def once() -> None:
            kv.rewind(0)
            kv.step(prompt, last_only=True, copy=False)
            for _ in range(workload.new_tokens):
                kv.step(step, copy=False)
    return once


def _growing_cache_run(decoder, workload: Workload, prompt, step):
    """One timed unit with functional calls (trt-flavour graphs run in ONNX Runtime)."""
    if workload.phase == "decode":
        _, cache = decoder.forward(prompt)

        def once() -> None:
            decoder.forward(step, cache)
    elif workload.phase == "prefill":
        def once() -> None:
            decoder.forward(prompt)
    else:
        def once() -> None:
            _, past = decoder.forward(prompt)
            for _ in range(workload.new_tokens):
                _, past = decoder.forward(step, past)
    return once
