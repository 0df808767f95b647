"""`llmshrink targets`: the deployment targets and what they offer."""

from __future__ import annotations

import click

from llmshrink.cli.ui import human_bytes, kv_table, out, print_json


@click.group()
def targets() -> None:
    """Deployment targets: device, runtime, kernels, default workload, datasheet.

    \b
    Examples:
      llmshrink targets list
      llmshrink targets show a100 --json
      llmshrink targets show ./my-board.yaml
    """


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
                     "formats": list(p.formats), "latency_table": p.table} for p in profiles])
        return
    t = Table(title="Targets")
    for col in ("name", "device", "runtime", "formats", "latency table"):
        t.add_column(col)
    for p in profiles:
        t.add_row(p.name, p.device, p.runtime, f"{len(p.formats)}: {', '.join(p.formats[:4])}{'…' if len(p.formats) > 4 else ''}",
                  p.table or "none yet")
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
        d["latency_table"] = p.table or None
        print_json(d)
        return
    rows = {"device": p.device, "runtime": f"{p.runtime} ({p.flavour} flavour)", "formats": ", ".join(p.formats),
            "planned": "; ".join(p.planned) or "-", "default workload": p.default_workload.describe(),
            "memory": human_bytes(p.memory_bytes) if p.memory_bytes else "-",
            "latency table": p.table or "none yet"}
    rows.update({f"datasheet.{k}": v for k, v in p.datasheet.items()})
    out.print(kv_table(rows, title=f"{p.name}: {p.description}"))
    for s in p.sources:
        out.print(f"source: {s}", highlight=False)
    for n in p.notes:
        out.print(f"note: {n}", highlight=False)
