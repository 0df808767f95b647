"""torchrun: the search and recovery over 2 gloo processes, data-parallel or with the search's weights sharded
by FSDP (also recomputing its blocks in per-sample backwards), choose what one process chooses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = str(Path(__file__).with_name("distributed_worker.py"))


def _run(out: Path, ckpt: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc-per-node", str(nproc)]
    return subprocess.run([*launcher, WORKER, str(out), str(ckpt), *extra], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    done = {}
    for name, nproc, extra in (("one", 1, ()), ("two", 2, ()), ("sharded", 2, ("--shard",)),
                               ("sharded-recompute", 2, ("--shard", "--recompute"))):
        res = _run(d / f"{name}.json", d / f"ckpt-{name}", nproc, *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        done[name] = json.loads((d / f"{name}.json").read_text())
    return d, done


def _flat(logits: dict) -> list[float]:
    return [float(x) for k in sorted(logits) for x in torch.tensor(logits[k]).flatten()]


@pytest.mark.parametrize("name", ["two", "sharded", "sharded-recompute"])
def test_two_processes_choose_the_spec_one_process_chooses(runs, name):
    _, r = runs
    one, two = r["one"], r[name]
    assert one["world"] == 1 and two["world"] == 2
    assert two["spec"] == one["spec"]
    # the same steps up to the order of float sums: gradients summed over ranks (and, recomputing, over each
    # sample's backward), not in one backward
    assert two["kd"] == pytest.approx(one["kd"], rel=1e-4)
    assert two["latency"] == pytest.approx(one["latency"], rel=1e-5)
    assert len(_flat(one["logits"])) > 80  # every decision row's logits, not an empty dict
    assert _flat(two["logits"]) == pytest.approx(_flat(one["logits"]), rel=1e-4, abs=1e-5)
    assert two["recovery"] == pytest.approx(one["recovery"], rel=1e-4)
    assert two["kd_after"] == pytest.approx(one["kd_after"], rel=1e-4)


def test_a_sharded_search_holds_about_half_the_weights_on_each_of_two_ranks(runs):
    _, r = runs
    assert r["two"]["held"] == r["one"]["held"]  # data parallel: every rank holds them all
    assert 0.45 < r["sharded"]["held"] / r["one"]["held"] < 0.6  # FSDP pads uneven rows


def test_a_sigkilled_sharded_search_resumes_and_ends_where_an_unbroken_run_ends(runs):
    d, r = runs
    ckpt = d / "killed"
    res = _run(d / "killed.json", ckpt, 2, "--die-at", "4", "--shard")
    assert res.returncode != 0 and not (d / "killed.json").exists()
    assert (ckpt / "search.ckpt").is_file()
    res = _run(d / "resumed.json", ckpt, 2, "--resume", "--shard")
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = json.loads((d / "resumed.json").read_text())
    assert resumed["resumed_from"] == 4 and len(resumed["kd"]) == 8
    assert resumed["spec"] == r["sharded"]["spec"]
    assert resumed["kd"] == pytest.approx(r["sharded"]["kd"], rel=1e-4)
    assert _flat(resumed["logits"]) == pytest.approx(_flat(r["sharded"]["logits"]), rel=1e-4, abs=1e-5)


def test_shard_fsdp_in_one_process_is_refused_before_anything_runs(tmp_path):
    from click.testing import CliRunner

    from llmshrink.cli import cli

    res = CliRunner().invoke(cli, ["compress", "--target", "cpu", "--latency", "3ms", "--shard", "fsdp",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "torchrun --nproc-per-node" in " ".join(res.output.split())
    assert not (tmp_path / "run").exists()
