"""`llmshrink targets`: the deployment targets and what they offer."""

from __future__ import annotations

from pathlib import Path

import click

from llmshrink.cli.ui import err, kv_table, out, print_json, progress, warn
from llmshrink.units import human_bytes


@click.group()
def targets() -> None:
    """Deployment targets: device, runtime, kernels, default workload, datasheet.

    \b
    Examples:
      llmshrink targets list
      llmshrink targets show a100 --json
      llmshrink targets show ./my-board.yaml
      llmshrink targets predict --target cpu --spec spec.json --workload prefill:ctx=128
      llmshrink targets profile cpu --model smollm2-135m --out cpu-table.json
    """


def _table_info(p) -> dict:
    """The target's latency table as listings show it: kind, provenance, or why there is none."""
    from llmshrink.targets.predict import NoTableError, table_for

    try:
        t = table_for(p)
    except NoTableError:
        return {"kind": "none", "name": None}
    return t.summary()


@targets.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_targets(as_json: bool) -> None:
    """List the built-in targets (a100 first).

    \b
    Example:
      llmshrink targets list --json
    """
    from rich.table import Table

    from llmshrink.targets.profile import builtin_names, load_target

    profiles = [load_target(n) for n in builtin_names()]
    if as_json:
        print_json([{"name": p.name, "device": p.device, "runtime": p.runtime, "flavour": p.flavour,
                     "formats": list(p.formats), "latency_table": {k: v for k, v in _table_info(p).items()
                                                                  if k in ("name", "kind")}} for p in profiles])
        return
    t = Table(title="Targets")
    for col in ("name", "device", "runtime", "formats", "latency table"):
        t.add_column(col)
    for p in profiles:
        info = _table_info(p)
        t.add_row(p.name, p.device, p.runtime, f"{len(p.formats)}: {', '.join(p.formats[:4])}{'…' if len(p.formats) > 4 else ''}",
                  f"{info['kind']}: {info['name']}" if info["name"] else "none yet")
    out.print(t)


@targets.command("show")
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def show(target: str, as_json: bool) -> None:
    """Show one target: kernels, default workload, datasheet numbers and their sources.

    TARGET is a built-in name or a YAML file describing your own board.

    \b
    Example:
      llmshrink targets show cpu
    """
    from llmshrink import serde
    from llmshrink.targets.profile import load_target

    p = load_target(target)
    if as_json:
        d = serde.to_dict(p)["_data"]
        d["flavour"] = p.flavour
        d["latency_table"] = _table_info(p)
        print_json(d)
        return
    rows = {"device": p.device, "runtime": f"{p.runtime} ({p.flavour} flavour)", "formats": ", ".join(p.formats),
            "planned": "; ".join(p.planned) or "-", "default workload": p.default_workload.describe(),
            "memory": human_bytes(p.memory_bytes) if p.memory_bytes else "-",
            "latency table": "none yet"}
    info = _table_info(p)
    if info["name"]:
        prov = info["provenance"]
        rows["latency table"] = f"{info['name']} — {info['kind'].upper()}"
        if info["kind"] in ("measured", "adapted"):
            host = prov.get("host", {})
            if info["kind"] == "adapted":
                rows["adapted from"] = f"{prov['sources'][0]}; {prov['adapted_from'].get('samples')} op samples here"
            rows["table host"] = f"{host.get('cpu')} · {host.get('cores')} cores · {host.get('threads')} threads · " \
                                 f"{host.get('runtime')} {host.get('runtime_version')}"
            rows["table date / model"] = f"{prov.get('date')} · {prov.get('model')}"
            rows["table command"] = prov.get("command") or "-"
        else:
            rows["table formula"] = prov.get("formula")
        rows["table entries"] = f"{info['entries']} entries, {info['cost_models']} cost models " \
                                f"(worst fit: {info['worst_fit']['op']} {info['worst_fit']['rel_rmse']:.1%})"
    rows.update({f"roofline.{k}": v for k, v in p.roofline.items()})
    rows.update({f"datasheet.{k}": v for k, v in p.datasheet.items()})
    out.print(kv_table(rows, title=f"{p.name}: {p.description}"))
    for s in p.sources:
        out.print(f"source: {s}", highlight=False)
    for n in p.notes:
        out.print(f"note: {n}", highlight=False)


@targets.command("predict")
@click.option("--target", "target_name", default="cpu", show_default=True, help="Target name or YAML.")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="Model whose shape to use when no --spec is given (only its config is read).")
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="SubnetSpec JSON (default: the original model in the target's first format).")
@click.option("--workload", default=None, help="e.g. decode:ctx=256, prefill:ctx=128, e2e:ctx=128,new=64 "
              "(default: the target's).")
@click.option("--table", "table_path", default=None, help="Predict from this table JSON instead of the target's.")
@click.option("--ops", "show_ops", is_flag=True, help="List every op, not only the per-kind breakdown.")
@click.option("--adapt", is_flag=True,
              help="When the target's table was measured on another CPU, adapt it to this one first (~3 min, "
                   "as `targets profile --quick`; kept for later runs).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: total, per-op breakdown, coverage.")
def predict_cmd(target_name: str, model_name: str, spec_path: Path | None, workload: str | None,
                table_path: str | None, show_ops: bool, adapt: bool, as_json: bool) -> None:
    """Predict a spec's latency on a target from its latency table: total and per-op breakdown.

    Coverage says how much of the predicted time comes from measured points,
    interpolation between them, an analytical roofline, or extrapolation
    beyond the table (flagged, never silent).

    \b
    Examples:
      llmshrink targets predict --target cpu --spec spec.json
      llmshrink targets predict --target a100 --model ./llama-7b --workload prefill:ctx=2048 --json
    """
    from dataclasses import replace

    from rich.table import Table

    from llmshrink import serde
    from llmshrink.errors import UsageError
    from llmshrink.spec import BaseShape, SubnetSpec, load_spec
    from llmshrink.targets.predict import predict
    from llmshrink.targets.profile import load_target
    from llmshrink.targets.table import load_table
    from llmshrink.targets.workload import parse_workload

    p = load_target(target_name)
    if spec_path is not None:
        spec = load_spec(spec_path)
    else:
        from llmshrink.models import load_config, resolve_model

        base = BaseShape.from_config(load_config(resolve_model(model_name)))
        fmt = p.formats[0]
        spec = SubnetSpec.uniform(base, fmt, model=model_name)
        if fmt in ("fp16", "fp32"):
            spec = replace(spec, embedding=fmt)
    spec.validate(allowed_formats=set(p.formats))
    w = parse_workload(workload) if workload else p.default_workload
    if adapt and table_path:
        raise UsageError("--adapt adapts the target's own table; --table names another.", "Give one of them.")
    if adapt:
        _adapt_here(p, as_json)
    pred = predict(spec, p, w, table=load_table(table_path) if table_path else None)
    if as_json:
        d = serde.to_dict(pred)["_data"]
        d["by_kind_ms"] = pred.by_kind()
        print_json(d)
        return
    t = Table(title=f"{pred.summary()}")
    t.add_column("op")
    t.add_column("ms", justify="right")
    t.add_column("share", justify="right")
    rows = [(o.name, o.ms, o.status) for o in pred.ops] if show_ops else \
        [(k, v, "") for k, v in sorted(pred.by_kind().items(), key=lambda kv: -kv[1])]
    for name, ms, status in rows:
        t.add_row(f"{name} {status}".strip(), f"{ms:.3f}", f"{ms / pred.total_ms:.1%}")
    out.print(t)
    out.print("coverage: " + ", ".join(f"{k} {v:.0%}" for k, v in pred.coverage.items()), highlight=False)
    if pred.table_kind == "analytical":
        out.print("ANALYTICAL: a roofline estimate from datasheet numbers, not a measurement.", style="yellow")
    for o in pred.extrapolated[:5]:
        warn(f"{o.name} ({o.op} {o.fmt} {o.dims}) lies outside the table's measured range: extrapolated.")


@targets.command("profile")
@click.argument("target")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="Model family to profile: its shape bounds the op grid (only its config is read).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the table JSON (default: LLMSHRINK_HOME/tables/TARGET-MODEL.json).")
@click.option("--models", "n_models", default=52, show_default=True, type=click.IntRange(2),
              help="Random subnets to build and time (more: tighter fits, longer run).")
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--seed", default=0, show_default=True)
@click.option("--quick", is_flag=True,
              help="About 3 minutes instead of 20: measure a few subnets here and adapt the target's built-in table "
                   "to this CPU (per-kernel time ratios). Written where a full profile goes, marked ADAPTED.")
@click.option("--from", "from_table", default=None,
              help="With --quick: the table to adapt (a JSON path or table name; default: the target's built-in).")
@click.option("--json", "as_json", is_flag=True, help="Print the table summary as JSON.")
def profile(target: str, model_name: str, out_path: Path | None, n_models: int, threads: int | None, seed: int,
            quick: bool, from_table: str | None, as_json: bool) -> None:
    """Measure a target's latency table on this machine.

    For `cpu` (ONNX Runtime): builds random subnets of the model family with
    the exporter itself (widths from a quarter to full, a third to all
    layers), runs decode and prefill workloads on each, and records per-op
    times from ONNX Runtime's node profiler plus each call's wall time, then
    times one uniform full-size model per anchor format. Of the 52 subnets,
    the last 12 also draw the 2- and 8-bit kernels at accuracy level 0,
    whose times swing up to 2x between runs, so most of the calls that
    calibrate node times to wall times hold only the kernels a search uses.
    About 20 minutes for SmolLM2-135M on 2 cores.

    --quick adapts a table measured elsewhere instead (the built-in one by
    default): 6 random subnets and one uniform full-size model per anchor
    format of the target timed here (about 2.5 minutes), each kernel
    family's time ratio to that table's prediction applied to its entries,
    the wall-time calibration from the calls timed here. `compress` does this by itself
    when the target's table comes from another CPU. It never replaces a full
    profile of this machine.

    For GPU targets it needs the device and TensorRT; without them it stops
    (exit 5) and the target keeps its analytical table.

    \b
    Examples:
      llmshrink targets profile cpu --model smollm2-135m --out cpu-smollm2.json
      llmshrink targets profile ./my-board.yaml --model ./my-model
      llmshrink targets profile cpu --quick
    """
    import sys
    from dataclasses import replace

    from llmshrink.errors import UsageError
    from llmshrink.models import load_config, resolve_model
    from llmshrink.spec import BaseShape
    from llmshrink.targets.profile import load_target
    from llmshrink.targets.table import profiled_table_path

    p = load_target(target)
    if p.runtime != "onnxruntime-cpu":
        from llmshrink.errors import MissingHardwareError
        from llmshrink.exporters.tensorrt import require_tensorrt

        try:
            require_tensorrt()
        except MissingHardwareError as e:
            raise MissingHardwareError(f"Cannot measure {p.name}'s latency table here: {e.message}",
                                       f"Run `llmshrink targets profile {p.name}` on a machine with the GPU and "
                                       f"TensorRT; until then {p.name} predicts from its analytical table.") from None
        raise UsageError("Measured TensorRT tables are not built yet; this target keeps its analytical table.")
    if quick:
        _profile_quick(p, from_table, out_path, threads, as_json)
        return
    if from_table:
        raise UsageError("--from names the table --quick adapts; a full profile measures from scratch.",
                         "Add --quick, or drop --from.")
    from llmshrink.targets.profilers.cpu import ProfilePlan, anchor_formats, profile_cpu

    source = resolve_model(model_name)
    base = BaseShape.from_config(load_config(source))
    short = source.describe().removeprefix("builtin:").replace("/", "_").replace(":", "_")
    out_path = out_path or profiled_table_path(f"{p.name}-{short}")
    command = "llmshrink " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("llmshrink") else " ".join(sys.argv)
    plan = replace(ProfilePlan(), models=n_models, seed=seed, anchors=anchor_formats(p.formats, p.search_formats))
    with progress(not as_json) as prog:
        table = profile_cpu(base, p.formats, model=source.describe(), plan=plan, threads=threads,
                            command=command, name=out_path.name.split(".")[0], target=p.name, progress=prog)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    table.save(out_path)
    summary = table.summary()
    summary["path"] = str(out_path)
    if as_json:
        print_json(summary)
        return
    out.print(kv_table({"table": str(out_path), "entries": summary["entries"], "cost models": summary["cost_models"],
                        "worst fit": f"{summary['worst_fit']['op']} {summary['worst_fit']['rel_rmse']:.1%}",
                        "took": table.provenance.notes[-1]}, title=f"Measured latency table for {p.name}"))
    if p.table and out_path == profiled_table_path(p.table):
        out.print(f"{p.name} now predicts with this table (it takes precedence over the built-in {p.table}).",
                  highlight=False)
    else:
        out.print(f"Use it: add `table: {out_path}` to a target YAML, or pass --table to `targets predict`.",
                  highlight=False)


def _profile_quick(p, from_table: str | None, out_path: Path | None, threads: int | None, as_json: bool) -> None:
    """``targets profile --quick``: adapt a table measured elsewhere to this CPU (:mod:`llmshrink.targets.adapt`)."""
    import sys

    from llmshrink.errors import UsageError
    from llmshrink.targets.adapt import builtin_table_path, quick_adapt
    from llmshrink.targets.table import host_mismatch, load_table, profiled_table_path

    if from_table is None and not (p.table and builtin_table_path(p.table)):
        raise UsageError(f"Target {p.name} has no built-in latency table to adapt.",
                         "Name one with --from TABLE.json, or measure a full profile (drop --quick).")
    source = load_table(from_table or builtin_table_path(p.table))
    out_path = out_path or profiled_table_path(p.table or source.name)
    if out_path.is_file():
        here = load_table(out_path)
        if here.kind == "measured" and host_mismatch(here) is None:
            raise UsageError(f"{out_path} is a full profile of this CPU; an adaptation would replace a better table.",
                             "Keep it (the target already predicts from it), or write elsewhere with --out.")
    command = "llmshrink " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("llmshrink") else " ".join(sys.argv)
    with progress(not as_json) as prog:
        table = quick_adapt(source, p.formats, search_formats=p.search_formats, anchors=p.adaptation_anchors,
                            threads=threads, command=command, progress=prog)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    table.save(out_path)
    info = table.provenance.adapted_from
    if as_json:
        print_json({"path": str(out_path), **table.summary()})
        return
    out.print(kv_table({"table": str(out_path), "adapted from": table.provenance.sources[0],
                        "samples": f"{info['samples']} op times, {info['calls']} timed calls",
                        "took": f"{info['seconds'] / 60:.1f} min",
                        "time ratio here / there": ", ".join(f"{k} {v:.2f}x" for k, v in info["phase_ratios"].items()),
                        "entries": len(table.entries)}, title=f"ADAPTED latency table for {p.name}"))
    if p.table and out_path == profiled_table_path(p.table):
        out.print(f"{p.name} now predicts with this table. A full profile (`llmshrink targets profile {p.name}`) "
                  "replaces it.", highlight=False)


def _adapt_here(p, quiet: bool) -> None:
    """Adapt target ``p``'s table to this CPU when it came from another one (``--adapt``), saying what it did."""
    from llmshrink.targets.adapt import table_for_this_cpu

    with progress(not quiet) as prog:
        local = table_for_this_cpu(p, progress=prog)
    if local.note and not quiet:
        err.print(local.note, highlight=False)
