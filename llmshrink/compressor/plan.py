"""``llmshrink plan``: what a ``compress`` run would face, from the model's config alone (no weights).

A plan answers, in seconds and before anything large is downloaded or loaded:

* the search space's size (log10 of the distinct subnets) and how many decisions it has;
* the target's predicted latency for the original model (the spec ``targets predict --model`` prices:
  the unpruned model in the target's first format) and for the fastest subnet the space reaches, and
  whether the budget is feasible;
* for every torch phase of ``compress``, the peak memory per device (and on the host, where a GPU
  run keeps its teacher targets and calibration text) and a rough time on the given hardware.

Memory and time are *estimates from formulas*, each stated in :attr:`Plan.assumptions`; nothing here is
measured on the planned hardware except, for the CPU, this machine's own matmul throughput. The formulas
follow what the phases hold (module by module below) with the run's own defaults
(:class:`~.config.CompressConfig`), so a changed default changes the plan. ``compress`` consults the same
plan before loading weights and refuses a run whose phase cannot fit (:class:`InsufficientMemoryError`).

Several devices (``devices > 1``, ``torchrun --nproc-per-node N``): every rank holds what one process holds,
and the training phases split their rows (data parallel), except the search when it is sharded
(:func:`search_mode`; ``compress --shard``): FSDP then shards the supernet's weights and residuals, and a
device holds its ``1/N`` share plus the layer being gathered, after building the supernet whole with one
layer's residuals at a time (:meth:`.supernet.Supernet.freeze_weights`). GPTQ and export run on rank 0.
Where the search would not fit, it may also recompute its blocks (``compress --recompute``): its peak then
holds one sampled forward's block at a time instead of a model-sized effective weight per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from llmshrink import serde
from llmshrink.compressor.config import CompressConfig
from llmshrink.spec import BaseShape
from llmshrink.units import human_bytes

GiB = 1024**3

# Achieved fraction of a GPU's dense bf16 tensor peak in our training steps (KD on batches of 4 x 128 tokens:
# small GEMMs, so below the 40-50 % MFU of large pretraining runs). An assumption, stated in every plan.
GPU_TRAIN_MFU = 0.3
# Autoregressive sampling of the calibration text is memory-bound: each decode step reads every weight.
GPU_MEMORY_EFFICIENCY = 0.8
# On the CPU, what a recovery step achieves relative to this machine's fp32 matmul rate (1024 x 1024, torch's
# threads). Measured on a 2-core Zen 4 with AVX-512 BF16 (2026-12-01): sgemm 0.178 TFLOP/s; a recovery step of
# SmolLM2-135M (4 x 128 tokens: teacher forward, student forward and backward, bf16 autocast) 3.23 s
# (benchmarks/results/recovery_step_cpu.txt) = 0.174 TFLOP/s by these formulas, ~1.0x; a CPU without native
# bf16 trains in fp32 and achieves less, so the plan assumes 0.9x.
CPU_TRAIN_EFFICIENCY = 0.9
# ... and what sampling the calibration text achieves: ~10 min for ~1,040 rows of 128 tokens there (a run from
# an empty cache against one with the text cached), 0.061 TFLOP/s, ~0.34x.
CPU_DECODE_EFFICIENCY = 0.3
# A phase fits when its estimate is at most this share of the memory: the rest is for what the formulas do not
# count (allocator caching and fragmentation, the CUDA context, the interpreter and libraries).
FIT_FRACTION = 0.9
DEVICE_COUNTS = (1, 2, 4, 8, 16, 32, 64)  # device counts a plan tries when one device is not enough


@serde.serializable("Hardware")
@dataclass(frozen=True)
class Hardware:
    """What the torch phases would run on: ``devices`` identical devices and their host."""

    kind: str  # "cpu" or "cuda"
    name: str
    devices: int
    memory_bytes: int  # per device
    host_memory_bytes: int | None  # the machine's RAM (a CPU run's device memory is this same RAM); None: unknown
    dtype: str  # "bf16" or "fp32": weights and activations of the torch phases
    train_tflops: float  # achieved dense throughput per device for training and forward passes
    fp64_tflops: float  # per device, for GPTQ's Hessian sums (float64 so long calibration sets do not drift)
    decode_tflops: float  # effective per device for sampling the calibration text
    memory_gbps: float | None  # per device; None where unknown (CPU: folded into decode_tflops)
    source: str  # where these numbers come from

    @property
    def bytes_per_value(self) -> int:
        return 2 if self.dtype == "bf16" else 4


@serde.serializable("PhaseEstimate")
@dataclass(frozen=True)
class PhaseEstimate:
    """One phase's peak memory and rough time."""

    phase: str
    device_bytes: int  # peak per device
    host_bytes: int  # peak host RAM besides the device's own (0 on a CPU run: it is all one memory)
    seconds: float
    fits: bool
    holds: str  # what dominates the memory, in words


@serde.serializable("Plan")
@dataclass(frozen=True)
class Plan:
    """What a ``compress`` run would face (see module docstring)."""

    model: str
    target: str
    workload: str
    params: int
    space_log10: float
    decisions: int
    original_format: str
    original_ms: float
    fastest_ms: float
    budget_ms: float | None
    budget_note: str
    hardware: Hardware
    phases: tuple[PhaseEstimate, ...]
    assumptions: tuple[str, ...] = field(default_factory=tuple)
    table_kind: str = ""
    # the fewest devices like these on which every phase fits (None: not even 64; GPTQ and export do not shard)
    min_devices: int | None = None
    # the search's samples a step that count needs (compress --search-samples; None: the run's own suffice)
    min_devices_samples: int | None = None

    @property
    def feasible(self) -> bool | None:
        """Whether the budget is at or above the fastest reachable subnet (None without a budget)."""
        return None if self.budget_ms is None else self.budget_ms >= self.fastest_ms

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.phases)

    @property
    def total_seconds(self) -> float:
        return sum(p.seconds for p in self.phases)


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts and widths the formulas read."""

    base: BaseShape
    params: int

    @property
    def block_params(self) -> int:
        b = self.base
        attn = b.hidden_size * b.head_dim * (2 * b.num_heads + 2 * b.num_kv_heads)
        return attn + 3 * b.hidden_size * b.intermediate_size + 2 * b.hidden_size

    @property
    def matmul_params(self) -> int:
        """Weights a token's forward multiplies by: every block's linears and the lm_head (not the lookup)."""
        b = self.base
        return b.num_layers * (self.block_params - 2 * b.hidden_size) + b.vocab_size * b.hidden_size

    def forward_flops(self, tokens: int, ctx: int) -> float:
        """Multiply-adds x 2 of a forward over ``tokens`` tokens of ``ctx``-token causal sequences."""
        b = self.base
        attention = 2 * b.num_layers * ctx * b.num_heads * b.head_dim  # QK^T and AV, causal: ctx/2 keys each
        return 2.0 * tokens * self.matmul_params + tokens * attention

    def activation_bytes(self, tokens: int, ctx: int, value_bytes: int) -> int:
        """What a training forward keeps for its backward, all blocks (no recomputation).

        Per token and block: the norms' inputs and outputs, q/k/v, the attention output, the MLP's gate,
        up, activation and product (Korthikanti et al. 2022's count adapted to SwiGLU and GQA), plus the
        attention probabilities (heads x ctx) where the kernel materializes them (eager attention does).
        """
        b = self.base
        per_token = (6 * b.hidden_size + 2 * b.num_kv_heads * b.head_dim + b.num_heads * b.head_dim
                     + 4 * b.intermediate_size + 2 * b.num_heads * ctx)
        return tokens * b.num_layers * per_token * value_bytes

    def logits_bytes(self, tokens: int) -> int:
        """float32 logits, their log-softmax and its gradient: three ``tokens x vocab`` tensors."""
        return 3 * tokens * self.base.vocab_size * 4


def gptq_bytes(shape: ModelShape, rows: int, seq: int, value_bytes: int, *, streamed: bool = False,
               codes_only: bool = False) -> int:
    """Peak bytes of GPTQ on ``rows`` calibration rows of ``seq`` tokens (:mod:`.sequential`), all linears integer.

    Whole-model path (``materialize`` then ``gptq_quantize``): the loaded model, and the
    :class:`~.model.CompressedModel` being built: a float copy whose linears become their dequantized weight
    plus int16 codes (``value_bytes + 2`` a weight), with the embedding's own copy. Layer-streamed
    (``materialize_streamed``): that quantized model as it grows and the embedding (``codes_only``,
    ``gptq_streamed``: the int16 codes made so far, no embedding), one decoder layer three times over (as
    loaded, sliced, quantized), and the lm_head read from disk. Both: the calibration hidden states of one block (residual
    stream, normed input, MLP hidden; float32), a float64 Hessian with its Cholesky factors, and GPTQ's
    working copies of the matrix being quantized (~6 float32 copies: weights, codes, the RTN candidate,
    two dequantized errors; the lm_head's is the largest).
    """
    b = shape.base
    vh = b.vocab_size * b.hidden_size
    block_linears = shape.block_params - 2 * b.hidden_size
    states = rows * seq * (2 * b.hidden_size + b.intermediate_size) * 4
    hessian = max(b.hidden_size, b.intermediate_size) ** 2 * (8 + 3 * 4)
    work = 6 * 4 * max(vh, b.hidden_size * b.intermediate_size)
    linears = b.num_layers * block_linears + vh  # the blocks' and the lm_head's
    if streamed:
        kept = 2 * linears if codes_only else (value_bytes + 2) * linears + value_bytes * vh
        held = kept + 3 * (value_bytes + 2) * block_linears + 2 * 4 * vh
    else:
        held = shape.params * value_bytes + (value_bytes + 2) * linears + value_bytes * vh
    return int(held + states + hessian + work)


# compress's importance phase: batches of 4 rows, block drop costs on the first 4 (importance.DROP_BATCHES; plan
# stays torch-free, so the numbers are restated here)
IMPORTANCE_BATCH, IMPORTANCE_DROP_BATCHES = 4, 4


def importance_bytes(shape: ModelShape, rows: int, seq: int, value_bytes: int, *, streamed: bool = False,
                     batch: int = IMPORTANCE_BATCH, drop_batches: int = IMPORTANCE_DROP_BATCHES) -> int:
    """Peak bytes of the importance phase on ``rows`` calibration rows of ``seq`` tokens in batches of ``batch``
    (:func:`.importance.measure_importance`; ``streamed``: :func:`.importance.measure_importance_streamed`).

    Both: each block's output on the first ``drop_batches`` batches (recorded, or the streamed path's branches),
    the teacher's float32 log-probabilities (whole: on all of them; streamed: on one batch at a time), and one
    forward's logits work (logits, log-softmax, KL). Whole: the loaded model. Streamed: one decoder layer, the
    embedding's or the lm_head's matrix, and every batch's hidden states.
    """
    b = shape.base
    tokens = batch * seq
    drop = min(drop_batches, -(-rows // batch)) * tokens
    teacher = (tokens if streamed else drop) * b.vocab_size * 4
    common = b.num_layers * drop * b.hidden_size * 4 + teacher + shape.logits_bytes(tokens) \
        + tokens * b.intermediate_size * 4
    if streamed:
        held = (shape.block_params + b.vocab_size * b.hidden_size) * value_bytes + rows * seq * b.hidden_size * 4
    else:
        held = shape.params * value_bytes
    return int(held + common)


@dataclass(frozen=True)
class SearchMode:
    """How the search holds its supernet: sharded over the processes (FSDP) and/or recomputing its blocks in
    per-sample backwards (:func:`.search.train_step`)."""

    sharded: bool = False
    recompute: bool = False


def search_memory(shape: ModelShape, config: CompressConfig, hw: Hardware, *, int_formats: int,
                  search_formats: int | None = None, sharded: bool = False,
                  recompute: bool = False) -> tuple[int, int]:
    """(device bytes, host bytes) per rank of the search phase, unsharded or sharded over ``hw.devices``,
    with or without recomputation.

    What the code holds (:class:`.supernet.Supernet`): the original (the teacher, in the device's dtype),
    the supernet's fp32 copy of the weights, one fp32 residual per offered search format (fp32 because the
    search prices rounding errors as small as bf16's own), activations and logits of the rank's share of a
    step; on the host the teacher's float16 targets and, for the joint search with a calibrating quantizer,
    one layer's dequantized weights per integer format (:meth:`.Supernet.use_quantized` reads them a layer at a
    time from the saved models). Sharded: the supernet is built whole, then each layer's residuals are made and the layer
    sharded before the next (peak: the weights plus one layer's residuals), then a device holds its share
    and gathers one layer (weights and residuals) at a time.

    Each sampled forward keeps every linear's effective (fake-quantized) fp32 weight for the backward: without
    recomputation, a model-sized copy per sample of the rank's until the step's backward. Recomputing, the
    samples' backwards run one after the other and a block keeps only its input: one sample's block inputs, one
    block's effective weights and activations, and the lm_head's effective weight and logits of one sample.
    Either way the lm_head's backward holds its effective weight's gradient and one gradient-times-residual
    product (:class:`.supernet._ExpectedWeight`). Sharded, FSDP keeps its root unit (embedding, final norm,
    lm_head and the lm_head's residuals) whole from the forward to the backward, and holds the layer being
    computed and the next one, prefetched.
    """
    b, n, vb = shape.base, hw.devices, hw.bytes_per_value
    s = config.search
    nf = int_formats + 1 if search_formats is None else search_formats
    rank_tokens = max(s.batch_size * s.seq_len // n, s.seq_len)
    teacher, weights, resid = shape.params * vb, shape.params * 4, shape.params * 4 * nf
    layer = shape.block_params * 4
    head = b.vocab_size * b.hidden_size * 4
    root = (shape.params - b.num_layers * shape.block_params) * 4 + head * nf  # the FSDP root unit, gathered
    head_backward = 2 * head
    samples = -(-s.samples // n) if s.sampling == "hard" else 1
    if recompute and s.sampling == "hard":
        tokens = max(rank_tokens // samples, s.seq_len)  # one sample's rows
        act = (b.num_layers * tokens * b.hidden_size * 4 + shape.activation_bytes(tokens, s.seq_len, 4)
               // b.num_layers + shape.logits_bytes(tokens))
        effective = layer + head
    else:
        act = shape.activation_bytes(rank_tokens, s.seq_len, 4) + shape.logits_bytes(rank_tokens)
        # measured on SmolLM2-135M (benchmarks/search_sharding.py): without it the formula missed most of the peak
        effective = weights * samples
    if sharded and n > 1:
        device = max(teacher + weights + layer * nf,
                     teacher + (weights + resid - root) // n + root + 2 * layer * (1 + nf) + act + effective
                     + head_backward)
    else:
        device = teacher + weights + resid + act + effective + head_backward
    host = config.n_calib * s.seq_len * b.vocab_size * 2
    if config.strategy == "joint" and config.quantizer != "rtn":
        host += layer * int_formats
    return device, host


def search_mode(shape: ModelShape, config: CompressConfig, hw: Hardware, *, int_formats: int,
                search_formats: int | None = None) -> SearchMode:
    """How the search holds its supernet on ``hw.devices`` processes: the first of (whole), (recompute),
    (sharded), (sharded and recompute) that ``config.shard`` and ``config.recompute`` allow and that fits on a
    device, or the leanest allowed when none fits. ``fsdp`` and ``on`` force theirs; ``none`` and ``off`` forbid
    theirs; ``auto`` takes it only where the run would not fit without it (recomputing costs about a forward a
    step; sharding, gathers of every layer twice a step, slow between processes of one CPU). One process is
    never sharded."""
    shards = [False] if hw.devices == 1 or config.shard == "none" else [True] if config.shard == "fsdp" \
        else [False, True]
    recomputes = {"auto": [False, True], "on": [True], "off": [False]}[config.recompute]
    if config.search.sampling != "hard":  # one forward a step: nothing to split (run_search does not recompute)
        recomputes = [False]
    modes = [SearchMode(sh, rc) for sh in shards for rc in recomputes]
    for mode in modes:
        device, _ = search_memory(shape, config, hw, int_formats=int_formats, search_formats=search_formats,
                                  sharded=mode.sharded, recompute=mode.recompute)
        if device <= FIT_FRACTION * hw.memory_bytes:
            return mode
    return modes[-1]


def estimate_phases(shape: ModelShape, config: CompressConfig, hw: Hardware, *, int_formats: int,
                    search_formats: int | None = None, contenders: int = 4) -> tuple[PhaseEstimate, ...]:
    """Every torch phase of ``compress`` under ``config`` on ``hw`` (see module docstring).

    Args:
        int_formats: the search's integer formats (each: the unpruned model quantized by the run's quantizer).
        search_formats: all the search's formats (the supernet stacks a residual per format; default
            ``int_formats + 1``).
        contenders: models a budget quantizes and screens (the searched subnet, the baselines and the uniform
            reference); the winner alone is recovered (:mod:`.contenders`).
    """
    from llmshrink.compressor.calibration_text import n_rows

    b, n = shape.base, hw.devices
    vb = hw.bytes_per_value
    weights = shape.params * vb
    host_is_device = hw.kind == "cpu"
    s, r = config.search, config.recovery
    seq = s.seq_len
    rows = n_rows(config)
    out: list[PhaseEstimate] = []

    def add(phase: str, device: int, host: int, flops: float, rate_tflops: float, holds: str,
            extra_seconds: float = 0.0, sharded: bool = True) -> None:
        """``sharded``: the work splits over the devices (data parallel or FSDP); memory is per device as given,
        and on the host every rank's (the ranks of one machine share its RAM)."""
        seconds = flops / (rate_tflops * 1e12) + extra_seconds if rate_tflops else math.nan
        if sharded:
            seconds /= n
        if host_is_device:
            device, host = device + host, 0
            fits = device * (n if sharded else 1) <= FIT_FRACTION * hw.memory_bytes
        else:  # an unknown host (a GPU planned from elsewhere) is judged on the device alone
            fits = device <= FIT_FRACTION * hw.memory_bytes and (
                hw.host_memory_bytes is None or host * (n if sharded else 1) <= FIT_FRACTION * hw.host_memory_bytes)
        out.append(PhaseEstimate(phase, int(device), int(host), seconds, fits, holds))

    # 1. Calibration text: the model samples its own text (batches of 8 rows), KV cache of a batch.
    if config.calib_data == "self":
        kv = 8 * seq * b.num_layers * 2 * b.num_kv_heads * b.head_dim * vb
        gen_flops = shape.forward_flops(rows * seq, seq)
        read_s = 0.0
        if hw.memory_gbps:  # memory-bound decode: every step of a batch reads all the weights
            read_s = (rows / 8) * seq * weights / (hw.memory_gbps * 1e9 * GPU_MEMORY_EFFICIENCY)
        add("calibration text", weights + kv, rows * seq * 8,
            gen_flops if not hw.memory_gbps else 0.0, hw.decode_tflops,
            f"weights + KV cache of 8 rows; {rows} rows x {seq} tokens sampled", extra_seconds=read_s)
    # 2. Importance: one forward over the search's rows with hooks, no gradients, and the block-drop passes on
    #    the first batches (see importance_bytes); the layer-streamed path's peak is stated beside it.
    drop_rows = min(config.n_calib, IMPORTANCE_BATCH * IMPORTANCE_DROP_BATCHES)  # each drop runs the later blocks
    add("importance", importance_bytes(shape, config.n_calib, seq, vb), 0,
        shape.forward_flops(config.n_calib * seq, seq) + b.num_layers / 2 * shape.forward_flops(drop_rows * seq, seq),
        hw.train_tflops,
        f"weights + one batch's forward + block-drop records; {config.n_calib} rows (streamed layer by layer: "
        f"{human_bytes(importance_bytes(shape, config.n_calib, seq, vb, streamed=True))})")
    # 3. Teacher targets: the original's log-probabilities on the search's rows, cached in float16 on the host.
    targets = config.n_calib * seq * b.vocab_size * 2
    add("teacher targets", weights + shape.logits_bytes(4 * seq), targets,
        shape.forward_flops(config.n_calib * seq, seq), hw.train_tflops,
        f"weights + float16 targets {config.n_calib} x {seq} x {b.vocab_size} on the host")
    # 4. Search: the supernet (see search_memory), sampled forwards with backward to the architecture logits; the
    #    teacher is read from its targets.
    step_tokens = s.batch_size * seq
    nf = int_formats + 1 if search_formats is None else search_formats
    mode = search_mode(shape, config, hw, int_formats=int_formats, search_formats=search_formats)
    device, host = search_memory(shape, config, hw, int_formats=int_formats, search_formats=search_formats,
                                 sharded=mode.sharded, recompute=mode.recompute)
    add("search", device, host, (3 + mode.recompute) * shape.forward_flops(step_tokens * s.steps, seq),
        hw.train_tflops, f"weights + fp32 supernet, {nf} residuals" + (f" sharded over {n} (FSDP)" if mode.sharded
                                                                        else "")
        + (" + one block's effective weights, activations of one sample's rows (blocks recomputed in per-sample "
           "backwards)" if mode.recompute else
           f" + a model-sized effective weight per sampled forward + activations of {s.batch_size} x {seq} tokens"))
    if n > min(s.samples, s.batch_size):  # run_search refuses ranks that would have no sample of a step
        out[-1] = replace(out[-1], fits=False, holds=f"{n} processes share {min(s.samples, s.batch_size)} "
                          "architecture samples a step: refused (some would have nothing to do; "
                          f"--search-samples {n} gives each one)")
    # 5. GPTQ, per contender, on rank 0 (see gptq_bytes); the peak of `export --layer-streaming on` is stated beside
    #    it (compress keeps the teacher loaded for screening and recovery, so streaming would not lower its peak).
    q = config.n_quant * seq
    hessian_flops = q * b.num_layers * 2 * (3 * b.hidden_size**2 + b.intermediate_size**2) \
        + q * 2 * b.hidden_size**2  # X^T X of each input group (q/k/v, o, gate/up, down) and the lm_head's
    add("GPTQ", gptq_bytes(shape, config.n_quant, seq, vb), 0, contenders * shape.forward_flops(q, seq),
        hw.train_tflops, f"the float model + the quantized one being built + hidden states of {config.n_quant} "
        f"rows; x{contenders} contenders (an export streaming layers from disk: "
        f"{human_bytes(gptq_bytes(shape, config.n_quant, seq, vb, streamed=True))})",
        extra_seconds=contenders * hessian_flops / (hw.fp64_tflops * 1e12) if hw.fp64_tflops else math.nan,
        sharded=False)
    # 6. Recovery of the budget's winning contender: the quantized student (int16 codes + the dequantized
    #    weights autograd keeps) and the teacher, whole on every rank; activations of the rank's rows, logits of both.
    if r.steps:
        student = shape.params * 2 + weights
        rec_tokens = max(r.batch_size * r.seq_len // n, r.seq_len)
        add("recovery", student + weights
            + shape.activation_bytes(rec_tokens, r.seq_len, vb) + 2 * shape.logits_bytes(rec_tokens), 0,
            4 * shape.forward_flops(r.batch_size * r.seq_len * r.steps, r.seq_len), hw.train_tflops,
            f"student codes + weights, teacher, activations of {r.batch_size} x {r.seq_len} tokens; "
            f"{r.steps} steps")
    # 7. Screening and held-out perplexity: forwards of each contender.
    add("screening", weights + shape.logits_bytes(4 * seq), 0,
        contenders * shape.forward_flops((config.n_screen + 8) * seq, seq), hw.train_tflops,
        f"weights + one batch's logits; {config.n_screen} rows x{contenders} contenders")
    # 8. Export (on the host, rank 0): the torch model and the ONNX graph with its weights being written.
    packed = shape.params  # int4 codes packed two a byte + scales, or int8: about a byte a weight at most
    add("export", 0, shape.params * 4 + packed, 0.0, hw.train_tflops,
        "float32 model + the ONNX weights being written (per bundle)", sharded=False)
    return tuple(out)


def measured_cpu_tflops(seconds: float = 0.3) -> tuple[float, float]:
    """This machine's fp32 and fp64 matmul rates (TFLOP/s) with torch's threads, each timed ~``seconds``."""
    import time

    import torch

    rates = []
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(1024, 1024, dtype=dtype)
        a @ a  # warm-up (thread pool, kernel choice)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ a
            reps += 1
        rates.append(2 * 1024**3 * reps / (time.perf_counter() - t0) / 1e12)
    return rates[0], rates[1]


def hardware_for(target, device: str = "auto", devices: int = 1, memory_bytes: int | None = None,
                 host_memory_bytes: int | None = None, *, measure: bool = True) -> Hardware:
    """The hardware a plan is for.

    ``device``: ``cpu`` (this machine), ``cuda`` (this machine's GPUs where torch sees them; else the
    target's own GPU from its datasheet: one plans an A100 run on the A100s one deploys to), or ``auto``
    (``cuda`` when torch sees a GPU or the target is a GPU, else ``cpu``). ``memory_bytes`` overrides the
    per-device memory (e.g. an A100 40GB), ``host_memory_bytes`` the host's RAM (default: this machine's
    when it has the GPUs; unknown when the GPU is the target's, planned from elsewhere). ``measure=False``
    skips timing this CPU's matmuls (the plan then has memory but no CPU times).

    Raises:
        UsageError: ``cuda`` for a CPU target on a machine without CUDA (no GPU to plan for), or a bad device.
    """
    import torch

    from llmshrink.device import parse_device
    from llmshrink.errors import UsageError
    from llmshrink.host import available_memory_bytes, cpu_model
    from llmshrink.host import memory_bytes as total_ram

    kind, _ = parse_device(device)
    here = torch.cuda.is_available()
    gpu_target = target.runtime != "onnxruntime-cpu"
    if kind == "auto":
        kind = "cuda" if here or gpu_target else "cpu"
    if kind == "cpu":
        fp32, fp64 = measured_cpu_tflops() if measure else (0.0, 0.0)
        rates = (f"fp32 matmul {fp32:.3f} TFLOP/s and fp64 {fp64:.3f} measured now" if measure
                 else "throughput not measured")
        return Hardware("cpu", cpu_model(), 1, memory_bytes or available_memory_bytes(),
                        host_memory_bytes or total_ram(), "fp32", fp32 * CPU_TRAIN_EFFICIENCY, fp64,
                        fp32 * CPU_DECODE_EFFICIENCY, None,
                        f"this machine: {torch.get_num_threads()} threads, {rates}; RAM available now")
    if here:
        props = torch.cuda.get_device_properties(0)
        name, mem = props.name, int(props.total_memory)
    elif gpu_target:
        name, mem = target.device, int(target.memory_bytes or 0)
    else:
        raise UsageError(f"--device cuda: torch sees no GPU here and target {target.name} is not a GPU, so "
                         "there is no GPU to plan for.", "Plan for a GPU target (e.g. --target a100), or use "
                         "--device cpu.")
    ds = _datasheet_for(name, target)
    if not ds:
        raise UsageError(f"No datasheet numbers for {name}: the plan cannot price its phases.",
                         "Plan with a GPU target whose YAML has a datasheet (a100, h100, l4, jetson-orin).")
    peak = ds["fp16_tensor_tflops_dense"]
    bw = ds["memory_bandwidth_gbps"]
    host = host_memory_bytes or (total_ram() if here else None)
    return Hardware("cuda", name, devices, memory_bytes or mem, host, "bf16", peak * GPU_TRAIN_MFU,
                    ds.get("fp32_tflops", peak / 16) / 2, peak * GPU_TRAIN_MFU, bw,
                    f"{name} datasheet: bf16 {peak:g} TFLOPS dense at {GPU_TRAIN_MFU:.0%} achieved, "
                    f"fp64 = fp32 / 2, {bw:g} GB/s; host RAM: "
                    + ("given" if host_memory_bytes else "this machine's" if here else "unknown (not judged)"))


def _residual_formats(space) -> int:
    """Formats the search's supernet caches a quantization residual for: the space's integer ones."""
    from llmshrink.formats import parse_format

    return sum(not parse_format(f).is_float for f in space.formats)


def _datasheet_for(gpu_name: str, target) -> dict:
    """The datasheet of the built-in GPU target whose device names this GPU (the plan's own target first)."""
    from llmshrink.targets.profile import builtin_names, load_target

    if target.datasheet and gpu_name == target.device:
        return dict(target.datasheet)
    for name in builtin_names():
        t = load_target(name)
        product = t.device.split()[1] if len(t.device.split()) > 1 else t.device  # "NVIDIA A100-SXM4-80GB"
        if t.datasheet and product in gpu_name:
            return dict(t.datasheet)
    return dict(target.datasheet)


def make_plan(model: str, target: str, latency: str | None = None, *, workload=None, device: str = "auto",
              devices: int = 1, memory_bytes: int | None = None, host_memory_bytes: int | None = None,
              config: CompressConfig | None = None, space_path: str | None = None, calib_data: str | None = None,
              shard: str | None = None, recompute: str | None = None, search_samples: int | None = None,
              progress=None) -> Plan:
    """The :class:`Plan` of ``compress --model model --target target --latency latency`` (config only).

    ``calib_data`` (``compress --calib-data``; default the config's) decides whether sampling the calibration
    text from the model is a phase (``self``); ``shard`` (``compress --shard``; default the config's) whether
    the search is sharded over several devices; ``recompute`` (``compress --recompute``) whether it may recompute
    its blocks to fit; ``search_samples`` (``compress --search-samples``) the search's samples a step.

    Raises:
        UsageError: unknown model or target, bad budget, or a model the tool cannot compress.
    """
    from llmshrink.compressor.budget import fastest_reachable, parse_budgets
    from llmshrink.compressor.space import default_space, load_space
    from llmshrink.models import load_config, resolve_model
    from llmshrink.models.info import count_params
    from llmshrink.progress import NULL_PROGRESS
    from llmshrink.spec import SubnetSpec
    from llmshrink.targets.predict import predict, table_for
    from llmshrink.targets.profile import load_target

    progress = progress or NULL_PROGRESS
    src = resolve_model(model)
    hf_config = load_config(src, progress=progress)
    base = BaseShape.from_config(hf_config)
    tgt = load_target(target)
    table = table_for(tgt)
    wl = workload or tgt.default_workload
    config = config or CompressConfig(model=src.describe(), target=tgt.name, budgets_ms=(1.0,))
    if calib_data is not None:
        config = replace(config, calib_data=calib_data)
    if shard is not None:
        config = replace(config, shard=shard)
    if recompute is not None:
        config = replace(config, recompute=recompute)
    if search_samples is not None:
        from llmshrink.compressor.search import search_config

        config = replace(config, search=search_config(samples=search_samples, base=config.search))
    fmts = tgt.search_formats or tgt.formats  # as the pipeline builds its space
    space = (load_space(space_path, base, tgt.formats, search_formats=fmts) if space_path
             else default_space(base, tgt.formats, search_formats=fmts))
    fmt = tgt.formats[0]
    original = SubnetSpec.uniform(base, fmt, model=model)
    if fmt in ("fp16", "fp32"):
        original = replace(original, embedding=fmt)
    pred = predict(original, tgt, wl, table=table)
    fastest, _ = fastest_reachable(space, tgt, wl, table)
    budget_ms, note = None, ""
    if latency:
        budgets = parse_budgets(latency)
        budget_ms, note = budgets[0].resolve(base, tgt, wl, table)
    hw = hardware_for(tgt, device, devices, memory_bytes, host_memory_bytes)
    shape = ModelShape(base, count_params(hf_config))
    int_formats = _residual_formats(space)
    phases = estimate_phases(shape, config, hw, int_formats=int_formats, search_formats=len(space.formats))
    from llmshrink.compressor.search import search_config

    def with_samples(k: int) -> CompressConfig:  # more processes than a step's samples need one each
        s = config.search
        return config if k <= min(s.samples, s.batch_size) else replace(config, search=search_config(samples=k, base=s))

    min_devices = next((k for k in DEVICE_COUNTS if all(
        p.fits for p in estimate_phases(shape, with_samples(k), replace(hw, devices=k), int_formats=int_formats,
                                        search_formats=len(space.formats)))), None)
    min_samples = with_samples(min_devices).search.samples if min_devices else None
    assumptions = (
        f"hardware: {hw.source}",
        "memory: formulas from what each phase holds (weights, caches, activations without recomputation except "
        "in a search that recomputes its blocks, "
        f"float32 logits); a phase fits in {FIT_FRACTION:.0%} of the memory (the rest: allocator, CUDA context, "
        "libraries)",
        "time: FLOPs / achieved throughput; GPTQ adds its float64 Hessian sums; calibration text sampling "
        + ("is memory-bound (weights read once per decode step)" if hw.memory_gbps else
           f"at {CPU_DECODE_EFFICIENCY:.0%} of the fp32 matmul rate"),
        (f"{devices} devices, one torchrun process each: every rank holds the model whole and the training phases "
         "split their rows; the search shards its supernet with FSDP "
         + ("(--shard fsdp)" if config.shard == "fsdp" else "where it would not fit whole (--shard auto)"
            if config.shard == "auto" else "never (--shard none)") + "; GPTQ and export run on rank 0"
         if devices > 1 else "one device: nothing is sharded"),
        f"the run's defaults: {config.n_calib} search rows, {config.n_quant} GPTQ rows, search {config.search.steps}"
        f" steps, recovery {config.recovery.steps} steps of {config.recovery.batch_size} x "
        f"{config.recovery.seq_len} tokens; a budget quantizes 4 contenders (search, 2 baselines, the uniform "
        "reference) and recovers the winner; one budget",
    )
    return Plan(model=src.describe(), target=tgt.name, workload=wl.describe(), params=shape.params,
                space_log10=space.log10_size(), decisions=_decisions(space), original_format=fmt,
                original_ms=pred.total_ms, fastest_ms=fastest, budget_ms=budget_ms, budget_note=note,
                hardware=hw, phases=phases, assumptions=assumptions, table_kind=pred.table_kind,
                min_devices=min_devices if hw.kind == "cuda" else (1 if all(p.fits for p in phases) else None),
                min_devices_samples=min_samples if hw.kind == "cuda" and min_samples != config.search.samples else None)


def _decisions(space) -> int:
    """Choices the search makes with more than one candidate: per block its keep, widths and linears'
    formats, plus the hidden width and the lm_head's format."""
    from llmshrink.spec import LINEARS

    d = space.decisions()
    per_block = sum(d[k] > 1 for k in ("keep", "kv_groups", "heads_per_group", "head_dim", "mlp"))
    per_block += sum(len(space.linear_formats(n)) > 1 for n in LINEARS)
    return space.base.num_layers * per_block + (d["hidden"] > 1) + (len(space.linear_formats("lm_head")) > 1)


def log10_str(x: float) -> str:
    return f"10^{x:.0f}" if math.isfinite(x) else "-"


def check_fits(config: CompressConfig, hf_config, device, space, processes: int = 1) -> tuple[PhaseEstimate, ...]:
    """Refuse a run a phase of which cannot fit on ``device`` (a :class:`~llmshrink.device.Device`), with
    ``processes`` torchrun ranks (each its own device of this kind; on the CPU, sharing this one's RAM).

    Memory only (no throughput is measured): called by ``compress`` after reading the config and before
    loading any weights. Returns the phase estimates when all fit; how the search holds its supernet is
    :func:`search_mode` on the same estimate.

    Raises:
        InsufficientMemoryError: a phase's estimated peak exceeds the device's (or host's) memory.
    """
    from llmshrink.errors import InsufficientMemoryError
    from llmshrink.models.info import count_params
    from llmshrink.units import human_bytes

    hw = _present(device, processes)
    phases = estimate_phases(ModelShape(space.base, count_params(hf_config)), config, hw,
                             int_formats=_residual_formats(space), search_formats=len(space.formats))
    bad = [p for p in phases if not p.fits]
    if bad:
        worst = max(bad, key=lambda p: p.device_bytes)
        raise InsufficientMemoryError(
            f"This run would not fit: its {worst.phase} phase needs about {human_bytes(worst.device_bytes)} "
            f"({worst.holds}), and {device.name} ({device.torch_device}) has {human_bytes(device.memory_bytes)} "
            f"available" + (f"; {', '.join(p.phase for p in bad if p is not worst)} would not fit either"
                            if len(bad) > 1 else "") + ". Nothing was loaded.",
            f"`llmshrink plan --model {config.model} --target {config.target}` shows every phase's peak and how many "
            "devices make it fit; run where there is more memory, or free some (other processes use RAM too).")
    return phases


def _present(device, processes: int) -> Hardware:
    """The :class:`Hardware` of ``processes`` ranks on devices like ``device`` (a :class:`~llmshrink.device.Device`)."""
    from llmshrink.host import memory_bytes as total_ram

    return Hardware(device.kind, device.name, processes, device.memory_bytes,
                    total_ram() if device.kind == "cuda" else None, device.dtype, 0.0, 0.0, 0.0, None,
                    "the device present")


def search_mode_here(config: CompressConfig, hf_config, device, space, processes: int) -> SearchMode:
    """How this run's search holds its supernet (:func:`search_mode` on the devices present)."""
    from llmshrink.models.info import count_params

    return search_mode(ModelShape(space.base, count_params(hf_config)), config, _present(device, processes),
                          int_formats=_residual_formats(space), search_formats=len(space.formats))
