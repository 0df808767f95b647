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
    # without recomputation (its own test below): sharding alone decides what a device holds
    cfg = CompressConfig(model="m", target="a100", budgets_ms=(30.0,), recompute="off")

    def phases(hw, c=cfg, **kw):
        return {p.phase: p for p in estimate_phases(shape, c, hw, int_formats=4, **kw)}

    one, four = phases(_gpu(1)), phases(_gpu(4))
    assert "FSDP" in four["search"].holds and "FSDP" not in one["search"].holds
    assert four["search"].device_bytes < 0.4 * one["search"].device_bytes  # the root unit stays whole
    # data parallel: every rank holds the model whole; only its share of the rows is smaller
    assert one["recovery"].device_bytes >= four["recovery"].device_bytes > 0.9 * one["recovery"].device_bytes
    assert four["GPTQ"].device_bytes == one["GPTQ"].device_bytes and four["GPTQ"].seconds == one["GPTQ"].seconds
    assert four["search"].seconds == pytest.approx(one["search"].seconds / 4)
    # the search shares 4 architecture samples a step: more processes than that are refused, so never fit
    eight = phases(_gpu(8))["search"]
    assert not eight.fits and "refused" in eight.holds
    # sharded, each sample's effective weights stay whole: the peak never falls below weights + one copy
    assert four["search"].device_bytes > shape.params * (2 + 4 + 4)
    # --shard none keeps it whole on every rank; fsdp shards even what would fit whole; auto does not
    unsharded = phases(_gpu(4), replace(cfg, shard="none"))["search"]
    assert "FSDP" not in unsharded.holds and unsharded.device_bytes > 1.8 * four["search"].device_bytes
    big = _gpu(4, memory_gib=10_000)
    assert "FSDP" not in phases(big)["search"].holds
    assert "FSDP" in phases(big, replace(cfg, shard="fsdp"))["search"].holds
    # more search steps and more residual formats cost more
    longer = phases(_gpu(1), replace(cfg, search=replace(cfg.search, steps=200)))
    assert longer["search"].seconds == pytest.approx(2 * one["search"].seconds)
    fewer = {p.phase: p for p in estimate_phases(shape, cfg, _gpu(1), int_formats=1)}
    assert fewer["search"].device_bytes < one["search"].device_bytes


def test_an_8b_search_fits_on_8_a100s_only_by_recomputing_and_sharding_and_the_plan_says_so():
    """Without recomputation the search keeps a model-sized fp32 effective weight per sampled forward (whole,
    sharded or not): 8B's search fits on no number of A100 80GB, and the plan says so instead of naming a count
    that would fail. Recomputing its blocks (the default where needed) and sharded, it fits on 8, each drawing
    one of 8 samples a step; on 4 the whole root unit FSDP keeps between forward and backward (embedding,
    lm_head and its residuals) and the prefetched layer leave it over."""
    res = CliRunner().invoke(cli, ["plan", "--model", str(LLAMA_8B), "--target", "a100", "--recompute", "off"])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())  # rich wraps at the terminal's width
    assert "does not fit" in said and "no device count" in said
    plan = make_plan(str(LLAMA_8B), "a100", device="cuda", recompute="off")
    assert not plan.fits and plan.min_devices is None
    assert [p.phase for p in plan.phases if not p.fits] == ["search"]
    # recomputing where it must: the plan names the count and the samples it takes
    res = CliRunner().invoke(cli, ["plan", "--model", str(LLAMA_8B), "--target", "a100"])
    said = " ".join(res.output.split())
    assert res.exit_code == 0 and "fits on 8 such devices (--devices 8 --search-samples 8)" in said
    four = make_plan(str(LLAMA_8B), "a100", device="cuda", devices=4, search_samples=8)
    assert [p.phase for p in four.phases if not p.fits] == ["search"]
    # 8 A100s: refused with the default 4 samples a step, fits when the step draws 8 (a row each)
    refused = {p.phase: p for p in make_plan(str(LLAMA_8B), "a100", device="cuda", devices=8).phases}["search"]
    assert not refused.fits and "--search-samples 8" in refused.holds
    eight = make_plan(str(LLAMA_8B), "a100", device="cuda", devices=8, search_samples=8)
    search = {p.phase: p for p in eight.phases}["search"]
    assert eight.fits and "recomputed" in search.holds and "FSDP" in search.holds
    # recomputing costs the search about one more forward a step (3 -> 4 forward-equivalents)
    off = make_plan(str(LLAMA_8B), "a100", device="cuda", devices=8, search_samples=8, recompute="off")
    assert search.seconds == pytest.approx({p.phase: p for p in off.phases}["search"].seconds * 4 / 3)
    res = CliRunner().invoke(cli, ["plan", "--model", str(LLAMA_8B), "--target", "a100", "--devices", "8",
                                   "--search-samples", "8", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["fits"] is True
    # on 40 GB devices whole-model GPTQ (rank 0) and recovery (whole on every rank) do not fit
    small = make_plan(str(LLAMA_8B), "a100", device="cuda", devices=8, search_samples=8, memory_bytes=40 * 10**9)
    assert {"GPTQ", "recovery"} <= {p.phase for p in small.phases if not p.fits}
    # a 1B model fits on one A100 80GB, whole, without recomputing; 8 processes would be refused by the search
    one_b = make_plan(str(LLAMA_1B), "a100", device="cuda")
    assert one_b.fits and "recomputed" not in {p.phase: p for p in one_b.phases}["search"].holds
    assert not make_plan(str(LLAMA_1B), "a100", device="cuda", devices=8).fits


def test_recompute_auto_takes_the_cheapest_mode_that_fits():
    """Whole before recomputing before sharding; on and fsdp force theirs; recomputing holds far less."""
    import transformers

    from llmshrink.compressor.plan import SearchMode, search_memory, search_mode
    from llmshrink.models.info import count_params

    config = transformers.AutoConfig.from_pretrained(LLAMA_1B)
    shape = ModelShape(BaseShape.from_config(config), count_params(config))
    cfg = CompressConfig(model="m", target="a100", budgets_ms=(30.0,))
    kw = dict(int_formats=4)
    whole, lean = (search_memory(shape, cfg, _gpu(1), recompute=r, **kw)[0] for r in (False, True))
    assert lean < 0.75 * whole
    between = _gpu(1, memory_gib=(whole + lean) / 2 / 0.9 / 1024**3)  # fits recomputing only
    assert search_mode(shape, cfg, _gpu(1, 10_000), **kw) == SearchMode(False, False)
    assert search_mode(shape, cfg, between, **kw) == SearchMode(False, True)
    assert search_mode(shape, replace(cfg, recompute="on"), _gpu(1, 10_000), **kw) == SearchMode(False, True)
    assert search_mode(shape, replace(cfg, recompute="off"), between, **kw) == SearchMode(False, False)
    small = replace(between, devices=2, memory_bytes=between.memory_bytes // 4)
    assert search_mode(shape, cfg, small, **kw).sharded
    assert search_mode(shape, replace(cfg, shard="none"), small, **kw) == SearchMode(False, True)


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
