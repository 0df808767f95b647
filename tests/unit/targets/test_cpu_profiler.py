from collections import Counter
from dataclasses import replace

from llmshrink.spec import BaseShape
from llmshrink.targets.profilers.cpu import (
    ProfilePlan,
    _entries,
    random_model_spec,
    sample_spec,
    volatile_kernel,
)
from llmshrink.targets.workload import Workload

SMOL = BaseShape(30, 576, 9, 3, 64, 1536, 49152, True)


def _cpu_formats():
    from llmshrink.targets import load_target

    return load_target("cpu").formats


def test_sampled_specs_cover_every_format_every_lm_head_twice_and_the_extremes():
    fm, plan = _cpu_formats(), ProfilePlan()
    specs = [random_model_spec(SMOL, fm, i, plan) for i in range(plan.models)]
    full, small = specs[0], specs[1]
    assert full.hidden_size == 576 and len(full.kept_layers()) == 30
    assert all(ls.intermediate_size == 1536 and ls.num_heads == 9 for ls in full.layers)
    assert small.hidden_size == 160 and all(ls.num_heads == 1 for ls in small.layers)  # a quarter, on the 32-grid
    used = Counter(f for s in specs for i in s.kept_layers() for f in s.layers[i].precision.values())
    assert set(used) == set(fm)
    heads = Counter(s.lm_head for s in specs)
    assert all(heads[f] >= 2 for f in fm), heads
    assert min(len(s.kept_layers()) for s in specs) >= 10
    # the volatile kernels only in the last models: the others' calls calibrate (table._calibrate)
    shaky = [any(volatile_kernel(f) for f in (s.lm_head, *(p for j in s.kept_layers()
                                                         for p in s.layers[j].precision.values()))) for s in specs]
    n = plan.models - plan.volatile_models
    assert not any(shaky[:n]) and all(shaky[n:]) and plan.volatile_models == 12


def test_node_times_become_entries_of_the_right_ops():
    plan = ProfilePlan()
    spec = sample_spec(SMOL, _cpu_formats(), 5, plan)
    from llmshrink.compressor.synthetic import random_model
    from llmshrink.exporters.onnx_ort import build_ort_graph

    graph = build_ort_graph(random_model(spec), max_length=64)
    nodes = {n.name: 0.01 for n in graph.graph.node}
    w = Workload("prefill", 1, 32)
    entries = _entries(spec, w, nodes, wall_ms=100.0, n=3, call=7)
    kinds = Counter(e.op for e in entries)
    kept = len(spec.kept_layers())
    packed = sum(len({spec.layers[i].precision[n] for n in ("q_proj", "k_proj", "v_proj")}) == 1
                 for i in spec.kept_layers())
    assert kinds["attention"] == kinds["layer_glue"] == kept
    assert kinds["linear"] == kept * 7 - 2 * packed
    assert kinds["lm_head"] == kinds["wall"] == 1 and "overhead" not in kinds
    lin = [e for e in entries if e.op == "linear"]
    assert all(e.dims["rows"] == 32 for e in lin)
    assert {e.fmt for e in lin} <= {f for i in spec.kept_layers() for f in spec.layers[i].precision.values()}
    assert all(e.dims["call"] == 7 for e in entries)  # ties node times to their call's wall time
    wall = next(e for e in entries if e.op == "wall")
    assert wall.mean_ms == 100.0 and wall.dims["layers"] == kept and wall.dims["rows"] == 32
    # model-level nodes (embedding, mask, final norm) are not attributed to any op
    assert sum(e.mean_ms for e in entries if e.op != "wall") < 0.01 * len(nodes)


def test_tiny_profile_is_a_measured_table_with_provenance(tiny_table):
    table, _ = tiny_table
    assert table.kind == "measured"
    host = table.provenance.host
    assert host["runtime"] == "onnxruntime-cpu" and host["cores"] and host["runtime_version"]
    assert table.provenance.command == "pytest tiny_table" and table.provenance.date
    keys = set(table.models)
    for fmt in ("fp32", "w4g32", "w4g32a8", "w8a8"):
        assert ("lm_head", fmt) in keys
        assert table.linear_rows(fmt)[0] == 1 and len(table.linear_rows(fmt)) >= 2
    for op in ("attention", "layer_glue"):
        assert (op, "decode") in keys and (op, "prefill") in keys
    cal = table.calibration
    assert set(cal.scales) == {"decode", "prefill"} and cal.n["decode"] == 8 * 2
    assert all(s >= 0 for ph in cal.scales.values() for s in ph.values())
    assert all(e.mean_ms > 0 for e in table.entries)


def test_a_full_profile_anchors_the_search_formats_then_every_other_steady_kernel_class():
    from llmshrink.targets import load_target
    from llmshrink.targets.profilers.cpu import anchor_formats, volatile_kernel
    from llmshrink.targets.table import kernel_class

    cpu = load_target("cpu")
    anchors = anchor_formats(cpu.formats, cpu.search_formats)
    assert anchors[:len(cpu.search_formats)] == cpu.search_formats
    steady = {kernel_class("linear", f) for f in cpu.formats if not volatile_kernel(f)}
    assert {kernel_class("linear", f) for f in anchors} == steady
    assert not any(volatile_kernel(f) for f in anchors) and len(set(anchors)) == len(anchors)


def test_anchor_models_are_uniform_full_width_calls_after_the_random_ones(tiny_base):
    from dataclasses import replace

    from llmshrink.targets.profilers.cpu import profile_cpu, quick_plan

    plan = replace(quick_plan(2), anchors=("w4g32a8",))
    table = profile_cpu(tiny_base, ("fp32", "w4g32", "w4g32a8"), model="tiny-llama", plan=plan)
    per_model = len(plan.workloads(0))
    walls = sorted((e.dims["call"], e.phase, e.dims["layers"]) for e in table.entries if e.op == "wall")
    assert len(walls) == 3 * per_model
    uniform = table.uniform_calls()
    assert uniform == {(ph, c) for c, ph, _ in walls[2 * per_model:]}  # the anchor's calls, and only those
    assert all(n == tiny_base.num_layers for c, _, n in walls[2 * per_model:])
    anchored = [e for e in table.entries if (e.phase, e.dims.get("call")) in uniform and e.op == "linear"]
    assert {e.fmt for e in anchored} == {"w4g32a8"} and max(e.dims["n"] for e in anchored) == tiny_base.intermediate_size
    assert "w4g32a8" in table.provenance.notes[-2]
    bare = table.without_anchors()
    assert sum(e.op == "wall" for e in bare.entries) == 2 * per_model and bare.calibration is not None


def test_lean_anchors_are_timed_at_the_middle_contexts_only():
    """An anchor's linears are the same at every cache length: the quick plan times each at the default decode
    context and the middle prefill one, so five anchors cost about what three cost in full."""
    from llmshrink.targets.adapt import adaptation_plan

    plan = adaptation_plan(("w4g32a8", "w8a8"))
    assert plan.lean_anchors and plan.anchors == ("w4g32a8", "w8a8")
    assert len(plan.workloads(0)) == len(plan.decode_contexts) + 2  # random models: every context, as before
    for i in (plan.models, plan.models + 1):
        assert plan.workloads(i) == [Workload("decode", 1, 256), Workload("prefill", 1, 128)]
    assert len(replace(plan, lean_anchors=False).workloads(plan.models)) == len(plan.workloads(0))


def test_the_profiled_pass_runs_node_blocks_of_the_plain_pass_blocks(tiny_base, monkeypatch):
    """Node times come from a shorter profiled pass (the quick adaptation's: two of six blocks); the wall
    floor keeps every run and block, as `validate` times it."""
    from llmshrink.targets import adapt
    from llmshrink.targets.profilers import cpu

    assert ProfilePlan().node_runs() == ({"decode": 40, "prefill": 12}, 6)  # a full profile: every run
    assert adapt.adaptation_plan(()).node_runs() == ({"decode": 14, "prefill": 4}, 2)

    seen, real = [], cpu._run_workloads

    def spy(decoder, workloads, runs, warmup_s, vocab, blocks=1):
        seen.append((dict(runs), blocks))
        return real(decoder, workloads, runs, warmup_s, vocab, blocks=blocks)

    monkeypatch.setattr(cpu, "_run_workloads", spy)
    plan = replace(cpu.quick_plan(1), decode_runs=6, prefill_runs=3, blocks=3, node_blocks=1)
    table = cpu.profile_cpu(tiny_base, ("fp32", "w4g32"), model="tiny-llama", plan=plan)
    assert seen == [({"decode": 6, "prefill": 3}, 3), ({"decode": 2, "prefill": 1}, 1)]  # plain, then profiled
    assert {e.n for e in table.entries if e.op == "wall"} == {6, 3}  # walls: the plain pass's runs
    assert "(2 / 1 profiled)" in " ".join(table.provenance.notes)
