"""`llmshrink doctor`: what this machine can do."""

from __future__ import annotations

import click

from llmshrink.cli.ui import kv_table, out, print_json
from llmshrink.units import human_bytes


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def doctor(as_json: bool) -> None:
    """Report Python, torch, ONNX Runtime providers, CUDA, TensorRT and the cache.

    Use it first on a new machine, and paste its --json output into bug reports.

    \b
    Example:
      llmshrink doctor --json
    """
    from llmshrink.doctor import machine_report

    report = machine_report()
    if as_json:
        print_json(report)
        return
    flat = {}
    for section, values in report.items():
        for k, v in values.items():
            if k in ("cache_bytes", "memory_bytes") and v is not None:
                v = human_bytes(v)
            if isinstance(v, list):
                v = ", ".join(map(str, v)) or "-"
            if v is None:
                v = "-"
            flat[f"{section}.{k}"] = v
    out.print(kv_table(flat, title="llmshrink doctor"))
