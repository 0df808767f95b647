"""Facts about this machine that decide what llmshrink can do on it."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

from llmshrink import __version__, storage


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or the platform's word for it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes() -> int | None:
    """Total physical memory, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_report() -> dict[str, dict]:
    """A nested dict: system, python packages, torch/CUDA, onnxruntime, tensorrt, cache.

    Imports torch and onnxruntime; never raises for a missing optional package.
    """
    import torch

    report: dict[str, dict] = {
        "llmshrink": {"version": __version__},
        "system": {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(),
                   "memory_bytes": memory_bytes(), "python": sys.version.split()[0]},
        "packages": {d: _version(d) for d in ("torch", "transformers", "onnx", "onnxruntime",
                                              "onnxruntime-gpu", "peft", "gguf", "lm-eval")},
    }
    cuda = torch.cuda.is_available()
    report["torch"] = {"threads": torch.get_num_threads(), "cuda_available": cuda,
                       "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []}
    try:
        import onnxruntime as ort

        report["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        report["onnxruntime"] = {"version": None, "error": str(e)}
    trt_spec = importlib.util.find_spec("tensorrt")
    report["tensorrt"] = {"importable": trt_spec is not None, "version": _version("tensorrt"),
                          "usable": trt_spec is not None and cuda}
    home = storage.home()
    report["cache"] = {"path": str(home), "exists": home.exists(), "cache_bytes": storage.tree_size(home)}
    return report
