"""Load configs, tokenizers and weights for a :class:`ModelSource`.

Every source ends as a local HF directory before transformers sees it:
built-ins and GGUF files are converted once into the cache; hub ids are read
from the HF cache first and downloaded only when the hub is reachable, so an
offline machine fails in seconds with a message instead of a traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llmshrink import storage
from llmshrink.errors import RemoteUnavailableError, UsageError
from llmshrink.models.arch import check_supported
from llmshrink.models.builtin import BUILTIN_MODELS, convert_gguf, ensure_builtin, models_dir
from llmshrink.models.hub import hub_endpoint, hub_reachable
from llmshrink.models.resolve import ModelSource, resolve_model
from llmshrink.progress import NULL_PROGRESS, Progress

log = logging.getLogger("llmshrink")


def _offline_hint() -> str:
    return (
        "Offline options: a built-in model (" + ", ".join(BUILTIN_MODELS) + "), "
        "a local HF directory (config.json + safetensors), or a local .gguf file. "
        "If the model is in your HF cache, it is used without network."
    )


def local_dir(source: ModelSource | str, *, progress: Progress = NULL_PROGRESS) -> Path | str:
    """Return a directory (or, for hub sources, the hub id) that transformers can load.

    Built-ins and GGUF files are converted into the cache on first use.
    """
    if isinstance(source, str):
        source = resolve_model(source)
    if source.kind == "local_dir":
        return Path(source.ref)
    if source.kind == "builtin":
        return ensure_builtin(source.builtin, progress=progress)
    if source.kind == "gguf":
        gguf = Path(source.ref)
        digest = storage.sha256_file(gguf)
        dest = models_dir() / f"gguf-{gguf.stem}-{digest[:12]}"
        if not (dest / "llmshrink-source.json").is_file():
            convert_gguf(gguf, dest, provenance={"name": gguf.stem, "path": str(gguf)}, progress=progress)
        return dest
    return source.ref


def _hub_call(source: ModelSource, fn, **kwargs):
    """Call a transformers loader on a hub id: cache first, then network if reachable."""
    try:
        return fn(source.ref, revision=source.revision, local_files_only=True, **kwargs)
    except OSError:
        pass
    if not hub_reachable():
        raise RemoteUnavailableError(
            f"{source.ref} is not in the local HF cache and the hub ({hub_endpoint()}) cannot be reached.",
            _offline_hint(),
        )
    try:
        return fn(source.ref, revision=source.revision, **kwargs)
    except OSError as e:
        raise UsageError(f"Could not load {source.ref} from the hub: {e}") from e


def _load(source: ModelSource | str, fn, progress: Progress, **kwargs):
    if isinstance(source, str):
        source = resolve_model(source)
    where = local_dir(source, progress=progress)
    if source.kind == "hub":
        return _hub_call(source, fn, **kwargs)
    from safetensors import SafetensorError

    try:
        return fn(where, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:  # a missing, truncated or corrupt file
        raise UsageError(f"Could not load {source.describe()} from {where}: {e}",
                         "Its files may be truncated or corrupt (e.g. model.safetensors cut short): download or "
                         "copy the model again.") from e


def load_config(source: ModelSource | str, *, trust_remote_code: bool = False,
                progress: Progress = NULL_PROGRESS):
    """Load the HF config and check that the architecture is supported."""
    from transformers import AutoConfig

    src = resolve_model(source) if isinstance(source, str) else source
    config = _load(src, AutoConfig.from_pretrained, progress, trust_remote_code=trust_remote_code)
    check_supported(config, src.describe())
    return config


def load_tokenizer(source: ModelSource | str, *, trust_remote_code: bool = False,
                   progress: Progress = NULL_PROGRESS):
    """Load the tokenizer (with its chat template, if the model has one)."""
    from transformers import AutoTokenizer

    return _load(source, AutoTokenizer.from_pretrained, progress, trust_remote_code=trust_remote_code)


def load_model(source: ModelSource | str, *, dtype=None, trust_remote_code: bool = False,
               progress: Progress = NULL_PROGRESS):
    """Load a supported causal LM in eval mode (float32 unless ``dtype`` says otherwise).

    Raises:
        UnsupportedModelError: the architecture is not Llama-family.
        RemoteUnavailableError: a hub id that is neither cached nor reachable.
    """
    import torch
    from transformers import AutoModelForCausalLM

    src = resolve_model(source) if isinstance(source, str) else source
    load_config(src, trust_remote_code=trust_remote_code, progress=progress)
    with progress.task(f"Loading {src.describe()}"):
        model = _load(src, AutoModelForCausalLM.from_pretrained, progress,
                      dtype=dtype or torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    return model


def fingerprint(source: ModelSource | str) -> str:
    """A short stable id of a model's weights, for cache keys of derived data.

    Built-ins: their pinned GGUF sha256. Local directories: sha256 over
    config.json and the names, sizes and mtimes of weight files (cheap, and
    changes when weights are rewritten). Hub ids: the id and revision.
    """
    import hashlib

    if isinstance(source, str):
        source = resolve_model(source)
    h = hashlib.sha256(source.describe().encode())
    if source.kind == "builtin":
        h.update(source.builtin.sha256.encode())
    elif source.kind == "gguf":
        st = Path(source.ref).stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    elif source.kind == "local_dir":
        d = Path(source.ref)
        h.update((d / "config.json").read_bytes())
        for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
