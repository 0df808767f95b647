"""Sliding-window perplexity, the standard way (as the transformers docs compute it).

The text is tokenized once. Each window scores the next ``stride`` tokens
not scored yet, reading them with the ``context - stride`` tokens before
them (fewer at the start), so every token after the first is predicted
exactly once, with at least ``context - stride`` tokens of history once the
text is long enough. ``stride`` must be below ``context`` (a scored token
needs at least one token before it in its window); a smaller stride gives
each prediction more context and costs more windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmshrink import serde
from llmshrink.errors import UsageError
from llmshrink.progress import NULL_PROGRESS, Progress


@serde.serializable("PerplexityResult")
@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one text, with the method's parameters."""

    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    context: int
    stride: int
    windows: int
    source: str = ""

    @property
    def quality_key(self) -> str:
        """The manifest's name for this figure (``llmshrink eval`` records it under this key)."""
        return ppl_key(self.source, self.context, self.stride, self.tokens)

    def summary(self) -> str:
        return (f"perplexity {self.ppl:.3f} over {self.tokens:,} tokens (sliding window: context {self.context}, "
                f"stride {self.stride}, {self.windows} windows)")


def ppl_key(source: str, context: int, stride: int, scored_tokens: int) -> str:
    """Manifest quality key of a perplexity: ``ppl:{file name}:ctx{context}:stride{stride}:tokens{scored}``.

    ``scored_tokens`` is one less than the tokens read (the first has no prediction).
    """
    return f"ppl:{Path(source).name}:ctx{context}:stride{stride}:tokens{scored_tokens}"


def perplexity(scorer, ids: np.ndarray, *, context: int = 512, stride: int = 256, source: str = "",
               progress: Progress = NULL_PROGRESS) -> PerplexityResult:
    """Sliding-window perplexity of ``ids`` under ``scorer`` (see module docstring).

    Raises:
        UsageError: stride/context out of range, or fewer than two tokens.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if not 0 < stride < context:
        raise UsageError(f"stride {stride} must be in 1..{context - 1} (below the context, {context}).")
    if context > scorer.max_length:
        raise UsageError(f"context {context} exceeds what {scorer.name} accepts ({scorer.max_length}).",
                         "Lower --context, or re-export the bundle with a larger --max-length.")
    if len(ids) < 2:
        raise UsageError("The text has fewer than two tokens; nothing to predict.")
    total, count, windows, pos = 0.0, 0, 0, 1  # position 0 is never predicted
    with progress.task(f"Perplexity of {scorer.name}", total=-(-(len(ids) - 1) // stride)) as task:
        while pos < len(ids):
            end = min(pos + stride, len(ids))
            begin = max(0, end - context)
            lp = scorer.logprobs(ids[begin:end])
            targets = np.arange(pos, end)
            total -= float(lp[targets - begin - 1, ids[targets]].sum())
            count += len(targets)
            pos, windows = end, windows + 1
            task.advance(1)
    nll = total / count
    return PerplexityResult(float(np.exp(nll)), nll, count, context, stride, windows, source)
