import json

import numpy as np
import pytest
from click.testing import CliRunner

from llmshrink import api, serde
from llmshrink.cli import cli
from llmshrink.errors import IntegrityError, UsageError
from llmshrink.exporters.bundle import Manifest, load_manifest, verify_bundle
from llmshrink.exporters.timing import LatencyMeasurement
from llmshrink.spec import SpecError, SubnetSpec, random_spec
from llmshrink.targets.workload import Workload


@pytest.fixture(scope="module")
def int4_bundle(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "int4"
    spec_path = out.parent / "int4.json"
    from llmshrink.models import load_config
    from llmshrink.spec import BaseShape

    base = BaseShape.from_config(load_config(str(tiny_llama_dir)))
    spec_path.write_text(SubnetSpec.uniform(base, "w4g32").to_json())
    manifest = api.export(str(tiny_llama_dir), spec_path, out, max_length=64)
    return out, manifest


def test_export_writes_a_verified_bundle(int4_bundle):
    out, manifest = int4_bundle
    assert {"model.onnx", "spec.json", "tokenizer.json"} <= set(manifest.files)
    assert manifest.precision == {"w4g32": 4 * 7 + 1}
    assert manifest.parity["passed"] and manifest.parity["top1_agreement"] >= 0.99
    assert verify_bundle(out) == manifest
    assert serde.loads((out / "manifest.json").read_text()) == manifest


def test_tampered_file_is_named(int4_bundle, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(int4_bundle[0], out)
    with open(out / "spec.json", "a") as f:
        f.write(" ")
    (out / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError) as ei:
        verify_bundle(out)
    assert "spec.json (changed)" in ei.value.message and "tokenizer.json (missing)" in ei.value.message
    with pytest.raises(IntegrityError):
        api.open_bundle(out)


def test_not_a_bundle(tmp_path):
    with pytest.raises(UsageError, match="not an llmshrink bundle"):
        load_manifest(tmp_path)


def test_generate_text_matches_torch_greedy(int4_bundle, tiny_llama_dir):
    import torch

    from llmshrink.compressor.calibration_text import calibration_tokens
    from llmshrink.compressor.materialize import materialize
    from llmshrink.models import load_model, load_tokenizer, resolve_model
    from llmshrink.progress import NULL_PROGRESS

    out, manifest = int4_bundle
    b = api.open_bundle(out)
    text = "".join(api.generate_text(b, "the capital of", max_new_tokens=6, chat=False))
    tok = load_tokenizer(str(tiny_llama_dir))
    # the torch reference is the model export built: the same quantizer on the same calibration rows
    hf = load_model(str(tiny_llama_dir))
    assert manifest.quantizer == "gptq"
    calib = calibration_tokens(hf, tok, resolve_model(str(tiny_llama_dir)), "self", NULL_PROGRESS)
    cm = materialize(hf, b.spec, tok, calib=calib, quantizer=manifest.quantizer)
    ids = torch.tensor([tok("the capital of")["input_ids"]])
    expect = cm.generate(ids, 6, stop_ids=(tok.eos_token_id,))[0].tolist()
    expect = [t for t in expect if t != tok.eos_token_id]
    assert text == tok.decode(expect, skip_special_tokens=True)


def test_prompt_longer_than_max_length_is_refused(int4_bundle):
    b = api.open_bundle(int4_bundle[0])
    with pytest.raises(UsageError, match="max_length"):
        list(api.generate_text(b, "the " * 40, max_new_tokens=30, chat=False))


def test_bench_records_measurements_in_manifest(int4_bundle, tmp_path):
    import shutil

    out = tmp_path / "b"
    shutil.copytree(int4_bundle[0], out)
    ws = [Workload("decode", 1, 16), Workload("prefill", 1, 8)]
    res = api.bench(out, ws, runs=3, warmup=1, threads=1)
    assert [r.workload for r in res] == ws and all(r.median_ms > 0 and r.runs == 3 for r in res)
    again = api.bench(out, ws[:1], runs=2, warmup=0, threads=1)
    m = load_manifest(out)
    assert len(m.measured) == 2 and again[0] in m.measured  # the decode entry was replaced
    verify_bundle(out)  # updating the manifest keeps the file hashes valid
    with pytest.raises(UsageError, match="max_length"):
        api.bench(out, [Workload("decode", 1, 100)], runs=1)


def test_spec_that_breaks_a_rule_fails_before_loading_weights(tiny_llama_dir, tmp_path, monkeypatch):
    from dataclasses import replace

    from llmshrink.models import load
    from llmshrink.spec import BaseShape

    base = BaseShape.from_config(load.load_config(str(tiny_llama_dir)))
    spec = SubnetSpec.original(base)
    bad = replace(spec, layers=(replace(spec.layers[0], num_heads=3),) + spec.layers[1:])
    path = tmp_path / "bad.json"
    path.write_text(bad.to_json())

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the spec was checked")

    import llmshrink.models

    monkeypatch.setattr(load, "load_model", no_weights)
    monkeypatch.setattr(llmshrink.models, "load_model", no_weights)
    with pytest.raises(SpecError, match="heads-divisible"):
        api.export(str(tiny_llama_dir), path, tmp_path / "out")
    wrong_model = replace(spec, base=replace(base, hidden_size=128), hidden_size=128)
    with pytest.raises(SpecError, match="base-matches-model"):
        api.export(str(tiny_llama_dir), wrong_model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_spec_export_run_bench(tiny_llama_dir, tmp_path):
    runner = CliRunner()
    spec_path = tmp_path / "r.json"
    res = runner.invoke(cli, ["spec", "new", "--model", str(tiny_llama_dir), "--random", "2",
                              "--formats", "w4g32,w8a8", "--out", str(spec_path)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["spec", "show", str(spec_path), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["fingerprint"] == SubnetSpec.from_json(spec_path.read_text()).fingerprint()
    out = tmp_path / "bundle"
    res = runner.invoke(cli, ["export", "--model", str(tiny_llama_dir), "--spec", str(spec_path), "--out", str(out),
                              "--max-length", "64", "--json"])
    assert res.exit_code == 0, res.output
    manifest = json.loads(res.output)
    assert manifest["parity"]["passed"] is True and manifest["quantizer"] == "gptq"  # the default, recorded
    res = runner.invoke(cli, ["run", str(out), "--prompt", "paris", "--max-new-tokens", "4", "--no-chat"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["bench", str(out), "--workload", "decode:ctx=8", "--runs", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)[0]["workload"]["context"] == 8
    res = runner.invoke(cli, ["bench", str(out), "--workload", "decode:ctx=x"])
    assert res.exit_code == 2


def test_manifest_with_measurements_round_trips():
    lm = LatencyMeasurement(Workload(), 1.0, 2.0, 1.5, 0.1, 20, 3, 2, "onnxruntime-cpu", "1.32.0", "cpu")
    m = Manifest("ort", "builtin:x", "f", "s", 64, {"fp32": 1}, 10, {"a": "b"}, {"llmshrink": "0"}, "now",
                 measured=(lm,), parity={"max_abs_diff": 0.0})
    assert serde.loads(serde.dumps(m)) == m


def test_random_spec_export_parity_is_recorded(tiny_llama_dir, tmp_path):
    from llmshrink.models import load_config
    from llmshrink.spec import BaseShape

    base = BaseShape.from_config(load_config(str(tiny_llama_dir)))
    m = api.export(str(tiny_llama_dir), random_spec(base, 5, formats=("fp32",)), tmp_path / "b", max_length=64)
    assert m.parity["rule"].startswith("float") and m.parity["max_abs_diff"] <= 1e-3
    assert np.isfinite(m.parity["max_abs_diff"])


def test_trt_export_and_build_without_gpu_exits_5(tiny_llama_dir, tmp_path):
    import importlib.util

    import torch

    from llmshrink.models import load_config
    from llmshrink.spec import BaseShape

    base = BaseShape.from_config(load_config(str(tiny_llama_dir)))
    m = api.export(str(tiny_llama_dir), SubnetSpec.uniform(base, "w4g32", lm_head="fp16"), tmp_path / "trt",
                   flavour="trt", max_length=64)
    assert m.flavour == "trt" and m.parity["passed"]
    text = "".join(api.generate_text(api.open_bundle(tmp_path / "trt"), "paris", max_new_tokens=3, chat=False))
    assert isinstance(text, str)
    timed = api.bench(tmp_path / "trt", [Workload("decode", 1, 8), Workload("e2e", 1, 4, 2)], runs=2, warmup=0)
    assert all(t.median_ms > 0 for t in timed)
    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("this machine can build engines; tests/gpu covers it")
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "trt")])
    assert res.exit_code == 5
    assert "Cannot build or time a TensorRT engine here" in res.output


def test_large_models_go_to_external_data(tiny_llama_dir, tmp_path, monkeypatch):
    from llmshrink.exporters import bundle

    monkeypatch.setattr(bundle, "EXTERNAL_DATA_THRESHOLD", 1000)  # as if the model were over ~2 GB
    m = api.export(str(tiny_llama_dir), None, tmp_path / "b", max_length=64)
    assert {"model.onnx", "model.onnx.data"} <= set(m.files)
    assert (tmp_path / "b" / "model.onnx").stat().st_size < (tmp_path / "b" / "model.onnx.data").stat().st_size
    b = api.open_bundle(tmp_path / "b")
    logits, _ = b.decoder.forward(np.array([[5, 6, 7]]))
    assert logits.shape == (1, 3, b.spec.base.vocab_size)


def test_int8_activation_parity_tolerates_near_tie_flips_but_not_wrong_tokens(tiny_base):
    import numpy as np
    import torch

    from llmshrink.exporters.parity import check_parity
    from llmshrink.spec import SubnetSpec

    spec = SubnetSpec.original(tiny_base).with_precision("w4g32a8")
    logits = torch.randn(1, 40, 50, generator=torch.Generator().manual_seed(0))

    class Ref:  # the torch side: fixed logits per position
        def __init__(self):
            self.spec = spec

        def __call__(self, ids, past=None):
            start = 0 if past is None else past
            return logits[:, start:start + ids.shape[1]], start + ids.shape[1]

    def graph(swap):
        """The exported side: the reference with each position's top-1 and its ``swap``-th token exchanged."""
        out = logits.clone()
        order = out.argsort(-1, descending=True)
        a, b = order[..., 0:1], order[..., swap:swap + 1]
        va, vb = out.gather(-1, a), out.gather(-1, b)
        out.scatter_(-1, a, vb)
        out.scatter_(-1, b, va)

        class Dec:
            def forward(self, ids, past=None):
                start = 0 if past is None else past
                return out[:, start:start + ids.shape[1]].numpy(), start + ids.shape[1]
        return Dec()

    ids = np.arange(40)
    near = check_parity(Ref(), graph(1), ids)  # every top-1 flipped to the runner-up
    assert near.top1_agreement == 0 and near.top1_in_top5 == 1 and near.passed
    wrong = check_parity(Ref(), graph(20), ids)  # every top-1 replaced by a low-ranked token
    assert wrong.top1_in_top5 == 0 and not wrong.passed


def test_w8a8s_export_for_a100_calibrates_on_the_given_text(tiny_llama_dir, tmp_path, llmshrink_home):
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    words = ["paris", "river", "the", "city", "of", "light", "bridge", "north", "stone", "music", "old", "new"]
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words, 300)) for _ in range(200)))
    spec = tmp_path / "w8.json"
    run = CliRunner().invoke
    assert run(cli, ["spec", "new", "--model", str(tiny_llama_dir), "--uniform", "w8a8s", "--lm-head", "fp16",
                     "--out", str(spec)]).exit_code == 0
    res = run(cli, ["export", "--model", str(tiny_llama_dir), "--spec", str(spec), "--target", "a100",
                    "--calib-data", str(text), "--max-length", "64", "--out", str(tmp_path / "b"), "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.output)
    assert m["flavour"] == "trt" and m["parity"]["passed"] and m["predicted_latency_ms"] > 0
    g = onnx.load(str(tmp_path / "b" / "model.onnx"))
    scales = [numpy_helper.to_array(i) for i in g.graph.initializer if i.name.endswith(".input_scale")]
    assert len(scales) == 7 * len(api.load_spec(spec).kept_layers()) and all(s > 0 for s in scales)
    # The ort flavour has no static-scale kernel: refused before any weights load, with the alternative.
    assert run(cli, ["spec", "new", "--model", str(tiny_llama_dir), "--uniform", "w8a8s", "--lm-head", "fp32",
                     "--out", str(tmp_path / "w8-fp32-head.json")]).exit_code == 0
    res = run(cli, ["export", "--model", str(tiny_llama_dir), "--spec", str(tmp_path / "w8-fp32-head.json"),
                    "--flavour", "ort", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "w8a8 (dynamic activation scales" in res.output


def _initializers(bundle):
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(bundle / "model.onnx"))
    return {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}


def test_layer_streamed_export_writes_the_whole_model_paths_graph_without_loading_the_model(
        tiny_llama_dir, tmp_path, monkeypatch):
    """--layer-streaming on builds the pruned, GPTQ-quantized subnet from disk a layer at a time: the bundle's
    weights equal the whole-model path's to the bit, and the model is never loaded whole. auto streams only when
    the whole path would not fit in the memory available."""
    import transformers

    import llmshrink.host
    import llmshrink.models.lazy
    from llmshrink.models import load_config
    from llmshrink.spec import BaseShape

    base = BaseShape.from_config(load_config(str(tiny_llama_dir)))
    spec = tmp_path / "s.json"
    spec.write_text(random_spec(base, 3, formats=("fp32", "w4g32", "w4g32a8", "w8a8")).to_json())
    whole = api.export(str(tiny_llama_dir), spec, tmp_path / "whole", max_length=64, layer_streaming="off")
    load = transformers.AutoModelForCausalLM.from_pretrained

    def refuse(*a, **k):
        raise AssertionError("the model was loaded whole")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    res = CliRunner().invoke(cli, ["export", "--model", str(tiny_llama_dir), "--spec", str(spec), "--max-length",
                                   "64", "--layer-streaming", "on", "--out", str(tmp_path / "on"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["spec_fingerprint"] == whole.spec_fingerprint
    want, got = _initializers(tmp_path / "whole"), _initializers(tmp_path / "on")
    assert set(got) == set(want) and any("Q4" in n for n in got)
    for name, a in want.items():
        np.testing.assert_array_equal(got[name], a, err_msg=name)
    # auto: streams when the whole path would not fit, else loads the model (refused here: it must not be asked)
    monkeypatch.setattr(llmshrink.host, "available_memory_bytes", lambda: 1)
    api.export(str(tiny_llama_dir), spec, tmp_path / "auto-small", max_length=64)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)
    monkeypatch.setattr(llmshrink.host, "available_memory_bytes", lambda: 1 << 40)
    monkeypatch.setattr(llmshrink.models.lazy.LazyModel, "__init__", refuse)
    api.export(str(tiny_llama_dir), spec, tmp_path / "auto-large", max_length=64)


def test_layer_streaming_on_refuses_a_checkpoint_without_safetensors(tiny_llama_dir, tmp_path):
    import shutil

    d = tmp_path / "bin"
    shutil.copytree(tiny_llama_dir, d, ignore=shutil.ignore_patterns("*.safetensors*"))
    with pytest.raises(UsageError, match="no safetensors checkpoint to stream layers from"):
        api.export(str(d), None, tmp_path / "o", max_length=64, layer_streaming="on")


def test_layer_streamed_export_on_self_generated_text_loads_the_model_only_to_sample_it(
        tiny_llama_dir, tmp_path, monkeypatch, llmshrink_home):
    """--calib-data self: the first streamed export loads the model once to sample the text, then builds from
    disk; once the text is cached, the model is not loaded at all. The same bundle as the whole-model path."""
    import transformers

    from llmshrink.models import load_config
    from llmshrink.spec import BaseShape

    base = BaseShape.from_config(load_config(str(tiny_llama_dir)))
    spec = tmp_path / "s.json"
    spec.write_text(SubnetSpec.uniform(base, "w4g32", lm_head="w8a8").to_json())
    load = transformers.AutoModelForCausalLM.from_pretrained
    loads = []

    def counted(*a, **k):
        loads.append(a)
        return load(*a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counted)
    kw = dict(max_length=64, calib_data="self")
    api.export(str(tiny_llama_dir), spec, tmp_path / "first", layer_streaming="on", **kw)
    assert len(loads) == 1
    api.export(str(tiny_llama_dir), spec, tmp_path / "cached", layer_streaming="on", **kw)
    assert len(loads) == 1
    api.export(str(tiny_llama_dir), spec, tmp_path / "whole", layer_streaming="off", **kw)
    want = _initializers(tmp_path / "whole")
    for run in ("first", "cached"):
        got = _initializers(tmp_path / run)
        assert set(got) == set(want)
        for name, a in want.items():
            np.testing.assert_array_equal(got[name], a, err_msg=name)


def test_layer_streaming_on_refuses_a_hub_id_with_what_to_do(tmp_path):
    from llmshrink.exporters.export import streams_layers
    from llmshrink.models import resolve_model

    source = resolve_model("someorg/some-model")
    assert source.kind == "hub"
    with pytest.raises(UsageError, match="reads a local checkpoint") as e:
        streams_layers("on", source, None, 8, 16)
    assert "--local-dir" in e.value.hint
    assert streams_layers("auto", source, None, 8, 16) is False
