import json
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from llmshrink.cli import cli


@pytest.fixture
def run():
    runner = CliRunner()

    def _run(*args):
        return runner.invoke(cli, list(args), catch_exceptions=False)

    return _run


def test_help_lists_commands_with_examples(run):
    res = run("--help")
    assert res.exit_code == 0
    for name in ("models", "doctor", "Examples"):
        assert name in res.output


def test_every_command_help_has_examples(run):
    for args in (["models", "list"], ["models", "pull"], ["models", "info"], ["doctor"]):
        res = run(*args, "--help")
        assert res.exit_code == 0 and "Example" in res.output, args


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from llmshrink.cli import cli\n"
            "try: cli(['--help'])\nexcept SystemExit: pass\n"
            "cli.get_command(None, 'models'); cli.get_command(None, 'doctor')\n"
            "heavy = [m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_version(run):
    res = run("--version")
    assert res.exit_code == 0 and "llmshrink" in res.output


def test_unknown_command_suggests(run):
    res = run("modles")
    assert res.exit_code == 2 and "models" in res.output


def test_models_info_json_on_local_dir(run, tiny_llama_dir):
    res = run("models", "info", str(tiny_llama_dir), "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["num_layers"] == 4 and info["num_kv_heads"] == 2 and info["tied_embeddings"] is True
    assert info["source"].startswith("local_dir:")


def test_models_info_unknown_name_exit_2_with_suggestion(run):
    res = run("models", "info", "smollm")
    assert res.exit_code == 2
    assert "Unknown model 'smollm'" in res.output and "smollm2-135m" in res.output


def test_models_info_offline_hub_id_exit_6_without_traceback(run, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    res = run("models", "info", "someone/some-model")
    assert res.exit_code == 6
    assert "cannot be reached" in res.output and "Traceback" not in res.output


def test_models_list_json_reports_cache(run, llmshrink_home):
    res = run("models", "list", "--json")
    assert res.exit_code == 0
    data = json.loads(res.output)
    assert data["cache"] == str(llmshrink_home)
    default = [m for m in data["models"] if m["default"]]
    assert default and default[0]["name"] == "smollm2-135m" and default[0]["cached"] is False


def test_doctor_json(run, llmshrink_home):
    res = run("doctor", "--json")
    assert res.exit_code == 0
    data = json.loads(res.output)
    assert "CPUExecutionProvider" in data["onnxruntime"]["providers"]
    assert data["cache"]["path"] == str(llmshrink_home)
    assert data["tensorrt"]["usable"] is False or data["torch"]["cuda_available"] is True


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "llmshrink", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "llmshrink" in res.stdout


def test_compress_help_states_the_real_step_defaults(run):
    """The defaults live in the dataclasses (the CLI passes None); the help must not drift from them."""
    from llmshrink.compressor.recover import RecoveryConfig
    from llmshrink.compressor.search import SearchConfig

    text = " ".join(run("compress", "--help").output.split())
    assert f"Search steps (default {SearchConfig().steps})" in text
    assert f"Recovery (quantization-aware distillation) steps (default {RecoveryConfig().steps})" in text
    assert f"on {RecoveryConfig().rows} calibration sequences" in text


def test_progress_in_a_log_is_plain_lines():
    import io

    from rich.console import Console

    from llmshrink.cli import ui

    buf = io.StringIO()
    p = ui.LineProgress(Console(file=buf, width=300), every=0.0)
    with p.task("Search", total=4) as t:
        t.advance(2)
        t.advance(1, info="kd 1.500 · E[lat] 3.1/3.0 ms")
    with pytest.raises(KeyboardInterrupt), p.task("Recovery", total=2):
        raise KeyboardInterrupt
    lines = buf.getvalue().splitlines()
    assert re.fullmatch(r"\[0:00:00\] Search \.\.\.", lines[0])
    assert "Search: 3/4  ETA" in lines[2] and "kd 1.500 · E[lat] 3.1/3.0 ms" in lines[2]
    assert "Search: done in 0:00:00" in lines[3] and "Recovery: stopped after" in lines[-1]
    with ui.progress() as chosen:  # under pytest stderr is no terminal: what a log file gets
        assert isinstance(chosen, ui.LineProgress)
