"""Facts about this machine that decide what llmshrink can do on it."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

from llmshrink import storage
from llmshrink.host import cpu_features, cpu_id, cpu_model, memory_bytes
from llmshrink.version import __version__


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_report() -> dict[str, dict]:
    """A nested dict: system, python packages, torch/CUDA, onnxruntime, tensorrt, cache.

    Imports torch and onnxruntime; never raises for a missing optional package.
    """
    import torch

    report: dict[str, dict] = {
        "llmshrink": {"version": __version__},
        "system": {"platform": platform.platform(), "cpu": cpu_model(), "cpu_id": cpu_id(),
                   "isa": list(cpu_features()), "cores": os.cpu_count(),
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
    report["cpu_table"] = cpu_table_status()
    return report


def cpu_table_status() -> dict[str, object]:
    """Which latency table the ``cpu`` target predicts with here, and whether it is this CPU's."""
    try:
        from llmshrink.targets.predict import table_for
        from llmshrink.targets.profile import load_target
        from llmshrink.targets.table import host_mismatch

        table = table_for(load_target("cpu"))
    except Exception as e:  # noqa: BLE001 - a report never raises; it says what broke
        return {"name": None, "error": str(e)}
    prov = table.provenance
    mine = host_mismatch(table) is None
    status = {("measured", True): "measured on this CPU",
              ("adapted", True): "adapted to this CPU by a quick profile (not a full one)",
              }.get((table.kind, mine), "measured on another CPU: `llmshrink targets profile cpu --quick` adapts it "
                                        "(compress does so by itself)")
    return {"name": table.name, "kind": table.kind, "date": prov.date, "measured_on": prov.host.get("cpu"),
            "status": status}
