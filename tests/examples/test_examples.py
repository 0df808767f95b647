"""The examples/ scripts run as users run them (subprocesses on PATH), on the tiny Llama and its tiny target.

Budgets, steps and tolerances are small or loose so that each finishes in seconds on a shared
2-core machine; what is asserted is that each example does its whole job and leaves what it says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmshrink.compressor.budget import fastest_reachable
from llmshrink.compressor.space import load_space
from llmshrink.targets.predict import predict
from llmshrink.targets.profile import load_target

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SPACE = "hidden: [32, 64]\nheads_per_group: [2]\nmlp: [64, 128]\nmin_layers: 2\nformats: [fp32, w4g32a8]\n"


@pytest.fixture(scope="module")
def env(tiny_llama_dir, steady_table, tmp_path_factory):
    d = tmp_path_factory.mktemp("examples")
    e = dict(os.environ, LLMSHRINK_HOME=str(d / "home"), PATH=f"{Path(sys.executable).parent}{os.pathsep}"
             f"{os.environ.get('PATH', '')}", MODEL=str(tiny_llama_dir))
    (d / "space.yaml").write_text(SPACE)
    return d, e


def _budget(tiny_base, steady_table, d: Path, frac: float = 0.6) -> float:
    table, target_yaml = steady_table
    target = load_target(str(target_yaml))
    space = load_space(d / "space.yaml", tiny_base, target.formats)
    fastest, _ = fastest_reachable(space, target, target.default_workload, table)
    top = predict(space.largest("fp32"), target, table=table).total_ms
    return round(fastest + frac * (top - fastest), 4)


def _run(cmd, env, cwd, ok=(0,)):
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert r.returncode in ok, f"{cmd} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_quickstart_compresses_reports_validates_and_answers(env, tiny_base, steady_table):
    d, e = env
    budget = _budget(tiny_base, steady_table, d)
    e = dict(e, TARGET=str(steady_table[1]), LATENCY=f"{budget}ms", OUT=str(d / "quick"), TOLERANCE="100000%",
             MAX_NEW_TOKENS="4", EXTRA=f"--space {d / 'space.yaml'} --steps 3 --recovery-steps 1")
    r = _run(["bash", str(EXAMPLES / "quickstart.sh")], e, d)
    assert (d / "quick" / "report.md").is_file() and (d / "quick" / "pareto.png").is_file()  # quality: held-out ppl
    run = json.loads((d / "quick" / "run.json").read_text())
    run = run.get("_data", run)
    (shipped,) = [e.get("_data", e)["path"] for e in run["entries"] if e.get("_data", e)["role"] == "selected"]
    assert (d / "quick" / shipped / "manifest.json").is_file()
    assert f"{d / 'quick' / shipped}" in r.stdout + r.stderr  # the script validated and ran the shipped bundle
    assert "PASS" in r.stdout + r.stderr  # validate's verdict


def test_python_api_example_prints_every_budget(env, tiny_base, steady_table):
    d, e = env
    budgets = [str(_budget(tiny_base, steady_table, d, f)) for f in (0.5, 0.8)]
    r = _run([sys.executable, str(EXAMPLES / "python_api.py"), "--model", e["MODEL"], "--target", str(steady_table[1]),
              "--latency", *budgets, "--steps", "3", "--recovery-steps", "1", "--space", str(d / "space.yaml"),
              "--out", str(d / "api")], e, d)
    rows = [ln for ln in r.stdout.splitlines() if ln.strip().endswith(("ms", "")) and "/candidates/" in ln]
    assert len(rows) == 2 and all(" ms" in ln for ln in rows), r.stdout
    assert "->" in r.stdout  # the fastest bundle answered
    assert json.loads((d / "api" / "run.json").read_text())


def test_custom_target_is_profiled_beside_its_yaml_and_compressed_for(env, tiny_llama_dir):
    d, e = env
    work = d / "custom"
    shutil.copytree(EXAMPLES / "custom_target", work)
    # the tiny Llama has hidden 64: the example's group-64 formats fit it, and its prefill workload is kept
    e = dict(e, MODELS="6",  # one lm_head sample per format (the profiler cycles them)
             OUT=str(d / "edge-run"),
             EXTRA=f"--space {d / 'space.yaml'} --steps 3 --recovery-steps 1 --tolerance 100000%")
    r = _run(["bash", str(work / "profile.sh")], e, d)
    table = json.loads((work / "edge-box-table.json").read_text())
    assert table["_data"]["target"] == "edge-box" and table["_data"]["provenance"]["kind"] == "measured"
    assert "prefill" in r.stdout  # the prediction names the target's workload
    rec = json.loads((d / "edge-run" / "compress.json").read_text())["_data"]
    (c,) = rec["candidates"]
    assert c["predicted_ms"] <= c["budget_ms"]


def test_ci_validate_script_passes_and_fails_with_llmshrink_exit_codes(env, steady_table):
    d, e = env
    spec = d / "spec.json"
    _run(["llmshrink", "spec", "new", "--model", e["MODEL"], "--uniform", "w4g32a8", "--out", str(spec)], e, d)
    _run(["llmshrink", "export", "--model", e["MODEL"], "--spec", str(spec), "--target", str(steady_table[1]),
          "--flavour", "ort", "--out", str(d / "bundle")], e, d)
    script = str(EXAMPLES / "ci" / "validate_bundle.sh")
    r = _run(["bash", script, str(d / "bundle")], dict(e, TOLERANCE="100000%", REPORT=str(d / "ok.json")), d)
    assert "PASS" in r.stdout and json.loads((d / "ok.json").read_text())["passed"] is True
    r = _run(["bash", script, str(d / "bundle")], dict(e, TOLERANCE="0.0001%", REPORT=str(d / "bad.json")), d,
             ok=(4,))
    assert "FAIL" in r.stdout and json.loads((d / "bad.json").read_text())["passed"] is False
    r = _run(["bash", script, str(d / "bundle")], dict(e, TOLERANCE="0%", REPORT=str(d / "none.json")), d, ok=(2,))
    assert "must be positive" in r.stderr  # llmshrink's own message, no traceback from the script
    shutil.copytree(d / "bundle", d / "ref")  # relative check against the same graph: predicted ratio 1
    r = _run(["bash", script, str(d / "bundle")], dict(e, TOLERANCE="100000%", REFERENCE=str(d / "ref"),
                                                       TARGET=str(steady_table[1]), REPORT=str(d / "rel.json")), d)
    rel = json.loads((d / "rel.json").read_text())
    assert "PASS" in r.stdout and "latency / " in r.stdout
    assert rel["reference"] == str(d / "ref") and rel["predicted_ratio"] == pytest.approx(1.0)
