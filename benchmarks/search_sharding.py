"""Memory and speed of the search on the default model: one process, 2 data-parallel ranks, 2 FSDP-sharded ranks,
each whole-graph and recomputing (``compress --recompute``: per-sample backwards, blocks recomputed in them).

Each mode runs in fresh interpreters (``torchrun --standalone --nproc-per-node 2`` with gloo for the two-rank
modes, one thread per rank), on the same seeded random token rows, with the search's defaults except the step
count: the supernet of the cpu target's default space (its formats rounded to nearest on the export's grid,
which hold the same memory as the run quantizer's residuals), the teacher's targets, and ``--steps`` steps.

Per rank: peak RSS (``VmHWM``) above the RSS after loading the model (before the supernet is built), while
building the supernet ("build": its grids' clip searches) and, the peak reset (``/proc/self/clear_refs``) before
each, while making the residuals and sharding ("freeze"), computing the teacher's targets ("teacher") and taking
the steps ("steps"); "kept" is the RSS after "freeze" (``freeze_weights`` gives the freed heap back to the system,
``llmshrink.host.release_freed_memory``; ``--no-trim`` shows what that saves), "search" the largest of the three
phases; and the median step time. ``--modes`` runs a subset (one, one-recompute, dp, fsdp, fsdp-recompute).
"plan" is ``plan.search_memory`` for the same rows (device + host: one memory on the CPU), what ``llmshrink
plan`` would print; the teacher's own weights are in the baseline, not above it. The
per-step KD of each mode is compared with one process's (the same steps up to the order of float sums; the
two-rank modes run one thread per rank, and the thread count alone moves it: see the README).

    python benchmarks/search_sharding.py [--steps 6] [--rows 16] [--modes fsdp-recompute,one-recompute] [--no-trim]
        [--results benchmarks/results/search_sharding_cpu.txt]
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
KEYS = dict(zip(("one", "one-recompute", "dp", "fsdp", "fsdp-recompute"), MODES, strict=True))  # --modes


def worker(out: str, steps: int, rows: int, shard: bool, recompute: bool, trim: bool) -> None:
    import torch

    from llmshrink import distributed as dist
    from llmshrink.compressor.search import SearchConfig, run_search
    from llmshrink.compressor.space import default_space
    from llmshrink.compressor.supernet import Supernet
    from llmshrink.compressor.teacher import TeacherTargets
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
    # what run_search does first (its own call is then a no-op): residuals made, layers sharded; timed apart from
    # the steps so the table tells the two peaks apart
    if not trim:  # freeze_weights gives the freed heap back; this shows what that saves
        import llmshrink.host

        llmshrink.host.release_freed_memory = lambda: False
    net.freeze_weights(shard=shard)
    frozen, frozen_now = rss("VmHWM") - baseline, rss("VmRSS") - baseline
    Path("/proc/self/clear_refs").write_text("5")
    # the teacher's targets, as run_search would make them first (every rank all rows)
    config = SearchConfig(steps=steps, verify_rows=0)
    targets = TeacherTargets(hf, calib[:, :config.seq_len], batch_size=config.batch_size)
    teacher = rss("VmHWM") - baseline
    Path("/proc/self/clear_refs").write_text("5")
    res = run_search(net, hf, calib, table=table, workload=workload, budget_ms=budget, config=config, shard=shard,
                     recompute=recompute, targets=targets)
    stepping = rss("VmHWM") - baseline
    mine = {"rank": dist.rank(), "above": max(frozen, teacher, stepping), "stepping": stepping, "built": built, "frozen": frozen, "frozen_now": frozen_now, "teacher": teacher,
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
    ap.add_argument("--no-trim", action="store_true",
                    help="keep the heap glibc holds after the residuals are made and the layers sharded (compress "
                         "gives it back: llmshrink.host.release_freed_memory)")
    ap.add_argument("--modes", default=",".join(KEYS), help="comma-separated subset of: " + ",".join(KEYS))
    ap.add_argument("--worker", nargs=3, metavar=("OUT", "SHARD", "RECOMPUTE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.steps, args.rows, args.worker[1] == "1", args.worker[2] == "1", not args.no_trim)
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

    keys = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in keys if m not in KEYS]
    if unknown:
        ap.error(f"unknown mode(s) {', '.join(unknown)}; choose from: {','.join(KEYS)}")
    chosen = [KEYS[k] for k in keys]
    res = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            n, shard, recompute = MODES[name]
            print(f"{name} ...", file=sys.stderr)
            out = Path(tmp) / "out.json"
            launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc-per-node", str(n)]
            subprocess.run([*launch, __file__, "--steps", str(args.steps), "--rows", str(args.rows),
                            *(["--no-trim"] if args.no_trim else []), "--worker", str(out), "1" if shard else "0",
                            "1" if recompute else "0"], check=True,
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

    one_kd = res[chosen[0]][0]["kd"]
    flags = (" --no-trim" if args.no_trim else "") + ("" if chosen == list(MODES) else f" --modes '{args.modes}'")
    lines = [f"$ python benchmarks/search_sharding.py --steps {args.steps} --rows {args.rows}{flags}",
             machine_line(),
             f"SmolLM2-135M, cpu target's default space ({len(space.formats)} search formats), {args.steps} search "
             f"steps on {args.rows} random rows of 128 tokens; peak RSS (VmHWM) - RSS after loading the model, "
             "building the supernet and during the search (the largest of: making the residuals and sharding, "
             "'freeze'; the teacher's targets, 'teacher'; the steps, 'steps'); 'kept': RSS above the model after "
             "'freeze'"
             + ("; freed heap kept (--no-trim)" if args.no_trim else ""),
             f"max KD diff: against {chosen[0]}",
             "",
             f"{'mode':26}{'rank':>5}{'build':>10}{'freeze':>9}{'kept':>9}{'teacher':>9}{'steps':>9}{'search':>10}{'plan':>10}"
             f"{'weights held':>14}{'step':>8}{'max KD diff':>13}"]
    for name in chosen:
        n, shard, recompute = MODES[name]
        for r in res[name]:
            diff = max(abs(a / b - 1) for a, b in zip(r["kd"], one_kd, strict=True))
            lines.append(f"{name:26}{r['rank']:>5}{human_bytes(r['built']):>10}{human_bytes(r['frozen']):>9}"
                         f"{human_bytes(r['frozen_now']):>9}{human_bytes(r['teacher']):>9}{human_bytes(r['stepping']):>9}{human_bytes(r['above']):>10}"
                         f"{human_bytes(plan(n, shard, recompute)):>10}{r['held'] / 1e6:>12.1f} M{r['step_s']:>7.1f}s"
                         f"{diff:>13.1e}")
    if set(MODES) - set(chosen):
        emit(lines, args.results)
        return
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
