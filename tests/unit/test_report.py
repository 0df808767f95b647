import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmshrink import api, serde
from llmshrink.cli import cli
from llmshrink.errors import UsageError, ValidationFailedError
from llmshrink.evaluation.report import QualityMetric, Report, ReportRow, build_report, plan_rows
from llmshrink.exporters.bundle import load_manifest
from llmshrink.rundir import RunEntry, RunRecord, load_run, write_record
from llmshrink.spec import SubnetSpec
from llmshrink.testing import tiny_corpus


def _pruned(base) -> SubnetSpec:
    spec = SubnetSpec.uniform(base, "w4g32a8", lm_head="fp32")
    layers = list(spec.layers)
    layers[1] = replace(layers[1], keep=False)
    layers[0] = replace(layers[0], intermediate_size=layers[0].intermediate_size // 2,
                        precision={**layers[0].precision, "down_proj": "fp32"})
    return replace(spec, layers=tuple(layers))


@pytest.fixture(scope="module")
def run_dir(tiny_llama_dir, tiny_base, tiny_table, tmp_path_factory):
    """Three real bundles of the tiny Llama, each predicted, measured and evaluated by the real commands."""
    root = tmp_path_factory.mktemp("run")
    target = str(tiny_table[1])
    text = root / "text.txt"
    text.write_text(" ".join(tiny_corpus(40, seed=5)))
    specs = {"original": None, "int4": SubnetSpec.uniform(tiny_base, "w4g32a8"), "pruned": _pruned(tiny_base)}
    for name, spec in specs.items():
        api.export(str(tiny_llama_dir), spec, root / name, target=target, max_length=128)
        try:  # the measurement is what the report reads; the verdict depends on how noisy tiny_table came out
            api.validate(root / name, tolerance_pct=1000, runs=5)
        except ValidationFailedError as e:  # recorded in the manifest all the same, as compress records it
            assert e.validation.measured_ms > 0
        res = CliRunner().invoke(cli, ["eval", str(root / name), "--ppl", str(text), "--context", "64",
                                       "--stride", "32", "--json"])
        assert res.exit_code == 0, res.output
    return root


def test_discovered_run_puts_the_original_first_and_reads_every_recorded_figure(run_dir):
    rep = build_report(run_dir)
    assert [(r.label, r.role) for r in rep.rows] == [("original", "original"), ("int4", "candidate"),
                                                     ("pruned", "candidate")]
    assert rep.metric is not None and rep.metric.name.startswith("ppl:") and not rep.metric.higher_is_better
    for r in rep.rows:
        m = load_manifest(r.path)
        assert r.predicted_ms == m.predicted_latency_ms
        assert r.measured_ms == m.measured[-1].reference_ms
        assert r.metric == m.quality[rep.metric.keys[0]]
        assert r.size_bytes == (Path(r.path) / "model.onnx").stat().st_size
    pruned = rep.rows[2]
    assert (pruned.layers_kept, pruned.layers_total) == (3, 4)
    assert rep.original.params > pruned.params


def test_cli_report_writes_markdown_with_plans_and_a_real_png(run_dir):
    res = CliRunner().invoke(cli, ["report", str(run_dir), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert [r["label"] for r in data["rows"]] == ["original", "int4", "pruned"]
    md = (run_dir / "report.md").read_text()
    assert "## Plan: pruned" in md and "## Plan: original" not in md
    assert "| 1 | dropped |" in md  # layer 1 of the pruned spec
    assert "w4g32a8 · down fp32" in md or "gate/up w4g32a8 · down fp32" in md
    assert "![quality against latency](pareto.png)" in md
    import matplotlib.image

    img = matplotlib.image.imread(run_dir / "pareto.png")
    assert img.shape[0] > 300 and img.shape[1] > 500
    assert img[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_unknown_metric_lists_the_recorded_ones(run_dir):
    with pytest.raises(UsageError, match="ppl:text.txt"):
        build_report(run_dir, metric="arc_easy:acc")


def test_run_record_sets_roles_and_labels_and_missing_bundles_are_named(run_dir, tmp_path):
    rec = RunRecord((RunEntry("int4", "baseline", "uniform int4"), RunEntry("pruned", "selected"),
                     RunEntry("original", "original")), model="tiny", target="tiny-cpu", strategy="joint",
                    budgets_ms=(1.0,))
    assert serde.loads(serde.dumps(rec)) == rec
    write_record(run_dir, rec)
    try:
        _, bundles = load_run(run_dir)
        assert [(b.label, b.entry.role) for b in bundles] == [("uniform int4", "baseline"), ("pruned", "selected"),
                                                              ("original", "original")]
        rep = build_report(run_dir)
        assert rep.pareto_labels() == ["pruned"]  # baselines and the original are not candidates
        write_record(run_dir, replace(rec, entries=rec.entries + (RunEntry("gone"),)))
        with pytest.raises(UsageError, match="gone"):
            load_run(run_dir)
    finally:
        (run_dir / "run.json").unlink()
    with pytest.raises(UsageError, match="No bundle"):
        load_run(tmp_path)
    with pytest.raises(UsageError, match="role"):
        RunEntry("x", "winner")


def test_without_quality_there_is_no_plot_and_the_report_says_so(tiny_llama_dir, tmp_path):
    api.export(str(tiny_llama_dir), None, tmp_path / "b", max_length=64)
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "no pareto.png" in res.output and not (tmp_path / "b" / "pareto.png").exists()
    assert "none recorded (run `llmshrink eval`)" in (tmp_path / "b" / "report.md").read_text()


def test_plan_rows_merge_identical_neighbours(tiny_base):
    spec = _pruned(tiny_base)
    rows = plan_rows(spec)
    assert tiny_base.num_layers == 4
    assert [r.layers for r in rows] == ["0", "1", "2-3"]
    assert rows[1].attention == "dropped"
    assert rows[0].mlp_precision == "gate/up w4g32a8 · down fp32"
    assert [r.layers for r in plan_rows(SubnetSpec.original(tiny_base))] == ["0-3"]


def _row(label, ms, q, role="candidate"):
    return ReportRow(label, role, "", "", 1, 1, "", 0, 0, "", "", None, ms, ms, "", {}, q)


def test_pareto_front_keeps_points_nothing_beats_on_both_axes():
    acc = QualityMetric("acc", ("acc",), True)
    rows = (_row("a", 1.0, 0.50), _row("b", 2.0, 0.60), _row("c", 2.5, 0.55), _row("d", 3.0, 0.70),
            _row("o", 0.5, 0.99, role="original"))
    assert Report(None, None, rows, {}, acc).pareto_labels() == ["a", "b", "d"]
    ppl = QualityMetric("ppl", ("ppl",), False)
    assert Report(None, None, rows, {}, ppl).pareto_labels() == ["a"]  # lowest perplexity and fastest
