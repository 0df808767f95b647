"""Analytical latency tables for GPU targets: a roofline per op, labelled ``analytical`` everywhere.

Each op costs ``launch + max(bytes / (bandwidth * memory_efficiency),
flops / (peak * compute_efficiency))``. Peak bandwidth and throughput come
from the target's ``datasheet`` (each number cited in its YAML ``sources``);
the achieved fractions and the launch cost are the target's ``roofline``
assumptions, stated in its YAML. The formula is evaluated on a grid of op
shapes and the table's usual cost models are fitted to it, so the search,
``predict`` and ``validate`` read analytical and measured tables the same way.

Bytes and FLOPs per op (fp16 activations and KV cache, as TensorRT runs them):

* linear ``rows x K -> N`` in format f: weights ``K*N*bits(f)/8`` (scales
  included) + activations ``2*rows*(K+N)``; ``2*rows*K*N`` FLOPs at f's
  tensor-core peak (W4A16 dequantizes to fp16, so it runs at the fp16 peak).
* attention: KV cache ``2*2*kv*d*(past+rows)`` bytes + q/out
  ``2*2*rows*heads*d``; ``4*heads*d*rows*(past+(rows+1)/2)`` FLOPs (causal),
  two kernels.
* layer glue: two RMSNorms and the SwiGLU product, ``2*rows*(3*3*hidden + 3*mlp)``
  bytes, ``glue_kernels`` launches.
* overhead per call: ``call_overhead_us`` + embedding gather + final norm.
"""

from __future__ import annotations

import itertools

from llmshrink.formats import parse_format
from llmshrink.targets.profile import TargetProfile
from llmshrink.targets.table import LatencyTable, OpEntry, Provenance

FORMULA = "t = launch + max(bytes / (memory_bandwidth * memory_efficiency), flops / (peak(format) * compute_efficiency))"
REQUIRED = ("memory_bandwidth_gbps", "fp16_tensor_tflops_dense")
ROOFLINE_KEYS = ("memory_efficiency", "compute_efficiency", "launch_us", "glue_kernels", "call_overhead_us")

_DIMS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_VOCAB = (16384, 32768, 65536, 131072, 262144)
_DECODE_ROWS = (1, 2, 4, 8, 16, 32, 64)
_PREFILL_ROWS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# The overhead op's dims carry no hidden size; its embedding gather and final
# norm are sized for a 4096-wide model (a few microseconds either way).
_OVERHEAD_HIDDEN = 4096


def has_roofline(target: TargetProfile) -> bool:
    return all(k in target.datasheet for k in REQUIRED) and all(k in target.roofline for k in ROOFLINE_KEYS)


def peak_flops(target: TargetProfile, fmt: str) -> float:
    """Dense tensor-core peak (FLOP/s) the format's matmuls run at."""
    f, ds = parse_format(fmt), target.datasheet
    if f.act != "none" and f.weight_bits == 8 and "int8_tensor_tops_dense" in ds:
        return ds["int8_tensor_tops_dense"] * 1e12
    if fmt.startswith("fp8") and "fp8_tensor_tflops_dense" in ds:
        return ds["fp8_tensor_tflops_dense"] * 1e12
    return ds["fp16_tensor_tflops_dense"] * 1e12


class Roofline:
    """The per-op roofline formulas of one target (see module docstring); times in ms."""

    def __init__(self, target: TargetProfile) -> None:
        r, ds = target.roofline, target.datasheet
        self.target = target
        self.bw = ds["memory_bandwidth_gbps"] * 1e9 * r["memory_efficiency"]
        self.eff = r["compute_efficiency"]
        self.launch = r["launch_us"] * 1e-6
        self.glue_kernels = r["glue_kernels"]
        self.call = r["call_overhead_us"] * 1e-6
        self.fp16 = ds["fp16_tensor_tflops_dense"] * 1e12 * self.eff

    def _t(self, bytes_: float, flops: float, peak: float, kernels: float = 1) -> float:
        return (kernels * self.launch + max(bytes_ / self.bw, flops / peak)) * 1e3

    def linear(self, fmt: str, rows: int, k: int, n: int) -> float:
        bits = parse_format(fmt).bits_per_weight()
        return self._t(k * n * bits / 8 + 2 * rows * (k + n), 2 * rows * k * n, peak_flops(self.target, fmt) * self.eff)

    def attention(self, rows: int, past: int, heads: int, kv_heads: int, head_dim: int, batch: int = 1) -> float:
        total = past + rows
        bytes_ = batch * (4 * kv_heads * head_dim * total + 4 * rows * heads * head_dim)
        flops = batch * 4 * heads * head_dim * rows * (past + (rows + 1) / 2)
        return self._t(bytes_, flops, self.fp16, kernels=2)

    def layer_glue(self, rows: int, hidden: int, mlp: int) -> float:
        return self._t(2 * rows * (9 * hidden + 3 * mlp), 0.0, self.fp16, kernels=self.glue_kernels)

    def overhead(self, rows: int, layers: int) -> float:
        return self.call * 1e3 + self._t(2 * rows * _OVERHEAD_HIDDEN * 3, 0.0, self.fp16, kernels=2)


_CACHE: dict[str, LatencyTable] = {}


def _build(target: TargetProfile) -> LatencyTable:
    rf = Roofline(target)
    entries: list[OpEntry] = []
    for fmt in target.formats:
        for rows in _DECODE_ROWS + _PREFILL_ROWS:
            phase = "decode" if rows in _DECODE_ROWS else "prefill"
            for k, n in itertools.chain(itertools.product(_DIMS, _DIMS), itertools.product(_DIMS[:-2], _VOCAB)):
                if (g := parse_format(fmt).group_size) and k % g:
                    continue
                entries.append(OpEntry("linear", phase, {"rows": rows, "k": k, "n": n}, fmt, rf.linear(fmt, rows, k, n)))
        for k, n in itertools.product(_DIMS, _VOCAB):
            if not ((g := parse_format(fmt).group_size) and k % g):
                entries.append(OpEntry("lm_head", "decode", {"rows": 1, "k": k, "n": n}, fmt, rf.linear(fmt, 1, k, n)))
    heads_grid = (1, 2, 4, 8, 16, 32, 64, 128)
    for phase, rows_grid, past_grid in (("decode", (1,), (16, 64, 256, 1024, 4096, 16384)),
                                        ("prefill", _PREFILL_ROWS, (0,))):
        for rows, past, heads, hd in itertools.product(rows_grid, past_grid, heads_grid, (32, 64, 128, 256)):
            for kv in (x for x in heads_grid if x <= heads):
                d = {"rows": rows, "past": past, "heads": heads, "kv_heads": kv, "head_dim": hd, "batch": 1}
                entries.append(OpEntry("attention", phase, d, "", rf.attention(rows, past, heads, kv, hd)))
        for rows in rows_grid:
            for hidden, mlp in itertools.product(_DIMS[:-1], _DIMS):
                entries.append(OpEntry("layer_glue", phase, {"rows": rows, "hidden": hidden, "mlp": mlp}, "",
                                       rf.layer_glue(rows, hidden, mlp)))
            for layers in (1, 8, 32, 128):
                entries.append(OpEntry("overhead", phase, {"rows": rows, "layers": layers}, "", rf.overhead(rows, layers)))
    prov = Provenance(kind="analytical", formula=FORMULA,
                      datasheet={**target.datasheet, **{f"roofline.{k}": v for k, v in target.roofline.items()}},
                      sources=target.sources,
                      notes=("Analytical: a roofline from datasheet peaks and the stated efficiency assumptions, "
                             "not a measurement. `llmshrink targets profile` on the device replaces it with a "
                             "measured table.",))
    return LatencyTable(name=f"{target.name}-roofline", target=target.name, provenance=prov, entries=tuple(entries))


def roofline_table(target: TargetProfile) -> LatencyTable:
    """The analytical table of ``target`` (cached per profile contents)."""
    from llmshrink import serde

    key = serde.dumps(target)
    if key not in _CACHE:
        _CACHE[key] = _build(target)
    return _CACHE[key]
