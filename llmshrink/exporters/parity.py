"""Numerical parity of an exported decoder with its torch CompressedModel.

Run on every export: a prefill of most of a token sequence, then one-token
decode steps with the KV cache, in both runtimes, logits compared.

Thresholds, by what the spec contains:

* float formats only: max |Δlogit| ≤ 1e-3 (fp32 activations; the trt
  flavour computes in fp16 and is held to top-1 ≥ 99% instead);
* integer weights, float activations: top-1 agreement ≥ 99% (the kernels
  reproduce the codes exactly, so anything less is a bug);
* int8 activations anywhere: the graph's top-1 token is among the torch
  model's top 5 for ≥ 95% of positions. Activation rounding is
  discontinuous: on SmolLM2-135M a 1e-6 relative change of the embeddings
  alone moves top-1 agreement of the torch model with itself to ~95% over
  512 tokens, and a heavily pruned model, whose logits are flatter, has more
  near-ties for that noise to flip (a searched SmolLM2 subnet at 18/30
  blocks: 89% top-1 agreement). Flips between near-tied tokens stay inside
  the reference's top few; a wrong scale, layer or cache does not.
* static int8 activations in the trt flavour (``w8a8s``, fp16 graph): the
  fp16 inputs alone move the per-tensor rounding far more (one int8 step of
  a max-calibrated scale is large), so the bar is the reference's own
  stability: the torch model run again with every linear input rounded to
  fp16 — the graph's perturbation, nothing else — gives a top-1-in-top-5
  share on the same tokens, and the graph must reach it less
  :data:`STATIC_MARGIN`. On SmolLM2-135M uniform ``w8a8s`` that
  self-agreement is 86% in the top 5 (60% top-1) over 512 tokens; a wrong
  scale or layout falls far below it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np

from llmshrink.formats import parse_format

PARITY_TEXT = (
    "The river bends twice before it reaches the town. In spring the water rises over the old stone "
    "steps, and the children count how many are left above the surface. The baker says the count has "
    "been falling for years; the ferryman says it was always like this. Nobody keeps a record, so the "
    "argument goes on, a little louder each time the water comes up."
)


MIN_TOP1_IN_TOP5 = 0.95  # the int8-activation rule (see module docstring)
STATIC_MARGIN = 0.10  # the static-int8 rule: allowance below the reference's own fp16 stability (64 tokens)
STATIC_RULE = "static int8 activations in fp16: top-1 in torch's top-5 >= torch's own under fp16 inputs - 10 pts"


@dataclass(frozen=True)
class ParityReport:
    """Outcome of one parity check."""

    max_abs_diff: float
    top1_agreement: float
    tokens: int
    rule: str
    passed: bool
    top1_in_top5: float = 1.0  # share of positions whose graph top-1 is in the reference's top 5
    reference_stability: float | None = None  # static-int8 rule: torch's own top-1-in-top-5 under fp16 inputs

    def as_dict(self) -> dict:
        return asdict(self)


def parity_rule(spec, fp16_activations: bool = False) -> tuple[str, float | None, float | None, float | None]:
    """(rule name, max |Δ| allowed, min top-1 agreement, min share of top-1 in the reference's top 5) for
    ``spec``; None where a rule does not bound that figure.

    ``fp16_activations``: the graph computes in fp16 while the torch
    reference is fp32 (the trt flavour), so only top-1 agreement is exact enough.
    """
    fmts = [parse_format(f) for f in spec.formats_used()]
    if fp16_activations and all(f.act == "none" for f in fmts):
        return "fp16 activations: top-1 >= 99%", None, 0.99, None
    if fp16_activations and any(f.act == "int8-static" for f in fmts):
        return STATIC_RULE, None, None, None  # the floor is measured per check (check_parity)
    if all(f.is_float for f in fmts):
        return "float: max|d| <= 1e-3", 1e-3, None, None
    if all(f.act == "none" for f in fmts):
        return "int weights: top-1 >= 99%", None, 0.99, None
    return "int8 activations: top-1 in torch's top-5 >= 95%", None, None, MIN_TOP1_IN_TOP5


def check_parity(cm, decoder, token_ids: np.ndarray, *, decode_steps: int = 8,
                 fp16_activations: bool = False) -> ParityReport:
    """Compare ``cm`` (torch) and ``decoder`` (ORT) on ``token_ids`` ``(1, T)``."""
    import torch

    ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
    split = ids.shape[1] - decode_steps
    a = _logits(decoder.forward, ids, split)
    reference = partial(_torch_step, cm)
    b = _logits(reference, ids, split)
    diff = float(np.abs(a - b).max())
    agree = float((a.argmax(-1) == b.argmax(-1)).mean())
    in_top5 = top1_in_top5(a, b)
    rule, max_diff, min_top1, min_top5 = parity_rule(cm.spec, fp16_activations)
    own = None
    if rule == STATIC_RULE:
        with rounded_inputs(cm, torch.float16):
            own = top1_in_top5(_logits(reference, ids, split), b)
        min_top5 = own - STATIC_MARGIN
    passed = ((max_diff is None or diff <= max_diff) and (min_top1 is None or agree >= min_top1)
              and (min_top5 is None or in_top5 >= min_top5))
    return ParityReport(diff, agree, int(ids.shape[1]), rule, passed, in_top5, own)


def _logits(step, ids: np.ndarray, split: int) -> np.ndarray:
    """Logits ``(1, T, V)``: a prefill of ``ids[:, :split]``, then one decode step per remaining token."""
    o, past = step(ids[:, :split])
    out = [o]
    for i in range(split, ids.shape[1]):
        o, past = step(ids[:, i:i + 1], past)
        out.append(o)
    return np.concatenate(out, 1)


def _torch_step(cm, ids: np.ndarray, past=None):
    import torch

    with torch.no_grad():
        t, past = cm(torch.from_numpy(ids), past)
    return t.numpy(), past


def top1_in_top5(a: np.ndarray, b: np.ndarray) -> float:
    """Share of positions whose top-1 in ``a`` is among ``b``'s top 5."""
    top5 = np.argsort(-b, -1)[..., :5]
    return float((top5 == a.argmax(-1)[..., None]).any(-1).mean())


@contextmanager
def rounded_inputs(cm, dtype):
    """Within the block, every linear of ``cm`` rounds its input to ``dtype`` first (what an fp16 graph feeds it)."""
    from llmshrink.compressor.model import QuantLinear

    layers = [m for m in cm.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.round_input = dtype
    try:
        yield
    finally:
        for m in layers:
            m.round_input = None
