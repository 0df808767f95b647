"""Run an exported decoder in ONNX Runtime: prefill, decode with KV cache, generate.

Two ways to hold the KV cache, both supported by the same graph
(GroupQueryAttention's present length is max(total length, past length)):

* :meth:`OrtDecoder.forward` — functional, numpy in and out, the cache grows
  by concatenation. Used for parity checks and tests.
* :class:`KVSession` — the fast path for generation and timing, as
  onnxruntime-genai runs it: one ``[batch, kv_heads, max_length, head_dim]``
  buffer per layer, bound with IOBinding as both past input and present
  output, so a decode step copies nothing.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np


class OrtDecoder:
    """A session over an ``ort``- or ``trt``-flavour decoder graph.

    Args:
        model: path to a ``.onnx`` file, or serialized model bytes.
        threads: intra-op threads (None: ORT's default, all cores).
        profile_prefix: turn on ORT's per-node profiler, writing to files with
            this path prefix (the latency profiler reads them; see
            ``session.end_profiling()``).
    """

    def __init__(self, model: str | Path | bytes, *, threads: int | None = None,
                 profile_prefix: str | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        # ORT fuses a blocked INT4 DequantizeLinear + MatMul (the trt flavour's
        # W4A16) into MatMulNBits, by default with int8 activations; TensorRT
        # keeps activations in fp16, so the CPU check must too.
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if threads:
            so.intra_op_num_threads = threads
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        src = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        self.threads = threads
        self._past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.num_layers = len(self._past) // 2
        self._kv_shapes = [(i.shape[1], i.shape[3]) for i in self._past[::2]]  # (kv_heads, head_dim)
        self.kv_dtype = np.float16 if self._past and self._past[0].type == "tensor(float16)" else np.float32
        # Only GroupQueryAttention graphs (the ort flavour) can share one buffer
        # between past and present; the trt flavour's cache grows by Concat.
        self.shared_buffer = "trt flavour" not in (self.session.get_modelmeta().description or "")
        self._outputs = ["logits"] + [f"present.{j}.{kv}" for j in range(self.num_layers) for kv in ("key", "value")]

    def empty_cache(self, batch: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(np.zeros((batch, h, 0, d), self.kv_dtype), np.zeros((batch, h, 0, d), self.kv_dtype))
                for h, d in self._kv_shapes]

    def forward(self, input_ids: np.ndarray, past: list[tuple[np.ndarray, np.ndarray]] | None = None):
        """Logits ``(B, S, V)`` and the new cache for ``input_ids`` ``(B, S)`` after ``past``."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        past = past if past is not None else self.empty_cache(batch)
        past_len = past[0][0].shape[2] if past else 0
        feeds = {"input_ids": input_ids, "attention_mask": np.ones((batch, past_len + seq), np.int64),
                 "logits_to_keep": np.array([seq], np.int64)}
        for j, (k, v) in enumerate(past):
            feeds[f"past_key_values.{j}.key"], feeds[f"past_key_values.{j}.value"] = k, v
        out = self.session.run(self._outputs, feeds)
        return out[0], [(out[1 + 2 * j], out[2 + 2 * j]) for j in range(self.num_layers)]

    def kv_session(self, max_length: int, batch: int = 1) -> KVSession:
        """A shared-buffer cache session for up to ``max_length`` positions (ort flavour only)."""
        if not self.shared_buffer:
            raise ValueError("this graph's KV cache grows by concatenation; use forward()")
        return KVSession(self, max_length, batch)

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, *, max_length: int,
                 stop_ids: tuple[int, ...] = (), do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0):
        """Yield new token ids one at a time (greedy, or nucleus sampling with a seeded generator)."""
        import torch

        from llmshrink.compressor.model import pick_next

        gen = torch.Generator().manual_seed(seed)
        if self.shared_buffer:
            kv = self.kv_session(max_length)
            step = partial(kv.step, copy=False)  # each step's logits are read before the next
        else:  # growing cache, functional calls
            past = None

            def step(ids: np.ndarray, last_only: bool = False) -> np.ndarray:
                nonlocal past
                logits, past = self.forward(ids, past)
                return logits[:, -1:] if last_only else logits
        logits = step(np.asarray(input_ids, np.int64).reshape(1, -1), last_only=True)
        for i in range(max_new_tokens):
            # Greedy picks in numpy: a torch op between two ORT runs wakes torch's
            # own thread pool to fight ORT's spinning workers (+4 % per int4 step).
            nxt = (int(pick_next(torch.from_numpy(logits[:, -1]), do_sample, temperature, top_p, gen)) if do_sample
                   else int(logits[0, -1].argmax()))
            yield nxt
            if nxt in stop_ids or i == max_new_tokens - 1:
                return
            logits = step(np.array([[nxt]], np.int64))


class KVSession:
    """Stateful decoding over preallocated KV buffers (see module docstring).

    Args:
        decoder: the decoder whose session runs the steps.
        max_length: capacity in positions (prompt + generated).
        batch: batch size (all rows advance together).
    """

    def __init__(self, decoder: OrtDecoder, max_length: int, batch: int = 1) -> None:
        import onnxruntime as ort

        self.decoder, self.max_length, self.batch = decoder, max_length, batch
        self.length = 0
        self._binding = decoder.session.io_binding()
        self._binding.bind_output("logits")  # bound first: get_outputs()[0] is the logits
        # Decode steps (S=1) write logits into one preallocated array that
        # ORT and numpy share, and the mask is a view of one ones-array: a
        # step then allocates nothing on the Python side.
        vocab = next(o for o in decoder.session.get_outputs() if o.name == "logits").shape[-1]
        self._step_logits = np.zeros((batch, 1, vocab), np.float32)
        self._step_logits_ov = ort.OrtValue.ortvalue_from_numpy(self._step_logits)
        self._ones = np.ones((batch, max_length), np.int64)
        # A decode step's ids and logits_to_keep live in buffers bound once and
        # rewritten in place: after a run, with ORT's workers still spinning and
        # the caches full of weights, each Python-side bind costs ~20 us, and an
        # int4 SmolLM2 step is ~8 ms.
        self._step_ids = np.zeros((batch, 1), np.int64)
        self._step_ids_ov = ort.OrtValue.ortvalue_from_numpy(self._step_ids)
        self._keep_one_ov = ort.OrtValue.ortvalue_from_numpy(np.ones(1, np.int64))
        self._decode_bound = False
        self._buffers = []
        for j, (heads, dim) in enumerate(decoder._kv_shapes):
            for kv in ("key", "value"):
                buf = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, heads, max_length, dim), np.float32))
                self._buffers.append(buf)
                self._binding.bind_ortvalue_input(f"past_key_values.{j}.{kv}", buf)
                self._binding.bind_ortvalue_output(f"present.{j}.{kv}", buf)

    def rewind(self, length: int) -> None:
        """Forget every position from ``length`` on (their buffer rows are overwritten later)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind to {length}; the cache holds {self.length}")
        self.length = length

    def step(self, input_ids: np.ndarray, *, last_only: bool = False, copy: bool = True) -> np.ndarray:
        """Run ``input_ids`` ``(batch, S)`` after the cached positions.

        Returns logits ``(batch, S, V)``, or ``(batch, 1, V)`` for the last
        position only with ``last_only`` (what generation needs from a prompt).
        One-row logits come back as a copy unless ``copy=False``: then the
        array is the session's own, overwritten by the next step (for callers
        that read it at once, as generation does).
        """
        import onnxruntime as ort

        ids = np.asarray(input_ids, dtype=np.int64)
        seq = ids.shape[1]
        if self.length + seq > self.max_length:
            raise ValueError(f"{self.length} cached + {seq} new positions exceed max_length {self.max_length}")
        rows = 1 if last_only else seq
        b = self._binding
        if seq == 1:  # decode: rewrite the bound buffers, bind only the (longer) mask
            self._step_ids[...] = ids
            if not self._decode_bound:
                b.bind_ortvalue_input("input_ids", self._step_ids_ov)
                b.bind_ortvalue_input("logits_to_keep", self._keep_one_ov)
                b.bind_ortvalue_output("logits", self._step_logits_ov)
                self._decode_bound = True
            logits = self._step_logits
        else:
            self._decode_bound = False
            b.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
            b.bind_cpu_input("logits_to_keep", np.array([rows], np.int64))
            if rows == 1:
                logits, ov = self._step_logits, self._step_logits_ov
            else:  # ORT writes straight into a fresh array (no copy of S x V floats)
                logits = np.empty((self.batch, rows, self._step_logits.shape[-1]), np.float32)
                ov = ort.OrtValue.ortvalue_from_numpy(logits)
            b.bind_ortvalue_output("logits", ov)
        b.bind_cpu_input("attention_mask", self._ones[:, : self.length + seq])
        self.decoder.session.run_with_iobinding(b)
        self.length += seq
        return logits.copy() if rows == 1 and copy else logits
