"""A model whose weights stay on disk until a part of it is asked for (layer streaming).

:class:`LazyModel` holds the HF module tree on the ``meta`` device (shapes, no
memory) and reads tensors one at a time from the checkpoint's safetensors files
(one file, or shards named by ``model.safetensors.index.json``), as
llm-compressor's sequential pipeline and accelerate's disk offload do. A phase
that walks the model block by block (GPTQ, importance statistics) then holds
about one decoder layer in memory instead of all of them: :meth:`LazyModel.layer`
loads one, :meth:`LazyModel.release` returns it to ``meta``.

Tensors are read as float32 (what the whole-model path computes in), so a
streamed phase sees exactly the weights ``load_model`` would give.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from llmshrink.errors import UsageError
from llmshrink.progress import NULL_PROGRESS, Progress


def has_safetensors(directory) -> bool:
    """True when ``directory`` (a local checkpoint; a hub id is not one) holds safetensors weights to stream."""
    d = Path(directory)
    return d.is_dir() and ((d / "model.safetensors.index.json").is_file() or any(d.glob("*.safetensors")))


class LazyModel:
    """An HF causal LM with its weights on disk (see module docstring).

    Attributes:
        model: the module tree on ``meta``, except its rotary embedding (computed from the config, on the CPU).
        config: the HF config. ``generation_config``: the checkpoint's, where it has one.

    Raises:
        UsageError: the model has no safetensors weights on disk (a hub id not in the cache, or .bin files).
    """

    def __init__(self, source, *, progress: Progress = NULL_PROGRESS) -> None:
        from transformers import AutoModelForCausalLM, GenerationConfig

        from llmshrink.models.load import load_config, local_dir

        directory = local_dir(source, progress=progress)
        self.directory = Path(directory)
        self.config = load_config(source, progress=progress)
        self._files = self._weight_map(self.directory)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config)
        rotary = self.model.model.rotary_emb
        self.model.model.rotary_emb = type(rotary)(config=self.config)  # inv_freq is computed, not stored
        with contextlib.suppress(OSError):  # no generation_config.json: from_config's default stays
            self.model.generation_config = GenerationConfig.from_pretrained(self.directory)
        self.model.eval()

    @staticmethod
    def _weight_map(directory: Path) -> dict[str, Path]:
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            return {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise UsageError(f"{directory} has no safetensors weights to stream from.",
                             "Layer streaming reads safetensors checkpoints; convert the model with "
                             "save_pretrained(..., safe_serialization=True), or use the whole-model path.")
        from safetensors import safe_open

        out = {}
        for f in files:
            with safe_open(f, "pt") as st:
                out.update(dict.fromkeys(st.keys(), f))
        return out

    def tensor(self, name: str) -> torch.Tensor:
        """The float32 tensor ``name`` (an HF state-dict key), read from disk now.

        A tied ``lm_head.weight`` absent from the checkpoint is the embedding's.
        """
        from safetensors import safe_open

        if name not in self._files and name == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False):
            name = "model.embed_tokens.weight"
        if name not in self._files:
            raise KeyError(f"{name} is not in the checkpoint at {self.directory}")
        with safe_open(self._files[name], "pt") as st:
            return st.get_tensor(name).float()

    def load(self, prefix: str, module: torch.nn.Module) -> torch.nn.Module:
        """Give ``module`` (the submodule at ``prefix``, e.g. ``model.layers.3``) its weights from disk, on the CPU."""
        module.to_empty(device="cpu")
        for name, p in module.named_parameters(recurse=True):
            p.data = self.tensor(f"{prefix}.{name}")
        return module

    def layer(self, i: int) -> torch.nn.Module:
        """Decoder layer ``i`` with its weights loaded (call :meth:`release` when done with it)."""
        return self.load(f"model.layers.{i}", self.model.model.layers[i])

    @staticmethod
    def release(module: torch.nn.Module) -> None:
        """Return ``module``'s weights to ``meta``: the memory is freed once nothing else refers to them."""
        module.to("meta")
