"""Scorers: log-probabilities of token sequences from a torch model or an ONNX Runtime bundle.

Both backends answer the same question — for ids ``[T]``, the log-softmax of
the next-token logits at every position (``[T, V]``, float64) — so every
metric is computed once, above them, and a bundle is judged exactly like the
torch model it was exported from. Multiple-choice tasks score several
continuations of one context; ``continuations`` reads the context once into
the backend's KV cache and runs only the continuations after it (what made
full-set evaluation affordable on a CPU). A bundle runs through the shipped graph
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
        continuations: (prefix ids ``[P]``, suffixes ``[S_i]``) -> per suffix, the
            logits ``[S_i, V]`` that predict its tokens (at the positions of the
            prefix's last token and the suffix's first ``S_i - 1``), the prefix
            read once. Same numbers as ``forward`` on each concatenation, up to
            float rounding.
    """

    name: str
    kind: str
    tokenizer: object
    max_length: int
    forward: Callable[[np.ndarray], np.ndarray]
    generate: Callable[[np.ndarray, int, tuple[int, ...]], list[int]]
    continuations: Callable[[np.ndarray, list[np.ndarray]], list[np.ndarray]]

    def logprobs(self, ids: np.ndarray) -> np.ndarray:
        """Log-softmax ``[T, V]`` (float64) of the next-token distribution after each of ``ids``."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or not 0 < len(ids) <= self.max_length:
            raise ValueError(f"expected 1..{self.max_length} token ids, got shape {ids.shape}")
        return log_softmax(self.forward(ids))

    def score(self, prefix: np.ndarray, suffixes: list[np.ndarray]) -> list[tuple[float, bool]]:
        """Per suffix: its total log-probability after ``prefix`` and whether greedy decoding yields it.

        ``prefix`` needs at least one token (lm-eval gives an empty context a BOS);
        ``len(prefix) + len(suffix) - 1`` must not exceed ``max_length``.
        """
        prefix = np.asarray(prefix, dtype=np.int64)
        suffixes = [np.asarray(s, dtype=np.int64) for s in suffixes]
        longest = len(prefix) + max(len(s) for s in suffixes) - 1
        if len(prefix) == 0 or any(len(s) == 0 for s in suffixes) or longest > self.max_length:
            raise ValueError(f"need a non-empty prefix and suffixes within {self.max_length} tokens in all")
        out = []
        for s, logits in zip(suffixes, self.continuations(prefix, suffixes), strict=True):
            lp = log_softmax(logits)
            out.append((float(lp[np.arange(len(s)), s].sum()), bool((lp.argmax(-1) == s).all())))
        return out

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


SCORERS: Registry[Callable[..., Scorer]] = Registry("scorer backend")


def _bundle_scorer(path: str, *, threads: int | None = None, **_: object) -> Scorer:
    from llmshrink.exporters.bundle import open_bundle

    b = open_bundle(path, threads=threads)

    def forward(ids: np.ndarray) -> np.ndarray:
        logits, _ = b.decoder.forward(ids[None, :])
        return logits[0]

    def generate(ids: np.ndarray, max_new: int, stop: tuple[int, ...]) -> list[int]:
        max_new = min(max_new, b.manifest.max_length - len(ids))
        if max_new <= 0:
            return []
        return list(b.decoder.generate(ids, max_new, max_length=len(ids) + max_new + 1, stop_ids=stop))

    kv = None  # one preallocated cache, reused by every call (allocating it costs more than a short step)

    def continuations(prefix: np.ndarray, suffixes: list[np.ndarray]) -> list[np.ndarray]:
        nonlocal kv
        heads = [np.concatenate([prefix[-1:], s[:-1]])[None, :] for s in suffixes]
        if not b.decoder.shared_buffer:  # trt flavour: the cache grows by Concat, calls are functional
            past = b.decoder.forward(prefix[None, :-1])[1] if len(prefix) > 1 else None
            return [b.decoder.forward(h, past)[0][0] for h in heads]
        kv = kv or b.decoder.kv_session(b.manifest.max_length)
        kv.rewind(0)
        if len(prefix) > 1:
            kv.step(prefix[None, :-1], last_only=True)
        out = []
        for h in heads:
            kv.rewind(len(prefix) - 1)
            out.append(kv.step(h)[0])
        return out

    return Scorer(str(path), "onnxruntime", b.tokenizer, b.manifest.max_length, forward, generate, continuations)


def _torch_scorer(model: str, *, spec=None, trust_remote_code: bool = False, batch_size: int = 8,
                  **_: object) -> Scorer:
    import torch

    from llmshrink.compressor.materialize import materialize
    from llmshrink.models import load_model, load_tokenizer, resolve_model
    from llmshrink.spec import BaseShape, SubnetSpec, load_spec

    source = resolve_model(model)
    hf = load_model(source, trust_remote_code=trust_remote_code)
    tok = load_tokenizer(source, trust_remote_code=trust_remote_code)
    base = BaseShape.from_config(hf.config)
    spec = SubnetSpec.original(base, model=source.describe()) if spec is None else load_spec(spec)
    from llmshrink.compressor.calibrate import needs_calibration

    calib = None
    if needs_calibration(spec):  # static activation scales: calibrated as `export` does, on the same text
        from llmshrink.compressor.calibration_text import calibration_tokens
        from llmshrink.models.data import DEFAULT_CALIB_DATA
        from llmshrink.progress import NULL_PROGRESS

        calib = calibration_tokens(hf, tok, source, DEFAULT_CALIB_DATA, NULL_PROGRESS)
    cm = materialize(hf, spec, tok, calib=calib)
    del hf

    @torch.no_grad()
    def forward(ids: np.ndarray) -> np.ndarray:
        logits, _ = cm(torch.from_numpy(ids)[None, :])
        return logits[0].numpy()

    def generate(ids: np.ndarray, max_new: int, stop: tuple[int, ...]) -> list[int]:
        out = cm.generate(torch.from_numpy(ids)[None, :], max_new, stop_ids=stop)
        return out[0].tolist()

    @torch.no_grad()
    def continuations(prefix: np.ndarray, suffixes: list[np.ndarray]) -> list[np.ndarray]:
        past = cm(torch.from_numpy(prefix[None, :-1]), keep=1)[1] if len(prefix) > 1 else None
        out: list[np.ndarray] = []
        # Suffixes run as one right-padded batch after the shared cache: causal
        # attention keeps padding from reaching the real positions.
        for start in range(0, len(suffixes), batch_size):
            chunk = suffixes[start:start + batch_size]
            ids = torch.zeros(len(chunk), max(len(s) for s in chunk), dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, 0] = int(prefix[-1])
                ids[i, 1:len(s)] = torch.from_numpy(s[:-1])
            bpast = [(k.expand(len(chunk), -1, -1, -1), v.expand(len(chunk), -1, -1, -1)) for k, v in past or []]
            logits = cm(ids, bpast or None)[0]
            out += [logits[i, :len(s)].numpy() for i, s in enumerate(chunk)]
        return out

    return Scorer(source.describe(), "torch", tok, cm.meta.max_position_embeddings, forward, generate,
                  continuations)


SCORERS.register("onnxruntime", _bundle_scorer)
SCORERS.register("torch", _torch_scorer)


def is_bundle(path: str | Path) -> bool:
    from llmshrink.exporters.bundle import MANIFEST

    return (Path(path) / MANIFEST).is_file()


def load_scorer(target: str, **kwargs) -> Scorer:
    """A Scorer for a bundle directory (ONNX Runtime) or a model llmshrink can load (torch)."""
    return SCORERS.get("onnxruntime" if is_bundle(target) else "torch")(target, **kwargs)
