"""Workload: what a latency number measures. Every latency names one.

Written as ``PHASE[:key=value,...]``, e.g. ``decode:ctx=256``,
``prefill:ctx=128``, ``e2e:ctx=133,new=64,batch=1``.

* ``decode``  — time of one new token with ``context`` tokens already in the KV cache;
* ``prefill`` — time to first token for a ``context``-token prompt;
* ``e2e``     — prefill of ``context`` tokens plus ``new_tokens`` decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmshrink import serde
from llmshrink.errors import UsageError

Phase = Literal["decode", "prefill", "e2e"]
PHASES = ("decode", "prefill", "e2e")
_KEYS = {"ctx": "context", "context": "context", "batch": "batch", "new": "new_tokens", "new_tokens": "new_tokens"}


@serde.serializable("Workload")
@dataclass(frozen=True)
class Workload:
    """Phase, batch size, context length and (for e2e) generated tokens."""

    phase: Phase = "decode"
    batch: int = 1
    context: int = 256
    new_tokens: int = 0

    def __str__(self) -> str:
        s = f"{self.phase}:batch={self.batch},ctx={self.context}"
        return s + (f",new={self.new_tokens}" if self.phase == "e2e" else "")

    def describe(self) -> str:
        """Words for tables: 'decode, batch 1, 256 tokens in cache'."""
        what = {"decode": f"{self.context} tokens in cache", "prefill": f"{self.context}-token prompt",
                "e2e": f"{self.context}-token prompt + {self.new_tokens} new tokens"}[self.phase]
        return f"{self.phase}, batch {self.batch}, {what}"


def parse_workload(text: str) -> Workload:
    """Parse ``PHASE[:key=value,...]`` (keys: ctx, batch, new).

    Raises:
        UsageError: unknown phase or key, or a value that is not a positive integer.
    """
    phase, _, rest = text.strip().partition(":")
    if phase not in PHASES:
        raise UsageError(f"Unknown workload phase {phase!r} in {text!r}.",
                         "Write e.g. decode:ctx=256, prefill:ctx=128 or e2e:ctx=133,new=64.")
    kw: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, _, value = item.partition("=")
        if key not in _KEYS:
            raise UsageError(f"Unknown workload key {key!r} in {text!r}.", "Keys: ctx, batch, new.")
        try:
            n = int(value)
        except ValueError:
            n = -1
        if n < 0 or (n == 0 and key != "new"):
            raise UsageError(f"Workload {key}={value!r} in {text!r} is not a positive integer.")
        kw[_KEYS[key]] = n
    w = Workload(phase=phase, **kw)
    if w.phase == "e2e" and w.new_tokens == 0:
        w = Workload(w.phase, w.batch, w.context, 64)
    return w
