"""Run an exported decoder in ONNX Runtime: prefill, decode with KV cache, generate."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class OrtDecoder:
    """A session over an ``ort``- or ``trt``-flavour decoder graph.

    Args:
        model: path to a ``.onnx`` file, or serialized model bytes.
        threads: intra-op threads (None: ORT's default, all cores).
    """

    def __init__(self, model: str | Path | bytes, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        src = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        self.threads = threads
        self._past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.num_layers = len(self._past) // 2
        self._kv_shapes = [(i.shape[1], i.shape[3]) for i in self._past[::2]]  # (kv_heads, head_dim)
        self._outputs = ["logits"] + [f"present.{j}.{kv}" for j in range(self.num_layers) for kv in ("key", "value")]

    def empty_cache(self, batch: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(np.zeros((batch, h, 0, d), np.float32), np.zeros((batch, h, 0, d), np.float32))
                for h, d in self._kv_shapes]

    def forward(self, input_ids: np.ndarray, past: list[tuple[np.ndarray, np.ndarray]] | None = None):
        """Logits ``(B, S, V)`` and the new cache for ``input_ids`` ``(B, S)`` after ``past``."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        past = past if past is not None else self.empty_cache(batch)
        past_len = past[0][0].shape[2] if past else 0
        feeds = {"input_ids": input_ids, "attention_mask": np.ones((batch, past_len + seq), np.int64)}
        for j, (k, v) in enumerate(past):
            feeds[f"past_key_values.{j}.key"], feeds[f"past_key_values.{j}.value"] = k, v
        out = self.session.run(self._outputs, feeds)
        return out[0], [(out[1 + 2 * j], out[2 + 2 * j]) for j in range(self.num_layers)]

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, *, stop_ids: tuple[int, ...] = (),
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0):
        """Yield new token ids one at a time (greedy, or nucleus sampling with a seeded generator)."""
        import torch

        from llmshrink.compressor.model import pick_next

        gen = torch.Generator().manual_seed(seed)
        logits, past = self.forward(np.asarray(input_ids).reshape(1, -1))
        for _ in range(max_new_tokens):
            nxt = int(pick_next(torch.from_numpy(logits[:, -1]), do_sample, temperature, top_p, gen))
            yield nxt
            if nxt in stop_ids:
                return
            logits, past = self.forward(np.array([[nxt]], np.int64), past)
