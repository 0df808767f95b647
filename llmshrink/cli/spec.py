"""`llmshrink spec`: write and inspect SubnetSpecs."""

from __future__ import annotations

from pathlib import Path

import click

from llmshrink.cli.ui import out, print_json


@click.group()
def spec() -> None:
    """Subnet specs: one concrete architecture + precision plan of a model.

    \b
    Examples:
      llmshrink spec new --model smollm2-135m --uniform int4 --out int4.json
      llmshrink spec new --random 3 --out random3.json
      llmshrink spec show int4.json
    """


@spec.command("new")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help="Model the spec prunes (only its config is read).")
@click.option("--uniform", default="fp32", show_default=True, help="Format of every linear layer: fp32, w4g32, w4g32a8, w8a8, ... or int4/int8.")
@click.option("--lm-head", default=None, help="Format of the lm_head (default: same as --uniform).")
@click.option("--embedding", default="fp32", show_default=True,
              help="Format of the embedding table: fp32, fp16, or w4g*/w8g* (shares the lm_head's weights when tied and alike).")
@click.option("--random", "random_seed", type=int, default=None, help="Instead: a seeded random valid spec (for tests and benchmarks).")
@click.option("--formats", default="fp32,w4g32,w8g32,w4g32a8", show_default=True, help="With --random: the formats to draw from.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Where to write the spec JSON.")
@click.option("--trust-remote-code", is_flag=True, help="Allow code shipped with a hub model to run.")
def new(model_name: str, uniform: str, lm_head: str | None, embedding: str, random_seed: int | None, formats: str,
        out_path: Path, trust_remote_code: bool) -> None:
    """Write a spec: the unpruned model in one format, or a random subnet.

    The file is plain JSON you can edit: per layer `keep`, `num_heads`,
    `num_kv_heads`, `head_dim`, `intermediate_size` and a `precision` per
    linear layer. `llmshrink export` validates it before doing any work.

    \b
    Example:
      llmshrink spec new --uniform w4g32a8 --lm-head w8g32a8 --out plan.json
      llmshrink spec new --uniform int4-a8 --embedding w4g32 --out int4.json   # like onnxruntime-genai's int4
    """
    import dataclasses

    from llmshrink import storage
    from llmshrink.formats import parse_format
    from llmshrink.models import load_config, resolve_model
    from llmshrink.spec import BaseShape, SubnetSpec, random_spec

    for f in (uniform, lm_head, embedding):  # a typo fails before any model is fetched or read
        if f:
            parse_format(f)
    source = resolve_model(model_name)
    base = BaseShape.from_config(load_config(source, trust_remote_code=trust_remote_code))
    if random_seed is not None:
        s = random_spec(base, random_seed, formats=[f.strip() for f in formats.split(",") if f.strip()],
                        model=source.describe())
    else:
        s = SubnetSpec.uniform(base, uniform, lm_head=lm_head, model=source.describe())
    s = dataclasses.replace(s, embedding=parse_format(embedding).name).validate()
    storage.atomic_write_text(out_path, s.to_json())
    out.print(f"wrote {out_path} (spec {s.fingerprint()}, {len(s.kept_layers())}/{base.num_layers} layers kept)")


@spec.command("show")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def show(path: Path, as_json: bool) -> None:
    """Validate a spec and show its plan, one row per layer.

    \b
    Example:
      llmshrink spec show plan.json
    """
    from rich.table import Table

    from llmshrink.spec import LINEARS, load_spec, precision_summary

    s = load_spec(path)
    if as_json:
        print_json({"fingerprint": s.fingerprint(), "hidden_size": s.hidden_size, "kept_layers": s.kept_layers(),
                    "precision": precision_summary(s), "lm_head": s.lm_head})
        return
    t = Table(title=f"{path} — spec {s.fingerprint()}, hidden {s.hidden_size}/{s.base.hidden_size}, lm_head {s.lm_head}")
    for col in ("layer", "keep", "heads/kv", "head_dim", "mlp", *LINEARS):
        t.add_column(col)
    for i, ls in enumerate(s.layers):
        if ls.keep:
            t.add_row(str(i), "yes", f"{ls.num_heads}/{ls.num_kv_heads}", str(ls.head_dim), str(ls.intermediate_size),
                      *(ls.precision[n] for n in LINEARS))
        else:
            t.add_row(str(i), "[dim]dropped[/]", *([""] * (3 + len(LINEARS))))
    out.print(t)
