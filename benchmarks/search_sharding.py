"""Memory and speed of the search on the default model: one process, 2 data-parallel ranks, 2 FSDP-sharded ranks,
each whole-graph and recomputing (``compress --recompute``: per-sample backwards, blocks recomputed in them).

Each mode runs in fresh interpreters (``torchrun --standalone --nproc-per-node 2`` with gloo for the two-rank
modes, one thread per rank), on the same seeded random token rows, with the search's defaults except the step
count: the supernet of the cpu target's default space (its formats rounded to nearest on the export's grid,
which hold the same memory as the run quantizer's residuals), the teacher's targets, and ``--steps`` steps.

Per rank: peak RSS (``VmHWM``) above the RSS after loading the model (before the supernet is built), while
building the supernet ("build": its grids' clip searches) and, the peak reset (``/proc/self/clear_refs``), during
the search itself ("search": its residuals and steps), and the median step time. "plan" is ``plan.search_memory`` for the same rows (device + host: one memory on the CPU),
what ``llmshrink plan`` would print; the teacher's own weights are in the baseline, not above it. The
per-step KD of each mode is compared with one process's (the same steps up to the order of float sums; the
two-rank modes run one thread per rank, and the thread count alone moves it: see the README).

    python benchmarks/search_sharding.py [--steps 6] [--rows 16] [--results benchmarks/results/search_sharding_cpu.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _cli import emit, machine_line

# name -> (processes, sharded, recompute)
MODES = {"one process": (1, False, False), "one process, recompute": (1, False, True),
         "2 ranks, data parallel": (2, False, False), "2 ranks, FSDP": (2, True, False),
         "2 ranks, FSDP, recompute": (2, True, True)}


def worker(out: str, steps: int, rows: int, shard: bool, recompute: bool) -> None:
    import torch

    from llmshrink import distributed as dist
    from llmshrink.compressor.search import SearchConfig, run_search
    from llmshrink.compressor.space import default_space
    from llmshrink.compressor.supernet import Supernet
    from llmshrink.models import load_model, resolve_model
    from llmshrink.spec import BaseShape
    from llmshrink.targets.predict import predict, table_for
    from llmshrink.targets.profile import load_target

    dist.init_from_env()
    if dist.world_size() > 1:
        torch.set_num_threads(1)  # the ranks share the cores

    def rss(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    src = resolve_model("smollm2-135m")
    hf = load_model(src)
    base = BaseShape.from_config(hf.config)
    target = load_target("cpu")
    space = default_space(base, target.formats, search_formats=target.search_formats or target.formats)
    table, workload = table_for(target), target.default_workload
    budget = 0.85 * predict(space.largest("w4g32a8"), target, workload, table=table).total_ms
    calib = torch.randint(3, base.vocab_size, (rows, 128), generator=torch.Generator().manual_seed(0))
    baseline = rss("VmRSS")
    net = Supernet(hf, space)
    built = rss("VmHWM") - baseline
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    res = run_search(net, hf, calib, table=table, workload=workload, budget_ms=budget,
                     config=SearchConfig(steps=steps, verify_rows=0), shard=shard, recompute=recompute)
    mine = {"rank": dist.rank(), "above": rss("VmHWM") - baseline, "built": built,
            "step_s": statistics.median(h.seconds for h in res.history), "kd": [h.kd for h in res.history],
            "held": sum(getattr(p, "_local_tensor", p).numel() for p in net.parameters())}
    everyone: list = [None] * dist.world_size()
    if dist.world_size() > 1:
        torch.distributed.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    if dist.is_main():
        Path(out).write_text(json.dumps(everyone))
    dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rows", type=int, default=16, help="random token rows of 128 (the search's halves: 8 each)")
    ap.add_argument("--results", default=None)
    ap.add_argument("--worker", nargs=3, metavar=("OUT", "SHARD", "RECOMPUTE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.steps, args.rows, args.worker[1] == "1", args.worker[2] == "1")
        return

    from llmshrink.compressor.config import CompressConfig
    from llmshrink.compressor.plan import Hardware, ModelShape, _residual_formats, search_memory
    from llmshrink.compressor.search import SearchConfig
    from llmshrink.compressor.space import default_space
    from llmshrink.models import load_config, resolve_model
    from llmshrink.models.info import count_params
    from llmshrink.spec import BaseShape
    from llmshrink.targets.profile import load_target
    from llmshrink.units import human_bytes

    res = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (n, shard, recompute) in MODES.items():
            print(f"{name} ...", file=sys.stderr)
            out = Path(tmp) / "out.json"
            launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc-per-node", str(n)]
            subprocess.run([*launch, __file__, "--steps", str(args.steps), "--rows", str(args.rows),
                            "--worker", str(out), "1" if shard else "0", "1" if recompute else "0"], check=True,
                           env=env if n > 1 else os.environ)
            res[name] = json.loads(out.read_text())
    config = load_config(resolve_model("smollm2-135m"))
    base = BaseShape.from_config(config)
    target = load_target("cpu")
    space = default_space(base, target.formats, search_formats=target.search_formats or target.formats)
    shape = ModelShape(base, count_params(config))
    cfg = CompressConfig(model="smollm2-135m", target="cpu", budgets_ms=(1.0,), n_calib=args.rows, quantizer="rtn",
                         search=SearchConfig(steps=args.steps))

    def plan(n: int, shard: bool, recompute: bool = False) -> int:
        hw = Hardware("cpu", "", n, 0, None, "fp32", 0.0, 0.0, 0.0, None, "")
        device, host = search_memory(shape, cfg, hw, int_formats=_residual_formats(space),
                                     search_formats=len(space.formats), sharded=shard, recompute=recompute)
        return device + host - shape.params * 4  # the teacher is loaded before the baseline

    one_kd = res["one process"][0]["kd"]
    lines = [f"$ python benchmarks/search_sharding.py --steps {args.steps} --rows {args.rows}",
             machine_line(),
             f"SmolLM2-135M, cpu target's default space ({len(space.formats)} search formats), {args.steps} search "
             f"steps on {args.rows} random rows of 128 tokens; peak RSS (VmHWM) - RSS after loading the model, "
             "building the supernet and during the search",
             "",
             f"{'mode':26}{'rank':>5}{'build':>10}{'search':>11}{'plan':>11}{'weights held':>14}{'step':>8}{'max KD diff':>13}"]
    for name, (n, shard, recompute) in MODES.items():
        for r in res[name]:
            diff = max(abs(a / b - 1) for a, b in zip(r["kd"], one_kd, strict=True))
            lines.append(f"{name:26}{r['rank']:>5}{human_bytes(r['built']):>10}{human_bytes(r['above']):>11}{human_bytes(plan(n, shard, recompute)):>11}"
                         f"{r['held'] / 1e6:>12.1f} M{r['step_s']:>7.1f}s{diff:>13.1e}")
    dp = max(r["above"] for r in res["2 ranks, data parallel"])
    fsdp = max(r["above"] for r in res["2 ranks, FSDP"])
    lean = max(r["above"] for r in res["2 ranks, FSDP, recompute"])
    one, one_lean = res["one process"][0], res["one process, recompute"][0]
    lines += ["", f"per-rank peak above the model, data parallel / FSDP: {dp / fsdp:.2f}x "
                  f"(plan: {plan(2, False) / plan(2, True):.2f}x); data parallel / FSDP + recompute: {dp / lean:.2f}x "
                  f"(plan: {plan(2, False) / plan(2, True, True):.2f}x)",
              f"one process, whole / recompute: peak {one['above'] / one_lean['above']:.2f}x "
              f"(plan: {plan(1, False) / plan(1, False, True):.2f}x), step {one_lean['step_s'] / one['step_s']:.2f}x "
              "slower recomputing"]
    emit(lines, args.results)


if __name__ == "__main__":
    main()
