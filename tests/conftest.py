"""Shared fixtures: an isolated cache per test session and tiny offline models."""

from __future__ import annotations

import os
import sys

import pytest

# Tests never touch the network by accident: hub lookups see offline mode.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def llmshrink_home(tmp_path, monkeypatch):
    """Point the llmshrink cache at an empty temporary directory."""
    home = tmp_path / "llmshrink-home"
    monkeypatch.setenv("LLMSHRINK_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama (config + safetensors + tokenizer) saved once per session."""
    from llmshrink.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from llmshrink.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_hf(tiny_llama_dir):
    """The tiny Llama loaded as an HF model (treat as read-only; deepcopy to modify)."""
    from llmshrink.models import load_model

    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="session")
def tiny_base(tiny_hf):
    """The tiny Llama's BaseShape."""
    from llmshrink.spec import BaseShape

    return BaseShape.from_config(tiny_hf.config)


TINY_TABLE_FORMATS = ("fp32", "w4g32", "w4g32a8", "w8a8")


@pytest.fixture(scope="session")
def tiny_table(tiny_base, tmp_path_factory):
    """A latency table measured (quickly) on the tiny Llama's family, and a target YAML that uses it."""
    from llmshrink.targets.profilers.cpu import profile_cpu, quick_plan

    table = profile_cpu(tiny_base, TINY_TABLE_FORMATS, model="tiny-llama", plan=quick_plan(8),
                        command="pytest tiny_table", name="tiny")
    d = tmp_path_factory.mktemp("tiny-target")
    path = table.save(d / "tiny.json.gz")
    yaml_path = d / "tiny-cpu.yaml"
    yaml_path.write_text(f"""name: tiny-cpu
description: this CPU, with a table measured on the tiny test Llama
device: host CPU
runtime: onnxruntime-cpu
formats: [{", ".join(TINY_TABLE_FORMATS)}]
default_workload: decode:batch=1,ctx=16
table: {path}
""")
    return table, yaml_path


@pytest.fixture(scope="session")
def steady_table(tmp_path_factory):
    """The shipped cpu table (fixed, unlike ``tiny_table``, which is re-measured each session from a few
    noisy calls and can even predict fewer layers slower) behind a target YAML with the tiny formats: for
    tests whose budgets must sit strictly between the fastest and the largest subnet's predictions."""
    from importlib.resources import files

    from llmshrink.targets.table import load_table

    # by path, not by name: a table `targets profile` wrote into this machine's home takes precedence by name
    shipped = str(files("llmshrink.targets") / "tables" / "cpu-smollm2-135m.json.gz")
    d = tmp_path_factory.mktemp("steady-target")
    yaml_path = d / "steady-cpu.yaml"
    yaml_path.write_text(f"""name: steady-cpu
description: this CPU, predicted from the shipped SmolLM2-family table (extrapolated to tiny shapes)
device: host CPU
runtime: onnxruntime-cpu
formats: [{", ".join(TINY_TABLE_FORMATS)}]
default_workload: decode:batch=1,ctx=16
table: {shipped}
""")
    return load_table(shipped), yaml_path


def pytest_terminal_summary(terminalreporter):
    """After the run: the bad-input catalogue (tests/unit/cli/test_bad_input.py), each case with its exit code."""
    rows = next((m.CATALOGUE for name, m in list(sys.modules.items())
                 if name.endswith("test_bad_input") and getattr(m, "CATALOGUE", None)), None)
    if not rows:
        return
    terminalreporter.section("bad-input catalogue: exit code, case, first line of the message")
    for case, code, first in rows:
        terminalreporter.write_line(f"{code:>4}  {case:<48} {first[:90]}")


@pytest.fixture(scope="session")
def trained_tiny():
    """(model, tokenizer, held-out ids [N, 32]) of a tiny Llama trained on the tiny corpus (read-only)."""
    from llmshrink.testing import trained_tiny_llama

    return trained_tiny_llama()
