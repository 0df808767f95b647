"""`llmshrink plan`: the search space, latencies, and per-phase memory and time of a run, from a config alone."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmshrink.cli import cli
from llmshrink.compressor.config import CompressConfig
from llmshrink.compressor.plan import Hardware, ModelShape, estimate_phases, make_plan
from llmshrink.spec import BaseShape

CONFIGS = Path(__file__).parents[2] / "data" / "configs"
LLAMA_8B, LLAMA_1B = CONFIGS / "llama-3.1-8b", CONFIGS / "llama-3.2-1b"


def _gpu(devices: int = 1, memory_gib: float = 80) -> Hardware:
    return Hardware("cuda", "test GPU", devices, int(memory_gib * 1024**3), None, "bf16", 100.0, 10.0, 100.0,
                    2000.0, "test")


@pytest.mark.parametrize("path,params", [(LLAMA_8B, 8_030_261_248), (LLAMA_1B, 1_235_814_400)])
def test_parameter_count_from_the_config_equals_the_meta_device_model(path, params):
    """The plan counts parameters from the config; instantiating it on the meta device (no memory) agrees."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmshrink.models.info import count_params

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    # tied embeddings are one tensor: count each parameter once
    assert count_params(config) == sum(p.numel() for p in meta.parameters()) == params


def test_plan_for_llama_8b_on_a100_matches_targets_predict_and_is_feasible_at_30ms():
    runner = CliRunner()
    res = runner.invoke(cli, ["plan", "--model", str(LLAMA_8B), "--target", "a100", "--latency", "30ms", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    pred = runner.invoke(cli, ["targets", "predict", "--target", "a100", "--model", str(LLAMA_8B), "--json"])
    assert pred.exit_code == 0, pred.output
    assert plan["original_ms"] == pytest.approx(json.loads(pred.stdout)["total_ms"], rel=1e-9)
    assert plan["params"] == 8_030_261_248 and plan["space_log10"] > 100
    assert plan["fastest_ms"] < plan["original_ms"] and plan["feasible"] is True
    phases = {p["phase"]: p for p in plan["phases"]}
    assert {"importance", "teacher targets", "search", "GPTQ", "recovery", "screening", "export"} <= set(phases)
    assert "calibration text" not in phases  # the default text is read, not sampled from the 8B model
    res = runner.invoke(cli, ["plan", "--model", str(LLAMA_8B), "--target", "a100", "--latency", "30ms",
                              "--calib-data", "self", "--json"])
    sampled = {p["phase"]: p for p in json.loads(res.stdout)["phases"]}
    assert set(sampled) == set(phases) | {"calibration text"} and sampled["calibration text"]["seconds"] > 0
    # an 8B model's bf16 weights alone are 16 GB: every phase holding them needs at least that
    assert all(p["device_bytes"] >= 2 * 8_030_261_248 for p in plan["phases"] if p["phase"] != "export")
    assert plan["hardware"]["kind"] == "cuda" and any("30%" in a for a in plan["assumptions"])
    # a budget below the fastest subnet is reported infeasible (plan does not fail on it)
    res = runner.invoke(cli, ["plan", "--model", str(LLAMA_8B), "--target", "a100", "--latency", "0.5ms", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["feasible"] is False


def test_the_search_shards_where_it_does_not_fit_whole_and_the_other_phases_stay_whole():
    import transformers

    config = transformers.AutoConfig.from_pretrained(LLAMA_8B)
    from llmshrink.models.info import count_params

    shape = ModelShape(BaseShape.from_config(config), count_params(config))
    cfg = CompressConfig(model="m", target="a100", budgets_ms=(30.0,))

    def phases(hw, c=cfg, **kw):
        return {p.phase: p for p in estimate_phases(shape, c, hw, int_formats=4, **kw)}

    one, eight = phases(_gpu(1)), phases(_gpu(8))
    assert "FSDP" in eight["search"].holds and "FSDP" not in one["search"].holds
    assert eight["search"].device_bytes < one["search"].device_bytes / 3
    # data parallel: every rank holds the model whole; only its share of the rows is smaller
    assert one["recovery"].device_bytes >= eight["recovery"].device_bytes > 0.9 * one["recovery"].device_bytes
    assert eight["GPTQ"].device_bytes == one["GPTQ"].device_bytes and eight["GPTQ"].seconds == one["GPTQ"].seconds
    assert eight["search"].seconds == pytest.approx(one["search"].seconds / 8)
    # sharded, the peak is the supernet built whole with one layer's residuals: more devices stop helping
    assert phases(_gpu(64))["search"].device_bytes > shape.params * (2 + 4)
    # --shard none keeps it whole on every rank; fsdp shards even what would fit whole; auto does not
    unsharded = phases(_gpu(8), replace(cfg, shard="none"))["search"]
    assert "FSDP" not in unsharded.holds and unsharded.device_bytes > 0.9 * one["search"].device_bytes
    big = _gpu(8, memory_gib=10_000)
    assert "FSDP" not in phases(big)["search"].holds
    assert "FSDP" in phases(big, replace(cfg, shard="fsdp"))["search"].holds
    # more search steps and more residual formats cost more
    longer = phases(_gpu(1), replace(cfg, search=replace(cfg.search, steps=200)))
    assert longer["search"].seconds == pytest.approx(2 * one["search"].seconds)
    fewer = {p.phase: p for p in estimate_phases(shape, cfg, _gpu(1), int_formats=1)}
    assert fewer["search"].device_bytes < one["search"].device_bytes


def test_an_8b_search_does_not_fit_one_a100_and_the_plan_says_how_many_do():
    res = CliRunner().invoke(cli, ["plan", "--model", str(LLAMA_8B), "--target", "a100"])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())  # rich wraps at the terminal's width
    assert "does not fit" in said and "--devices 4" in said
    plan = make_plan(str(LLAMA_8B), "a100", device="cuda")
    # the supernet's fp32 copy and 5 fp32 residuals beside the bf16 original: ~26 B a parameter
    assert not plan.fits and plan.min_devices == 4
    assert [p.phase for p in plan.phases if not p.fits] == ["search"]
    assert not make_plan(str(LLAMA_8B), "a100", device="cuda", devices=2).fits
    assert make_plan(str(LLAMA_8B), "a100", device="cuda", devices=4).fits
    assert not make_plan(str(LLAMA_8B), "a100", device="cuda", devices=8, shard="none").fits
    # on 40 GB devices whole-model GPTQ (rank 0) and recovery (whole on every rank) never fit: no count helps
    small = make_plan(str(LLAMA_8B), "a100", device="cuda", devices=8, memory_bytes=40 * 10**9)
    assert not small.fits and small.min_devices is None
    assert [p.phase for p in small.phases if not p.fits] == ["search", "GPTQ", "recovery"]


def test_cpu_plan_of_the_default_model_fits_this_machine_and_times_every_phase():
    plan = make_plan("smollm2-135m", "cpu", "1.0xint4-a8", device="cpu")
    assert plan.hardware.kind == "cpu" and plan.fits and plan.feasible
    assert all(p.host_bytes == 0 for p in plan.phases)  # one memory: counted on the device
    assert all(p.seconds > 0 for p in plan.phases if p.phase != "export")


@pytest.mark.parametrize("args,code,words", [
    (["--device", "gpu"], 2, "not a device"),
    (["--device-memory", "lots"], 2, "not a memory size"),
    (["--target", "cpu", "--device", "cuda"], None, None),
])
def test_plan_bad_input(args, code, words):
    import torch

    base = ["plan", "--model", str(LLAMA_1B)] + ([] if "--target" in args else ["--target", "a100"])
    res = CliRunner().invoke(cli, base + args)
    if code is None:  # cuda for a CPU target: no GPU to plan for, unless this machine has one
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU to plan for")
        code, words = 2, "no GPU to plan for"
    assert res.exit_code == code and words in res.output, res.output
