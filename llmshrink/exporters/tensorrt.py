"""TensorRT engines from ``trt``-flavour bundles: build, then time the way trtexec does.

TensorRT is imported lazily (it is the ``tensorrt`` extra and needs a CUDA
device); without either, every entry point raises
:class:`~llmshrink.errors.MissingHardwareError` (exit code 5) saying which is
missing. Nothing here ever reports a number it did not measure on a GPU.

Build: strongly typed network (the ONNX graph's own fp16 / INT4 types decide
precision), one optimization profile covering batch 1..B, sequence 1..max_length
and past 0..max_length, a timing cache kept beside the engine so rebuilds are fast.

Timing: warm-up runs, then timed runs on one CUDA stream with CUDA events,
median and p90, like ``trtexec``.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

from llmshrink import storage
from llmshrink.errors import LlmshrinkError, MissingHardwareError
from llmshrink.exporters.bundle import MODEL_FILE
from llmshrink.targets.workload import Workload

ENGINE_FILE = "model.plan"
TIMING_CACHE_FILE = "timing.cache"


def require_tensorrt():
    """Import and return the ``tensorrt`` module, or raise MissingHardwareError naming what is missing."""
    reasons = []
    if importlib.util.find_spec("tensorrt") is None:
        reasons.append("the tensorrt Python package is not installed (pip install 'llmshrink[tensorrt]')")
    import torch

    if not torch.cuda.is_available():
        reasons.append("no CUDA device is visible to torch")
    if reasons:
        raise MissingHardwareError("Cannot build or time a TensorRT engine here: " + "; ".join(reasons) + ".",
                                   "Copy the bundle to the target machine and run `llmshrink build BUNDLE` there.")
    import tensorrt as trt

    return trt


@dataclass(frozen=True)
class EngineBuild:
    """What a build produced."""

    engine_path: Path
    timing_cache_path: Path
    seconds: float
    tensorrt_version: str


def _profile_shapes(network, max_batch: int, max_length: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape per input: batch, sequence and past axes from their names in the graph."""
    shapes = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = list(t.shape)
        if t.name == "input_ids":
            shapes[t.name] = ((1, 1), (1, 1), (max_batch, max_length))
        elif t.name == "attention_mask":
            shapes[t.name] = ((1, 1), (1, max_length // 2), (max_batch, max_length))
        elif t.name == "logits_to_keep":
            continue  # static [1]
        elif t.name.startswith("past_key_values."):
            heads, dim = dims[1], dims[3]
            shapes[t.name] = ((1, heads, 0, dim), (1, heads, max_length // 2, dim), (max_batch, heads, max_length - 1, dim))
    return shapes


def build_engine(bundle: str | Path, *, max_batch: int = 1, max_length: int | None = None,
                 workspace_gib: float = 4.0) -> EngineBuild:
    """Parse the bundle's ONNX model and write ``model.plan`` (+ timing cache) beside it.

    Raises:
        MissingHardwareError: no TensorRT or no CUDA device.
        LlmshrinkError: the parser or builder rejected the model (their messages included).
    """
    trt = require_tensorrt()
    from llmshrink.exporters.bundle import load_manifest

    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    if manifest.flavour != "trt":
        raise LlmshrinkError(f"{bundle} is an {manifest.flavour}-flavour bundle.",
                             "Export with --flavour trt to build a TensorRT engine.")
    max_length = max_length or manifest.max_length
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle / MODEL_FILE)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LlmshrinkError(f"TensorRT's ONNX parser rejected {bundle / MODEL_FILE}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cache_path = bundle / TIMING_CACHE_FILE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in _profile_shapes(network, max_batch, max_length).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LlmshrinkError("TensorRT failed to build the engine; see its log above.")
    seconds = time.perf_counter() - t0
    storage.atomic_write_bytes(bundle / ENGINE_FILE, bytes(plan))
    storage.atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return EngineBuild(bundle / ENGINE_FILE, cache_path, seconds, trt.__version__)


def time_engine(bundle: str | Path, workload: Workload, *, runs: int = 20, warmup: int = 3):
    """Median / p90 of ``workload`` on the bundle's engine, timed with CUDA events.

    Returns a :class:`~llmshrink.exporters.timing.LatencyMeasurement`.
    """
    trt = require_tensorrt()
    import torch

    from llmshrink.errors import UsageError
    from llmshrink.exporters.timing import summarize

    if workload.phase == "e2e":
        raise UsageError("e2e timing of a TensorRT engine is not built yet.", "Time decode and prefill workloads.")

    bundle = Path(bundle)
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine((bundle / ENGINE_FILE).read_bytes())
    context = engine.create_execution_context()
    b, ctx = workload.batch, workload.context
    seq = 1 if workload.phase == "decode" else ctx
    past = ctx if workload.phase == "decode" else 0
    buffers = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
            continue
        dims = list(engine.get_tensor_shape(name))
        if name == "input_ids":
            shape, dtype = (b, seq), torch.int64
        elif name == "attention_mask":
            shape, dtype = (b, past + seq), torch.int64
        elif name == "logits_to_keep":
            shape, dtype = (1,), torch.int64
        else:
            shape, dtype = (b, dims[1], past, dims[3]), torch.float16
        t = (torch.ones if name in ("attention_mask", "logits_to_keep") else torch.zeros)(shape, dtype=dtype, device="cuda")
        context.set_input_shape(name, shape)
        buffers[name] = t
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if name not in buffers:
            shape = tuple(context.get_tensor_shape(name))
            dtype = torch.float16 if engine.get_tensor_dtype(name) == trt.DataType.HALF else torch.float32
            buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
        context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.Stream()
    for _ in range(warmup):
        context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        context.execute_async_v3(stream.cuda_stream)
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return summarize(times, workload, warmup=warmup, threads=None, runtime="tensorrt", runtime_version=trt.__version__)
