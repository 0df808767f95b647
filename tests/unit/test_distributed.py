"""torchrun: the search and recovery, data-parallel over 2 gloo processes, choose what one process chooses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    for nproc in (1, 2):
        res = _run(d / f"{nproc}.json", d / f"ckpt{nproc}", nproc)
        assert res.returncode == 0, res.stderr[-3000:]
        done[nproc] = json.loads((d / f"{nproc}.json").read_text())
    return d, done


def test_two_processes_choose_the_spec_one_process_chooses(runs):
    _, r = runs
    one, two = r[1], r[2]
    assert one["world"] == 1 and two["world"] == 2
    assert two["spec"] == one["spec"]
    # the same steps up to the order of float sums: gradients summed over ranks, not in one backward
    assert two["kd"] == pytest.approx(one["kd"], rel=1e-4)
    assert two["latency"] == pytest.approx(one["latency"], rel=1e-5)
    for k, v in one["logits"].items():
        assert two["logits"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    assert two["recovery"] == pytest.approx(one["recovery"], rel=1e-4)
    assert two["kd_after"] == pytest.approx(one["kd_after"], rel=1e-4)


def test_a_sigkilled_distributed_search_resumes_and_ends_where_an_unbroken_run_ends(runs):
    d, r = runs
    ckpt = d / "killed"
    res = _run(d / "killed.json", ckpt, 2, "--die-at", "4")
    assert res.returncode != 0 and not (d / "killed.json").exists()
    assert (ckpt / "search.ckpt").is_file()
    res = _run(d / "resumed.json", ckpt, 2, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = json.loads((d / "resumed.json").read_text())
    assert resumed["resumed_from"] == 4 and len(resumed["kd"]) == 8
    assert resumed["spec"] == r[2]["spec"]
    assert resumed["kd"] == pytest.approx(r[2]["kd"], rel=1e-4)
    for k, v in r[2]["logits"].items():
        assert resumed["logits"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
