"""``--device``: parsing, resolution, and CUDA asked for where there is none (exit code 5, before any work)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from llmshrink.device import parse_device, resolve_device
from llmshrink.errors import MissingHardwareError, UsageError


def test_parse_device():
    assert parse_device("auto") == ("auto", None) and parse_device(" CPU ") == ("cpu", None)
    assert parse_device("cuda") == ("cuda", None) and parse_device("cuda:3") == ("cuda", 3)
    for bad in ("gpu", "cpu:1", "cuda:x", "mps"):
        with pytest.raises(UsageError):
            parse_device(bad)


def test_cpu_device_reports_this_machine():
    d = resolve_device("cpu")
    assert d.kind == "cpu" and d.dtype == "fp32" and d.memory_bytes > 0 and d.count == 1


@pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="this machine has CUDA")
def test_cuda_without_cuda_is_missing_hardware_and_auto_falls_back_to_cpu(tmp_path):
    with pytest.raises(MissingHardwareError, match="sees no CUDA device"):
        resolve_device("cuda:0")
    assert resolve_device("auto").kind == "cpu"
    from llmshrink.cli import cli

    res = CliRunner().invoke(cli, ["compress", "--target", "cpu", "--latency", "3ms", "--device", "cuda",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 5 and "no CUDA device" in res.output
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.gpu
def test_cuda_device_reports_the_gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    d = resolve_device("cuda")
    assert d.kind == "cuda" and d.memory_bytes > 0 and d.count == torch.cuda.device_count()
