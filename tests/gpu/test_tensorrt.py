"""TensorRT engine tests: run only where TensorRT and a CUDA device exist."""

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                       reason="needs the tensorrt package and a CUDA device"),
]


def test_engine_builds_and_times_a_tiny_bundle(tiny_llama_dir, tmp_path):
    from llmshrink import api
    from llmshrink.exporters import tensorrt
    from llmshrink.models import load_config
    from llmshrink.spec import BaseShape, SubnetSpec
    from llmshrink.targets.workload import Workload

    base = BaseShape.from_config(load_config(str(tiny_llama_dir)))
    api.export(str(tiny_llama_dir), SubnetSpec.uniform(base, "w4g32", lm_head="fp16"), tmp_path / "b",
               flavour="trt", max_length=64)
    built = tensorrt.build_engine(tmp_path / "b")
    assert built.engine_path.stat().st_size > 0
    m = tensorrt.time_engine(tmp_path / "b", Workload("decode", 1, 16), runs=5, warmup=1)
    assert m.runtime == "tensorrt" and np.isfinite(m.median_ms) and m.median_ms > 0
