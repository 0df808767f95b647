"""Measure the ``cpu`` target's latency table: ONNX Runtime CPU ops timed inside whole models.

Why whole models: an op timed alone (or in a fan-out of copies) runs in a
different context than in the shipped decoder — other caches, other
prepacking, no neighbours — and on this machine that moved MatMulNBits at
accuracy level 0 by up to 60 % (docs/research/latency_model.md). So the
profiler samples random subnets of the model family (every width, every
format of the target, kept-layer counts from a third to all), builds each
through the real exporter (``build_ort_graph``) with random weights — same
ops, same kernels, weights streaming from memory as in the real model — and
runs the real workloads on it:

1. a plain session times each workload's wall clock (what ``bench`` and
   ``validate`` measure);
2. a session with ORT's per-node profiler attributes the time to nodes,
   which become table entries keyed by op signature (a linear's format,
   rows, K, N; attention's heads, kv heads, head size, cached and new tokens;
   a layer's norm/activation glue);
3. each call's wall time (the floor of the plain session, as ``validate``
   measures it) becomes a ``wall`` entry; the table fits per-kernel-class
   scales and a per-call overhead from node times to wall times
   (``table.Calibration``). The node profiler adds its own cost per node and,
   for kernels that split work into many parallel chunks, much more (ORT logs
   thread-pool statistics per chunk while profiling): the w8g32 lm_head at
   accuracy level 0 reads 3x its real time. The scales take that out.

The cost models fitted to the entries (``targets.table``) then predict any
spec whose shapes fall inside the sampled ranges.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import tempfile
import time
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import numpy as np

from llmshrink.exporters.timing import floor_of
from llmshrink.formats import parse_format
from llmshrink.progress import Progress
from llmshrink.spec import LINEARS, BaseShape, LayerSpec, SubnetSpec
from llmshrink.targets.table import LatencyTable, OpEntry, Provenance
from llmshrink.targets.workload import Workload

_LINEAR = re.compile(r"^/model/layers\.(\d+)/(?:attn|mlp)/(qkv|q|k|v|o|gate|up|down)_proj/MatMul")
_LAYER = re.compile(r"^/model/layers\.(\d+)/")


@dataclass(frozen=True)
class ProfilePlan:
    """What a profile run samples. The defaults take about 20 minutes for SmolLM2-135M on 2 cores (with anchors).

    52 models give each of the cpu target's 26 formats two lm_head samples.

    ``anchors`` are formats timed as whole *uniform* models after the random ones: the full widths, every
    linear and the lm_head in that one format (:func:`anchor_formats`). Why: the wall-time calibration fits
    one node-to-wall scale per kernel class from whole calls, and a random model mixes ~10 classes in one
    call, so a class's scale is only as good as the mixes separate it. On a Xeon with AMX the node profiler
    inflated w4g32a8's kernel time ~1.45x and w8g64a8's ~1.05x (estimated from one pair of models' node and
    wall times), while the fit gave their shared class one scale. A call of one format gives that format a
    scale of its own (``table.calibration_key``), and the uniform int4 model is the reference every ``xint4``
    budget is measured against.

    ``lean_anchors`` times the anchors at the middle decode and prefill contexts only: an anchor's linears are
    the same at every cache length, so its other calls pin nothing more, and the quick adaptation then times
    five anchors in the time of three.

    ``volatile_models`` of the ``models`` (the last ones) may draw the kernels that swing between runs
    (:func:`volatile_kernel`) and give them lm_heads; the others draw steady formats only, as the search's
    subnets do. Why: with every model drawing from all 26 formats, 260 of a full profile's 295 calls held a 2- or
    8-bit level-0 kernel, and the wall-time calibration fitted on them over-predicted the search's subnets'
    decode by 20 % right after the profile (run 7); with this split (36 of 177 decode calls volatile), -1.4 %
    (run 8, ``benchmarks/results/latency_model_anchors_cpu.txt``; one run each, other hours). The default 12
    give each of the 6 volatile formats two lm_head samples, as the 40 steady models give the 20 steady ones.

    ``node_blocks`` (default: ``blocks``) is how many of the ``blocks`` the *profiled* pass runs, each as long
    as the plain pass's: node times only split a call's time among its nodes and are scaled to the wall
    (``table.Calibration``), so they need fewer runs than the wall floor. The profiled pass and the parsing of
    its JSON were more than half of a quick adaptation (an anchor: plain pass 8.7 s, profiled 9.1 s, JSON 3.5 s).
    """

    models: int = 52
    volatile_models: int = 12
    anchors: tuple[str, ...] = ()
    lean_anchors: bool = False
    decode_contexts: tuple[int, ...] = (64, 256, 1024)
    prefill_contexts: tuple[int, ...] = (32, 128, 256)
    decode_runs: int = 40
    prefill_runs: int = 12
    blocks: int = 6
    node_blocks: int | None = None
    warmup_s: float = 1.0
    min_layer_frac: float = 0.33
    min_hidden_frac: float = 0.25
    min_mlp_frac: float = 0.125
    seed: int = 0

    def node_runs(self) -> tuple[dict[str, int], int]:
        """The profiled pass's runs per phase and blocks: ``node_blocks`` of the plain pass's blocks."""
        nb = min(self.node_blocks or self.blocks, self.blocks)
        runs = {ph: max(nb, math.ceil(n * nb / self.blocks))
                for ph, n in (("decode", self.decode_runs), ("prefill", self.prefill_runs))}
        return runs, nb

    def workloads(self, i: int) -> list[Workload]:
        """Model ``i``'s workloads: every decode context, the middle prefill context, and one of the others
        (a lean anchor: the middle decode and prefill contexts)."""
        pre = list(self.prefill_contexts)
        mid = pre[len(pre) // 2]
        if self.lean_anchors and i >= self.models:
            dec = self.decode_contexts[len(self.decode_contexts) // 2]
            return [Workload("decode", 1, dec), Workload("prefill", 1, mid)]
        others = [c for c in pre if c != mid]
        chosen = [mid] + ([others[i % len(others)]] if others else [])
        return [Workload("decode", 1, c) for c in self.decode_contexts] + [Workload("prefill", 1, c) for c in chosen]


def anchor_formats(formats: Sequence[str], search_formats: Sequence[str] = ()) -> tuple[str, ...]:
    """The uniform models a full profile times (:attr:`ProfilePlan.anchors`): the search's formats, then the
    first steady format (:func:`volatile_kernel`) of every linear kernel class they leave uncovered."""
    from llmshrink.targets.table import kernel_class

    out = [f for f in search_formats if f in formats]
    covered = {kernel_class("linear", f) for f in out}
    for f in formats:
        if not volatile_kernel(f) and kernel_class("linear", f) not in covered:
            out.append(f)
            covered.add(kernel_class("linear", f))
    return tuple(out)


def volatile_kernel(fmt: str) -> bool:
    """Whether ``fmt`` runs on a MatMulNBits kernel whose time swings up to 2x between runs of one graph here.

    The 2- and 8-bit kernels at accuracy level 0 (float activations; ``w2g32``, ``w8g64``, ...), at large N
    (docs/research/latency_model.md, finding 8): the full profile samples them, the cpu target never searches
    them (its ``search_formats`` use int8 activations), and a whole-call time dominated by one of them says
    little about the rest of the call.
    """
    from llmshrink.formats import parse_format

    f = parse_format(fmt)
    return bool(f.group_size) and f.act == "none" and f.weight_bits in (2, 8)


def _grid(full: int, step: int, lo_frac: float, rng: np.random.Generator, extreme: str | None) -> int:
    choices = [w for w in range(step, full + 1, step) if w >= lo_frac * full] or [full]
    if extreme == "min":
        return choices[0]
    return int(rng.choice(choices))


def sample_spec(base: BaseShape, formats: Sequence[str], i: int, plan: ProfilePlan, *,
                lm_head: str | None = None) -> SubnetSpec:
    """Profile model ``i``: random widths and formats; model 0 has the full widths, model 1 the smallest.
    The lm_head is ``lm_head``, by default ``formats[i % len(formats)]``.

    Widths step by 32 (hidden, MLP) and 16 (head size) as the search's
    candidates do; each linear draws a format among those whose group
    divides its input width, so all of the target's kernels get sampled.
    """
    rng = np.random.default_rng([plan.seed, i])
    extreme = {0: "max", 1: "min"}.get(i)
    # The lm_head cycles through the formats, so each gets its own samples (it is
    # one op per model, but a large one); the hidden size is then drawn among the
    # widths that format's group divides.
    lm_head = lm_head or formats[i % len(formats)]
    step = math.lcm(32, parse_format(lm_head).group_size or 1)
    if extreme == "max":
        hidden = base.hidden_size
        if base.hidden_size % step:
            lm_head = next(f for f in formats if base.hidden_size % (parse_format(f).group_size or 1) == 0)
    else:
        hidden = _grid(base.hidden_size, step, plan.min_hidden_frac, rng, extreme)
        if hidden % step:  # the family is too narrow for this group: fall back to one that fits
            lm_head = next(f for f in formats if hidden % (parse_format(f).group_size or 1) == 0)

    def pick(k: int) -> str:
        ok = [f for f in formats if not parse_format(f).group_size or k % parse_format(f).group_size == 0]
        return str(rng.choice(ok)) if ok else "fp32"

    n_keep = base.num_layers if extreme == "max" else int(rng.integers(
        max(1, round(plan.min_layer_frac * base.num_layers)), base.num_layers + 1))
    keep = set(rng.choice(base.num_layers, n_keep, replace=False).tolist())
    layers = []
    for j in range(base.num_layers):
        if extreme == "max":
            kv, per, hd, mlp = base.num_kv_heads, base.heads_per_group, base.head_dim, base.intermediate_size
        elif extreme == "min":
            kv, per, hd, mlp = 1, 1, _grid(base.head_dim, 16, 0.5, rng, "min"), \
                _grid(base.intermediate_size, 32, plan.min_mlp_frac, rng, "min")
        else:
            kv = int(rng.integers(1, base.num_kv_heads + 1))
            per = int(rng.integers(1, base.heads_per_group + 1))
            hd = base.head_dim if rng.random() < 0.4 else _grid(base.head_dim, 16, 0.5, rng, None)
            mlp = _grid(base.intermediate_size, 32, plan.min_mlp_frac, rng, None)
        k_of = {"o_proj": kv * per * hd, "down_proj": mlp}
        prec = {n: pick(k_of.get(n, hidden)) for n in LINEARS}
        if rng.random() < 0.4:  # q/k/v in one format half the time: the packed qkv kernel needs samples too
            prec["k_proj"] = prec["v_proj"] = prec["q_proj"]
        layers.append(LayerSpec(j in keep, kv * per, kv, hd, mlp, prec))
    return SubnetSpec(base, hidden, tuple(layers), lm_head=lm_head).validate()


def random_model_spec(base: BaseShape, formats: Sequence[str], i: int, plan: ProfilePlan) -> SubnetSpec:
    """Random model ``i`` of a profile (:func:`sample_spec`): the first ``models - volatile_models`` draw from the
    steady formats only (model 0 at full widths and model 1 at the smallest among them), the rest from all
    ``formats`` with their lm_heads rotating through the volatile kernels (:attr:`ProfilePlan.volatile_models`).
    At most a quarter of the models are volatile ones."""
    steady = [f for f in formats if not volatile_kernel(f)] or list(formats)
    volatile = [f for f in formats if volatile_kernel(f)]
    n_steady = plan.models - (min(plan.volatile_models, plan.models // 4) if volatile else 0)
    if i < n_steady:
        return sample_spec(base, steady, i, plan)
    return sample_spec(base, volatile + steady, i, plan, lm_head=volatile[(i - n_steady) % len(volatile)])


# ----------------------------------------------------------------- running
def _once(kv, workload: Workload, prompt: np.ndarray, step: np.ndarray):
    if workload.phase == "decode":
        kv.rewind(0)
        kv.step(prompt, last_only=True, copy=False)

        def run() -> None:
            kv.rewind(workload.context)
            kv.step(step, copy=False)
    else:
        def run() -> None:
            kv.rewind(0)
            kv.step(prompt, last_only=True, copy=False)
    return run


def _run_workloads(decoder, workloads: Sequence[Workload], runs: dict[str, int], warmup_s: float,
                   vocab: int, blocks: int = 1) -> list[tuple[Workload, list[float], int]]:
    """Run each workload; return (workload, timed seconds, session runs before the timed ones)."""
    from llmshrink.exporters.timing import timed_blocks, warm_up

    max_len = max(w.context for w in workloads) + 2
    kv = decoder.kv_session(max_len)
    rng = np.random.default_rng(0)
    step = rng.integers(0, vocab, (1, 1), dtype=np.int64)
    calls, out = 0, []
    counter = {"n": 0}
    first = True
    for w in workloads:
        prompt = rng.integers(0, vocab, (1, w.context), dtype=np.int64)
        run = _once(kv, w, prompt, step)
        calls += 1 if w.phase == "decode" else 0  # the decode setup prefill

        def counted(run=run) -> None:
            run()
            counter["n"] += 1

        counter["n"] = 0
        warm_up(counted, 2, warmup_s if first else min(0.2, warmup_s))
        first = False
        calls += counter["n"]
        times = timed_blocks(run, runs[w.phase], blocks)
        out.append((w, times, calls))
        calls += len(times)
    return out


def _node_times(profile_file: str, plan_runs: list[tuple[Workload, list[float], int]],
                blocks: int = 1) -> list[dict[str, float]]:
    """Each node's time (ms) over each workload's timed runs, from ORT's profile JSON.

    The runs are split into ``blocks`` as they were timed; a node's time is
    the fastest block's trimmed mean — the node-level counterpart of the wall
    time's floor, so neither carries a slow spell of the machine.
    """
    with open(profile_file) as f:
        events = json.load(f)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    starts = [r[0] for r in runs]
    per_run: dict[int, dict[str, float]] = defaultdict(dict)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        r = bisect_right(starts, e["ts"]) - 1
        if r >= 0 and e["ts"] <= runs[r][1]:
            name = e["name"][: -len("_kernel_time")]
            per_run[r][name] = per_run[r].get(name, 0.0) + e["dur"] / 1e3
    out = []
    for _w, times, first in plan_runs:
        idx = np.arange(first, first + len(times))
        names = set().union(*(per_run[r].keys() for r in idx))
        parts = [p for p in np.array_split(idx, max(1, min(blocks, len(idx)))) if len(p)]
        out.append({n: min(_trimmed_mean([per_run[r].get(n, 0.0) for r in p]) for p in parts) for n in names})
    return out


def _trimmed_mean(xs: list[float], cut: float = 0.2) -> float:
    """Mean of the middle 60 %: robust to a burst of neighbour load, and unlike a median
    not stuck on the profiler's whole-microsecond steps for the smallest ops."""
    a = np.sort(np.asarray(xs, dtype=np.float64))
    k = int(len(a) * cut)
    return float(a[k: len(a) - k].mean()) if len(a) > 2 * k else float(a.mean())


def _entries(spec: SubnetSpec, w: Workload, nodes: dict[str, float], wall_ms: float, n: int,
             call: int = 0) -> list[OpEntry]:
    """Turn one workload's node times on one model into table entries (see module docstring).

    Every entry carries ``call`` (which profiled call it came from), so the
    table can relate node times to that call's ``wall`` entry.
    """
    kept = spec.kept_layers()
    new, past = (1, w.context) if w.phase == "decode" else (w.context, 0)
    rows = new * w.batch
    h = spec.hidden_size
    out: list[OpEntry] = []
    glue: dict[int, float] = defaultdict(float)
    for name, ms in nodes.items():
        m = _LINEAR.match(name)
        if m:
            j, which = int(m.group(1)), m.group(2)
            ls = spec.layers[kept[j]]
            q, kv = ls.num_heads * ls.head_dim, ls.num_kv_heads * ls.head_dim
            k, nn_, fmt = {"qkv": (h, q + 2 * kv, ls.precision["q_proj"]), "q": (h, q, ls.precision["q_proj"]),
                           "k": (h, kv, ls.precision["k_proj"]), "v": (h, kv, ls.precision["v_proj"]),
                           "o": (q, h, ls.precision["o_proj"]), "gate": (h, ls.intermediate_size, ls.precision["gate_proj"]),
                           "up": (h, ls.intermediate_size, ls.precision["up_proj"]),
                           "down": (ls.intermediate_size, h, ls.precision["down_proj"])}[which]
            out.append(OpEntry("linear", w.phase, {"rows": rows, "k": k, "n": nn_, "call": call}, fmt, ms, 0.0, n))
        elif name.startswith("/lm_head/MatMul"):
            out.append(OpEntry("lm_head", w.phase, {"rows": w.batch, "k": h, "n": spec.base.vocab_size, "call": call},
                               spec.lm_head, ms, 0.0, n))
        elif (m := _LAYER.match(name)) and int(m.group(1)) < len(kept):
            j = int(m.group(1))
            ls = spec.layers[kept[j]]
            if "GroupQueryAttention" in name:
                out.append(OpEntry("attention", w.phase, {"rows": new, "past": past, "heads": ls.num_heads,
                                                          "kv_heads": ls.num_kv_heads, "head_dim": ls.head_dim,
                                                          "batch": w.batch, "call": call}, "", ms, 0.0, n))
            else:
                glue[j] += ms
        # model-level nodes (embedding, mask, final norm, slice) are left to the calibrated overhead
    for j, ms in sorted(glue.items()):
        out.append(OpEntry("layer_glue", w.phase, {"rows": rows, "hidden": h, "mlp": spec.layers[kept[j]].intermediate_size,
                                                   "call": call}, "", ms, 0.0, n))
    out.append(OpEntry("wall", w.phase, {"rows": rows, "past": past, "layers": len(kept), "call": call}, "",
                       wall_ms, 0.0, n))
    return out


def host_info(threads: int | None) -> dict[str, object]:
    import onnxruntime as ort

    from llmshrink.host import cpu_features, cpu_id, cpu_model
    from llmshrink.version import __version__

    return {"cpu": cpu_model(), "cpu_id": cpu_id(), "isa": list(cpu_features()), "machine": platform.machine(),
            "cores": os.cpu_count(),
            "threads": threads or "onnxruntime default", "runtime": "onnxruntime-cpu",
            "runtime_version": ort.__version__, "llmshrink": __version__, "python": platform.python_version()}


def profile_cpu(base: BaseShape, formats: Sequence[str], *, model: str, plan: ProfilePlan = ProfilePlan(),
                threads: int | None = None, command: str = "", name: str = "cpu", target: str = "cpu",
                progress: Progress | None = None, title: str = "") -> LatencyTable:
    """Measure a latency table for ``base``'s family on this CPU (see module docstring)."""
    from llmshrink.compressor.synthetic import random_model
    from llmshrink.exporters.onnx_ort import build_ort_graph
    from llmshrink.exporters.ort_session import OrtDecoder

    progress = progress or Progress()
    entries: list[OpEntry] = []
    call = 0
    started = time.time()
    max_len = max(plan.decode_contexts + plan.prefill_contexts) + 2
    title = title or f"Profiling {plan.models} subnets of {model} on ONNX Runtime CPU"
    specs = [(i, lambda i=i: random_model_spec(base, formats, i, plan)) for i in range(plan.models)]
    specs += [(plan.models + a, lambda f=f: SubnetSpec.uniform(base, f).validate()) for a, f in enumerate(plan.anchors)]
    node_runs, node_blocks = plan.node_runs()
    with progress.task(title, total=len(specs)) as task, \
            tempfile.TemporaryDirectory(prefix="llmshrink-profile-") as tmp:
        for i, make in specs:
            spec = make()
            graph = build_ort_graph(random_model(spec, seed=i), max_length=max_len).SerializeToString()
            workloads = plan.workloads(i)
            runs = {"decode": plan.decode_runs, "prefill": plan.prefill_runs}
            # Wall times: the floor (fastest block median) of a plain session, as
            # `validate` measures; node times from a profiled session of the same graph.
            plain = _run_workloads(OrtDecoder(graph, threads=threads), workloads, runs, plan.warmup_s,
                                   base.vocab_size, blocks=plan.blocks)
            prof = OrtDecoder(graph, threads=threads, profile_prefix=os.path.join(tmp, f"m{i}"))
            timed = _run_workloads(prof, workloads, node_runs, plan.warmup_s, base.vocab_size, blocks=node_blocks)
            nodes = _node_times(prof.session.end_profiling(), timed, node_blocks)
            for (w, t, _), per_node in zip(plain, nodes, strict=True):
                entries += _entries(spec, w, per_node, floor_of(t, plan.blocks) * 1e3, len(t), call=call)
                call += 1
            del prof, graph
            task.advance(1, layers=len(spec.kept_layers()), hidden=spec.hidden_size)
    elapsed = time.time() - started
    prov = Provenance(kind="measured", date=datetime.now(UTC).isoformat(timespec="seconds"), command=command,
                      host=host_info(threads), model=model,
                      notes=(f"{plan.models} random subnets of {model} (seed {plan.seed}), built by the ort exporter "
                             "with random weights; per-node times from ORT's profiler, wall times from a plain session.",
                             f"decode contexts {list(plan.decode_contexts)}, prefill contexts {list(plan.prefill_contexts)}; "
                             f"{plan.decode_runs} decode / {plan.prefill_runs} prefill runs per workload"
                             + (f" ({node_runs['decode']} / {node_runs['prefill']} profiled)."
                                if node_blocks < plan.blocks else "."),
                             *([f"then uniform full-width models (anchors) in {', '.join(plan.anchors)}"]
                               if plan.anchors else []),
                             f"profiling took {elapsed / 60:.1f} minutes"))
    return LatencyTable(name=name, target=target, provenance=prov, entries=tuple(entries), threads=threads)


def quick_plan(models: int = 3) -> ProfilePlan:
    """A small plan for tests: few models, short contexts, few runs."""
    return replace(ProfilePlan(), models=models, decode_contexts=(8, 32), prefill_contexts=(8, 16), decode_runs=4,
                   prefill_runs=2, blocks=2, warmup_s=0.0)
