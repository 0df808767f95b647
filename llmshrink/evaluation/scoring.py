"""Scorers: log-probabilities of token sequences from a torch model or an ONNX Runtime bundle.

Both backends answer the same question — for ids ``[T]``, the log-softmax of
the next-token logits at every position (``[T, V]``, float64) — so every
metric is computed once, above them, and a bundle is judged exactly like the
torch model it was exported from. A bundle runs through the shipped graph
(its ``logits_to_keep`` set to all positions); a model runs as a
``CompressedModel`` (the original, unpruned fp32 spec unless one is given).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmshrink.registry import Registry


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclass
class Scorer:
    """Next-token log-probabilities for one model, whatever runs it.

    Attributes:
        name: what is scored (bundle path or model name), for reports.
        kind: the backend (``torch`` or ``onnxruntime``).
        tokenizer: the model's tokenizer.
        max_length: longest sequence the backend accepts.
        forward: ids ``[T]`` (int64) -> logits ``[T, V]``.
        generate: (prompt ids ``[T]``, max new tokens, stop ids) -> greedy new ids,
            through the backend's KV cache.
    """

    name: str
    kind: str
    tokenizer: object
    max_length: int
    forward: Callable[[np.ndarray], np.ndarray]
    generate: Callable[[np.ndarray, int, tuple[int, ...]], list[int]]

    def logprobs(self, ids: np.ndarray) -> np.ndarray:
        """Log-softmax ``[T, V]`` (float64) of the next-token distribution after each of ``ids``."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or not 0 < len(ids) <= self.max_length:
            raise ValueError(f"expected 1..{self.max_length} token ids, got shape {ids.shape}")
        return log_softmax(self.forward(ids))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


SCORERS: Registry[Callable[..., Scorer]] = Registry("scorer backend")


def _bundle_scorer(path: str, *, threads: int | None = None, **_: object) -> Scorer:
    from llmshrink.api import open_bundle

    b = open_bundle(path, threads=threads)

    def forward(ids: np.ndarray) -> np.ndarray:
        logits, _ = b.decoder.forward(ids[None, :])
        return logits[0]

    def generate(ids: np.ndarray, max_new: int, stop: tuple[int, ...]) -> list[int]:
        max_new = min(max_new, b.manifest.max_length - len(ids))
        if max_new <= 0:
            return []
        return list(b.decoder.generate(ids, max_new, max_length=len(ids) + max_new + 1, stop_ids=stop))

    return Scorer(str(path), "onnxruntime", b.tokenizer, b.manifest.max_length, forward, generate)


def _torch_scorer(model: str, *, spec=None, trust_remote_code: bool = False, **_: object) -> Scorer:
    import torch

    from llmshrink.api import load_spec
    from llmshrink.compressor.materialize import materialize
    from llmshrink.models import load_model, load_tokenizer, resolve_model
    from llmshrink.spec import BaseShape, SubnetSpec

    source = resolve_model(model)
    hf = load_model(source, trust_remote_code=trust_remote_code)
    tok = load_tokenizer(source, trust_remote_code=trust_remote_code)
    base = BaseShape.from_config(hf.config)
    spec = SubnetSpec.original(base, model=source.describe()) if spec is None else load_spec(spec)
    cm = materialize(hf, spec, tok)
    del hf

    @torch.no_grad()
    def forward(ids: np.ndarray) -> np.ndarray:
        logits, _ = cm(torch.from_numpy(ids)[None, :])
        return logits[0].numpy()

    def generate(ids: np.ndarray, max_new: int, stop: tuple[int, ...]) -> list[int]:
        out = cm.generate(torch.from_numpy(ids)[None, :], max_new, stop_ids=stop)
        return out[0].tolist()

    return Scorer(source.describe(), "torch", tok, cm.meta.max_position_embeddings, forward, generate)


SCORERS.register("onnxruntime", _bundle_scorer)
SCORERS.register("torch", _torch_scorer)


def is_bundle(path: str | Path) -> bool:
    from llmshrink.exporters.bundle import MANIFEST

    return (Path(path) / MANIFEST).is_file()


def load_scorer(target: str, **kwargs) -> Scorer:
    """A Scorer for a bundle directory (ONNX Runtime) or a model llmshrink can load (torch)."""
    return SCORERS.get("onnxruntime" if is_bundle(target) else "torch")(target, **kwargs)
