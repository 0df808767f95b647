"""`llmshrink plan`: what a compress run would face, from the model's config alone."""

from __future__ import annotations

import math
import re

import click

from llmshrink.cli.ui import out, print_json
from llmshrink.models.data import DEFAULT_CALIB_DATA
from llmshrink.units import human_bytes

_UNITS_BYTES = {"": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9, "gb": 1e9,
                "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_bytes(text: str | None, option: str) -> int | None:
    """``80GB`` / ``40GiB`` / ``512MiB`` -> bytes (None stays None).

    Raises:
        UsageError: not a positive size.
    """
    from llmshrink.errors import UsageError

    if text is None:
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", text.strip().lower())
    if not m or m.group(2) not in _UNITS_BYTES or float(m.group(1)) <= 0:
        raise UsageError(f"{option} {text!r} is not a memory size.", "Write e.g. 80GB or 40GiB.")
    return int(float(m.group(1)) * _UNITS_BYTES[m.group(2)])


def _seconds(s: float) -> str:
    from llmshrink.units import human_seconds

    return "-" if math.isnan(s) else human_seconds(s)


@click.command()
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Built-in model, local directory (a config.json is enough) or hub id.")
@click.option("--target", required=True, help="Built-in target (a100, h100, l4, jetson-orin, cpu) or a target YAML.")
@click.option("--latency", default=None, help="The budget to check, e.g. 30ms or 0.7xint4 (optional).")
@click.option("--workload", default=None, help="What latency means, e.g. decode:ctx=256 (default: the target's).")
@click.option("--space", "space_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A search-space YAML, as compress takes.")
@click.option("--device", default="auto", show_default=True,
              help="What compress would train on: cpu (this machine), cuda (this machine's GPUs, else the "
                   "target's own GPU), auto (cuda if present or the target is a GPU).")
@click.option("--devices", default=1, show_default=True, type=click.IntRange(1),
              help="Devices the run would use, one torchrun process each (torchrun --nproc-per-node).")
@click.option("--shard", type=click.Choice(["auto", "fsdp", "none"]), default="auto", show_default=True,
              help="As compress --shard: whether the search's supernet is sharded over the devices with FSDP.")
@click.option("--recompute", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="As compress --recompute: whether the search recomputes its blocks to fit.")
@click.option("--search-samples", default=None, type=click.IntRange(1),
              help="As compress --search-samples: architecture samples a search step draws (default 4); "
                   "torchrun processes share them.")
@click.option("--device-memory", default=None, help="Memory per device, e.g. 40GB (default: the device's own).")
@click.option("--host-memory", default=None,
              help="RAM of the machine holding the devices, e.g. 1TB (default: this one's, if it has them).")
@click.option("--calib-data", default=DEFAULT_CALIB_DATA, show_default=True,
              help="The calibration text compress would read (`self` adds the phase that samples it from the model).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model: str, target: str, latency: str | None, workload: str | None, space_path: str | None, device: str,
         devices: int, shard: str, recompute: str, search_samples: int | None, device_memory: str | None, host_memory: str | None, calib_data: str,
         as_json: bool) -> None:
    """Plan a compress run before making it: search space, latencies, memory and time per phase.

    Reads only the model's config (no weights are downloaded or loaded) and the
    target's latency table, so it answers in seconds for an 8B model on a laptop.
    It prints the search space's size, the predicted latency of the original model
    and of the fastest subnet the space reaches (and whether --latency is feasible),
    then each torch phase of compress with its peak memory per device, the host
    memory it needs besides, and a rough time, followed by the assumptions behind
    them. Memory and time are estimates from formulas, not measurements.

    \b
    Examples:
      llmshrink plan --target cpu --latency 1.15xint4-a8
      llmshrink plan --model ./Llama-3.1-8B --target a100 --latency 30ms
      llmshrink plan --model ./Llama-3.1-8B --target a100 --devices 8 --device-memory 40GB --json
    """
    from rich.table import Table

    from llmshrink import serde
    from llmshrink.compressor.plan import log10_str, make_plan
    from llmshrink.targets.workload import parse_workload

    p = make_plan(model, target, latency, workload=parse_workload(workload) if workload else None, device=device,
                  devices=devices, memory_bytes=parse_bytes(device_memory, "--device-memory"),
                  host_memory_bytes=parse_bytes(host_memory, "--host-memory"), space_path=space_path,
                  calib_data=calib_data, shard=shard, recompute=recompute,
                  search_samples=search_samples)
    if as_json:
        d = serde.to_dict(p)["_data"]
        d.update(feasible=p.feasible, fits=p.fits, total_seconds=p.total_seconds)
        print_json(d)
        return
    hw = p.hardware
    out.print(f"[bold]{p.model}[/] on [bold]{p.target}[/] ({p.workload}): {p.params / 1e9:.2f}B parameters; "
              f"search space {log10_str(p.space_log10)} subnets, {p.decisions} decisions", highlight=False)
    kind = "ANALYTICAL (a roofline from datasheet numbers, not a measurement)" if p.table_kind == "analytical" \
        else f"{p.table_kind} table"
    out.print(f"  original (uniform {p.original_format}): {p.original_ms:.2f} ms predicted; fastest reachable "
              f"subnet: {p.fastest_ms:.2f} ms  [{kind}]", highlight=False)
    if p.budget_ms is not None:
        verdict = "[green]feasible[/]" if p.feasible else "[red]INFEASIBLE[/] (below the fastest subnet)"
        out.print(f"  budget {p.budget_ms:g} ms: {verdict}" + (f"  ({p.budget_note})" if p.budget_note else ""),
                  highlight=False)
    t = Table(title=f"Phases on {hw.devices} x {hw.name} ({hw.dtype}, {human_bytes(hw.memory_bytes)} each)")
    for col, just in (("phase", "left"), ("peak / device", "right"), ("host besides", "right"),
                      ("time", "right"), ("fits", "center")):
        t.add_column(col, justify=just)
    for ph in p.phases:
        t.add_row(ph.phase, human_bytes(ph.device_bytes), human_bytes(ph.host_bytes) if ph.host_bytes else "-",
                  _seconds(ph.seconds), "yes" if ph.fits else "[red]NO[/]")
    out.print(t)
    for ph in p.phases:
        out.print(f"  {ph.phase}: {ph.holds}", highlight=False)
    total = "-" if math.isnan(p.total_seconds) else _seconds(p.total_seconds)
    out.print(f"total time {total} (one budget)", highlight=False)
    if not p.fits:
        flags = f"--devices {p.min_devices}" + (f" --search-samples {p.min_devices_samples}"
                                                 if p.min_devices_samples else "")
        need = (f"it fits on {p.min_devices} such devices ({flags})" if p.min_devices
                else "no device count up to 64 makes every phase fit")
        refuse = "; compress refuses it before loading weights (exit 7)" if hw.kind == "cpu" else ""
        out.print(f"[red]This run does not fit[/]: {need}{refuse}.")
    out.print("Assumptions:")
    for a in p.assumptions:
        out.print(f"  - {a}", highlight=False)
