"""Calibration and evaluation text, tokenized into fixed-length sequences.

A data spec (``--calib-data``) is one of:

* ``wiki`` (the default, :data:`DEFAULT_CALIB_DATA`), or another built-in corpus
  (:mod:`.corpora`): real text fetched once from the package index and cached.
  Measured against ``self`` on the default model (README "Calibration data").
* ``self``: text sampled from the model being compressed, as
  in LLM-QAT (Liu et al., 2023): the first token uniform over the ordinary
  vocabulary, the next few greedy, the rest sampled at temperature 1. It
  needs nothing but the model, works offline for any model, and cannot
  overlap any benchmark.
* a local ``.txt`` (documents separated by blank lines; a file without
  blank lines has one document per line), ``.jsonl`` (one JSON
  object per line, text in ``text_field``) or ``.parquet`` file;
* a Hugging Face dataset id (``ID`` or ``ID:CONFIG``; needs the ``data``
  extra and a reachable hub or a local datasets cache).

Calibration and evaluation sequences are disjoint by construction: whole
documents are assigned to one side by a hash of their text (identical
documents land on the same side); self-generated calibration and
evaluation sequences come from two seeded streams. Everything is
deterministic given the seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llmshrink.errors import MissingExtraError, UsageError
from llmshrink.progress import NULL_PROGRESS, Progress

log = logging.getLogger("llmshrink")

DataKind = Literal["self", "builtin", "file", "hf"]
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_SEQ_LEN = 256
DEFAULT_N_CALIB = 128
DEFAULT_N_EVAL = 32
DEFAULT_CALIB_DATA = "wiki"  # what --calib-data means when not given (compress, export, data show): README "Calibration data"
GREEDY_PREFIX = 3  # LLM-QAT: the first tokens after the random start are taken greedily


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--calib-data`` value."""

    kind: DataKind
    ref: str = ""
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    def describe(self) -> str:
        if self.kind == "self":
            return "self (text sampled from the model)"
        if self.kind == "builtin":
            from llmshrink.models.corpora import BUILTIN_CORPORA

            corpus = BUILTIN_CORPORA.get(self.ref)
            return f"{self.ref} ({corpus.description}; {corpus.license})"
        if self.kind == "file":
            return f"file:{self.ref}"
        cfg = f":{self.config}" if self.config else ""
        return f"hf:{self.ref}{cfg}[{self.split}]"


def parse_data_spec(spec: str, *, split: str = "train", text_field: str = "text") -> DataSpec:
    """Parse ``--calib-data``: ``self``, a built-in corpus name, a local file, or an HF dataset id.

    Raises:
        UsageError: a path that does not exist or has an unsupported suffix.
    """
    spec = (spec or DEFAULT_CALIB_DATA).strip()
    if spec == "self":
        return DataSpec("self")
    from llmshrink.models.corpora import BUILTIN_CORPORA

    if spec in BUILTIN_CORPORA:
        return DataSpec("builtin", spec, text_field=text_field)
    path = Path(spec).expanduser()
    if path.exists():
        if path.suffix not in FILE_SUFFIXES:
            raise UsageError(f"{path} has suffix {path.suffix!r}; calibration files must be one of {', '.join(FILE_SUFFIXES)}.")
        return DataSpec("file", str(path.resolve()), text_field=text_field)
    if spec.startswith((".", "/", "~")) or spec.endswith(FILE_SUFFIXES):
        raise UsageError(f"No such calibration file: {spec}.", "Pass an existing .txt/.jsonl/.parquet file, `self`, or an HF dataset id.")
    ds_id, _, config = spec.partition(":")
    return DataSpec("hf", ds_id, config or None, split=split, text_field=text_field)


def read_documents(spec: DataSpec, *, max_chars: int = 20_000_000, progress: Progress = NULL_PROGRESS) -> list[str]:
    """Read the documents of a file or HF dataset spec (not ``self``), in order.

    Stops after ``max_chars`` characters in all. Empty documents are dropped.
    """
    if spec.kind == "builtin":
        from llmshrink.models.corpora import BUILTIN_CORPORA, ensure_corpus

        docs = _read_file(ensure_corpus(BUILTIN_CORPORA.get(spec.ref), progress=progress), "text")
    elif spec.kind == "file":
        docs = _read_file(Path(spec.ref), spec.text_field)
    elif spec.kind == "hf":
        docs = _read_hf(spec)
    else:
        raise ValueError("self-generated data has no documents to read")
    out, total = [], 0
    for d in docs:
        d = d.strip()
        if not d:
            continue
        out.append(d)
        total += len(d)
        if total >= max_chars:
            break
    if not out:
        raise UsageError(f"{spec.describe()} holds no text.")
    return out


def _read_file(path: Path, text_field: str) -> list[str]:
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        docs = text.split("\n\n")
        # A file with no blank lines (one paragraph per line, like WikiText's
        # raw dumps) would otherwise be one document: take its lines instead.
        return docs if len(docs) > 1 else text.split("\n")
    if path.suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{lineno} is not valid JSON: {e}.") from e
                if not isinstance(rec, dict) or text_field not in rec:
                    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                    raise UsageError(f"{path}:{lineno} has no field {text_field!r} (found {keys}).",
                                     "Name the text field with --text-field.")
                docs.append(str(rec[text_field]))
        return docs
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MissingExtraError("Reading .parquet needs pyarrow, which is not installed.",
                                "Install the data extra: pip install 'llmshrink[data]'") from e
    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise UsageError(f"{path} has no column {text_field!r} (found {table.column_names}).",
                         "Name the text column with --text-field.")
    return [str(x) for x in table.column(text_field).to_pylist()]


def _read_hf(spec: DataSpec) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise MissingExtraError(f"Loading the HF dataset {spec.ref!r} needs the `datasets` package.",
                         "pip install 'llmshrink[data]', or pass a local .txt/.jsonl/.parquet file, or `self`.") from e
    from llmshrink.errors import RemoteUnavailableError
    from llmshrink.models.hub import hub_reachable

    try:
        ds = datasets.load_dataset(spec.ref, spec.config, split=spec.split)
    except Exception as e:  # datasets raises many types; report them all the same way
        if not hub_reachable():
            raise RemoteUnavailableError(
                f"Dataset {spec.ref!r} is not cached locally and the hub cannot be reached.",
                "Pass a local .txt/.jsonl/.parquet file, or use the default `self`.") from e
        raise UsageError(f"Could not load dataset {spec.describe()}: {e}") from e
    if spec.text_field not in ds.column_names:
        raise UsageError(f"Dataset {spec.ref!r} has no column {spec.text_field!r} (found {ds.column_names}).")
    return list(ds[spec.text_field])


@dataclass(frozen=True)
class TokenSplits:
    """Disjoint calibration and evaluation token sequences.

    Attributes:
        calib: ``(n_calib, seq_len)`` int64 token ids (for importance, search, KD).
        eval: ``(n_eval, seq_len)`` int64 token ids (held out from all of the above).
        source: description of where the text came from.
        seed: the seed that chose and (for ``self``) generated the sequences.
    """

    calib: object
    eval: object
    source: str
    seed: int
    notes: tuple[str, ...] = field(default=())

    @property
    def seq_len(self) -> int:
        return int(self.calib.shape[1])


def doc_bucket(text: str) -> float:
    """Deterministic position of a document in [0, 1), from the sha256 of its text."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def _chunk(token_lists: list[list[int]], seq_len: int, bos: int | None) -> list[list[int]]:
    """Concatenate documents and cut fixed-length chunks (each led by BOS if the model uses one)."""
    body = seq_len - (bos is not None)
    stream = [t for toks in token_lists for t in toks]
    chunks = [stream[i:i + body] for i in range(0, len(stream) - body + 1, body)]
    return [([bos] if bos is not None else []) + c for c in chunks]


def _tokenize_docs(docs: list[str], tokenizer) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return [list(x) + ([eos] if eos is not None else []) for x in ids]


def _bos_used(tokenizer) -> int | None:
    """The BOS id if the tokenizer prepends one by default, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def _pick(chunks: list[list[int]], n: int, generator, what: str, notes: list[str]):
    import torch

    if len(chunks) < n:
        notes.append(f"only {len(chunks)} {what} sequences available (asked for {n})")
        n = len(chunks)
    # a prefix of one seeded permutation: the first k rows are the same whatever n >= k is asked for
    order = torch.randperm(len(chunks), generator=generator)[:n].tolist()
    return torch.tensor([chunks[i] for i in order], dtype=torch.long).reshape(n, -1)


_MORE_TEXT = ("Give more text (a few hundred thousand tokens calibrate well), or use --calib-data self "
              "(text sampled from the model).")


def split_documents(docs: list[str], tokenizer, *, seq_len: int, n_calib: int, n_eval: int,
                    seed: int, eval_fraction: float = 0.1, source: str = "") -> TokenSplits:
    """Tokenize documents and cut disjoint calibration / evaluation sequences.

    Documents go to the evaluation side when :func:`doc_bucket` < ``eval_fraction``.
    If that leaves a side without a single full sequence (a tiny file), the
    concatenated token stream is cut at one position instead: sequences before
    it calibrate, sequences after it evaluate.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    bos = _bos_used(tokenizer)
    notes: list[str] = []
    tokens = _tokenize_docs(docs, tokenizer)
    is_eval = [doc_bucket(d) < eval_fraction for d in docs]
    calib_chunks = _chunk([t for t, e in zip(tokens, is_eval, strict=True) if not e], seq_len, bos)
    eval_chunks = _chunk([t for t, e in zip(tokens, is_eval, strict=True) if e], seq_len, bos)
    if n_eval and (not eval_chunks or not calib_chunks):
        chunks = _chunk(tokens, seq_len, bos)
        if len(chunks) < 2:
            raise UsageError(f"{source or 'The data'} has fewer than {2 * seq_len} tokens; "
                             f"it cannot give one calibration and one evaluation sequence of {seq_len}.",
                             _MORE_TEXT)
        cut = max(1, min(len(chunks) - 1, round(len(chunks) * (1 - eval_fraction))))
        calib_chunks, eval_chunks = chunks[:cut], chunks[cut:]
        notes.append("few documents: calibration and evaluation split by position in the text")
    if not calib_chunks:
        raise UsageError(f"{source or 'The data'} has fewer than {seq_len} tokens.", _MORE_TEXT)
    calib = _pick(calib_chunks, n_calib, g, "calibration", notes)
    ev = _pick(eval_chunks, n_eval, g, "evaluation", notes) if n_eval else torch.empty(0, seq_len, dtype=torch.long)
    for n in notes:
        log.warning("%s: %s", source, n)
    return TokenSplits(calib, ev, source, seed, tuple(notes))


def ordinary_token_ids(tokenizer, vocab_size: int):
    """Token ids that are not special tokens, below ``vocab_size``."""
    import torch

    special = set(tokenizer.all_special_ids)
    n = min(vocab_size, len(tokenizer))
    return torch.tensor([i for i in range(n) if i not in special], dtype=torch.long)


def sample_self_tokens(model, tokenizer, *, n: int, seq_len: int, seed: int, batch_size: int = 64,
                       progress: Progress = NULL_PROGRESS):
    """Sample ``n`` sequences of ``seq_len`` tokens from ``model`` itself (LLM-QAT style).

    Token 0 is uniform over :func:`ordinary_token_ids`, tokens 1..GREEDY_PREFIX
    are greedy, the rest are sampled from the softmax at temperature 1. Rows are
    sampled in whole batches of ``batch_size`` (the last one cut to ``n``) from
    one generator seeded by ``seed``, each batch drawing its own first tokens:
    the result depends only on model, seed and batch size, and the first ``k``
    rows are the same for every ``n >= k`` (a run asking for more rows extends
    the rows a smaller one used). Batches of 64 sample ~1.8x faster per row than
    batches of 16 on a 2-core CPU.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    pool = ordinary_token_ids(tokenizer, model.config.vocab_size)
    total = -(-n // batch_size) * batch_size
    out = torch.empty(total, seq_len, dtype=torch.long)
    with progress.task("Sampling calibration text from the model", total=total * seq_len) as task, torch.no_grad():
        for b in range(0, total, batch_size):
            cur = pool[torch.randint(len(pool), (batch_size, 1), generator=g)]
            out[b:b + batch_size, 0] = cur[:, 0]
            past = None
            for t in range(1, seq_len):
                res = model(input_ids=cur, past_key_values=past, use_cache=True)
                past = res.past_key_values
                logits = res.logits[:, -1].float()
                if t <= GREEDY_PREFIX:
                    cur = logits.argmax(-1, keepdim=True)
                else:
                    cur = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
                out[b:b + batch_size, t] = cur[:, 0]
                task.advance(batch_size)
    return out[:n]


EVAL_SEED = 7919  # the held-out rows' own stream: the same whatever number of calibration rows is asked for


def self_splits(model, tokenizer, *, seq_len: int, n_calib: int, n_eval: int, seed: int,
                cache_path: Path | None = None, progress: Progress = NULL_PROGRESS) -> TokenSplits:
    """Self-generated :class:`TokenSplits`: ``n_calib`` calibration rows, and ``n_eval`` held-out rows sampled
    from a stream of their own (seed ``seed + EVAL_SEED``), so neither depends on the other's count.

    With ``cache_path``, the tokens are stored there (safetensors) and reused.
    """
    from safetensors.torch import load_file
    from safetensors.torch import save as save_bytes

    from llmshrink.storage import atomic_write_bytes

    if cache_path is not None and cache_path.is_file():
        tokens = load_file(str(cache_path))["tokens"]
    else:
        import torch

        calib = sample_self_tokens(model, tokenizer, n=n_calib, seq_len=seq_len, seed=seed, progress=progress)
        held = sample_self_tokens(model, tokenizer, n=n_eval, seq_len=seq_len, seed=seed + EVAL_SEED,
                                  batch_size=max(n_eval, 1), progress=progress)
        tokens = torch.cat([calib, held])
        if cache_path is not None:
            atomic_write_bytes(cache_path, save_bytes({"tokens": tokens.contiguous()}))
    return TokenSplits(tokens[:n_calib], tokens[n_calib:], DataSpec("self").describe(), seed)


def token_splits(spec: DataSpec | str, tokenizer, *, model=None, seq_len: int = DEFAULT_SEQ_LEN,
                 n_calib: int = DEFAULT_N_CALIB, n_eval: int = DEFAULT_N_EVAL, seed: int = 0,
                 cache_path: Path | None = None, progress: Progress = NULL_PROGRESS) -> TokenSplits:
    """Calibration and evaluation sequences for a data spec (see module docstring).

    Args:
        spec: a :class:`DataSpec` or the ``--calib-data`` string.
        tokenizer: the model's tokenizer.
        model: needed only for ``self``, and not when its samples are in ``cache_path`` already.
        cache_path: where ``self`` samples are cached (ignored for files).
    """
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if spec.kind == "self":
        if model is None and not (cache_path is not None and cache_path.is_file()):
            raise ValueError("self-generated calibration data needs the model (its samples are not cached)")
        return self_splits(model, tokenizer, seq_len=seq_len, n_calib=n_calib, n_eval=n_eval,
                           seed=seed, cache_path=cache_path, progress=progress)
    docs = read_documents(spec, progress=progress)
    return split_documents(docs, tokenizer, seq_len=seq_len, n_calib=n_calib, n_eval=n_eval,
                           seed=seed, source=spec.describe())


def self_cache_path(model_fingerprint: str, *, seq_len: int, n: int, seed: int) -> Path:
    """Cache file of self-generated tokens for one model, size and seed."""
    from llmshrink import storage

    # "self2": calibration rows in whole batches of 64, held-out rows a stream of their own (older "self" caches
    # hold other rows for the same seed)
    return storage.home() / "data" / f"self2-{model_fingerprint}-s{seed}-{n}x{seq_len}.safetensors"
