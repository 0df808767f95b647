"""Moves of the search away from its start, checked with a real forward before they settle.

The architecture logits learn from straight-through estimates: a first-order
guess of what a choice costs, made on a few sampled subnets. For a small
change (one linear's format) the guess is good; for a large one it can be far
off. On SmolLM2-135M at 1.0x int4 (Sapphire Rapids, 2026-12-02) the estimates
drove layer 2 from nine query heads to three within 30 steps; the decision
settled, and the subnet's screening KL rose from 0.117 (its start) to 0.198:
the search shipped nothing better than the baseline it started from.

So a decision that is about to settle on a candidate other than its start's
(a *move*) is first measured: the KD of the current most probable subnet
(every decision at its argmax) against the same subnet with only that
decision put back at its start, on one fixed batch of the architecture rows,
and the two subnets' latency from the target's table. The move stays when

    KD(with the move) − KD(without it)  ≤  λ / budget · (latency saved by it, ms)

that is, when what it costs in KD is no more than the latency it saves is
worth at the search's own price of a millisecond (``λ_lat / budget``: the
latency penalty's slope; a move that costs latency, such as an 8-bit
format, must buy at least its price in KD). A move that fails is undone:
the decision is frozen at its start (:meth:`.supernet.Supernet.freeze`).

At the end of a search, every decision whose argmax still differs from its
start and was not checked is checked the same way, so nothing the search
hands the fit moved away from its start unmeasured. Decisions inside a block
the current subnet drops change nothing the forward sees and are not
checked.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmshrink import serde
from llmshrink.spec import LINEARS

# per decision: how a row is named and where its candidates' values live in the SearchSpace
_NAMES: dict[str, tuple[Callable[[tuple[int, ...]], str], Callable]] = {
    "hidden": (lambda r: "hidden size", lambda s: s.hidden),
    "lm_head": (lambda r: "lm_head format", lambda s: s.lm_head_formats),
    "keep": (lambda r: f"block {r[0]}", lambda s: ("drop", "keep")),
    "kv": (lambda r: f"layer {r[0]} kv groups", lambda s: s.kv_groups),
    "hpg": (lambda r: f"layer {r[0]} heads per group", lambda s: s.heads_per_group),
    "mlp": (lambda r: f"layer {r[0]} MLP size", lambda s: s.mlp),
    "prec": (lambda r: f"layer {r[0]} {LINEARS[r[1]]} format", lambda s: s.formats),
}
_LAYERED = ("kv", "hpg", "mlp", "prec")  # decisions that belong to one block


@serde.serializable("MoveCheck")
@dataclass(frozen=True)
class MoveCheck:
    """One move measured: the decision, its start and the candidate it moved to, the KD of the current
    subnet with it and without it (on the same rows), the predicted latency it saves (negative: it costs)
    and the price of a millisecond it was judged at (KD per ms), and whether it stayed."""

    step: int
    decision: str
    start: str
    to: str
    kd_with: float
    kd_without: float
    saved_ms: float
    price_per_ms: float
    accepted: bool


@dataclass
class MoveState:
    """What :func:`check_moves` carries through a search: each decision's start (candidate indices, as
    :meth:`.supernet.Supernet.choice_indices` gives them) and the moves checked so far."""

    start: dict[str, torch.Tensor]
    checks: list[MoveCheck]

    def accepted(self, space, key: str, row: tuple[int, ...], index: int) -> bool:
        """Whether moving decision ``key``'s row ``row`` to candidate ``index`` was measured and kept."""
        name, to = _NAMES[key][0](row), str(_NAMES[key][1](space)[index])
        return any(c.accepted and c.decision == name and c.to == to for c in self.checks)


def _rows(t: torch.Tensor):
    return itertools.product(*(range(n) for n in t.shape))


def moves_away(net, state: MoveState, rows: dict[str, torch.Tensor] | None = None) -> list[tuple[str, tuple]]:
    """The decision rows (``(decision, row)``) whose argmax differs from their start, among ``rows`` (bool
    masks per decision; None: all), leaving out rows of blocks the current subnet drops, rows whose start
    is no longer alive and moves already accepted."""
    current = net.choice_indices()
    out = []
    for k, cur in current.items():
        for row in _rows(cur):
            idx, start = int(cur[row]), int(state.start[k][row])
            if idx == start or (rows is not None and not bool(rows[k][row])):
                continue
            if k in _LAYERED and int(current["keep"][row[0]]) == 0:
                continue  # the block is out: this row changes nothing the forward sees
            if not bool(net.alive(k)[row + (start,)]) or state.accepted(net.space, k, row, idx):
                continue
            out.append((k, row))
    return out


@torch.no_grad()
def _kd(net, ids: torch.Tensor, target: torch.Tensor, probs, loss: Callable, chunk: int = 4) -> float:
    total = 0.0
    for s in range(0, len(ids), chunk):
        total += float(loss(net(ids[s:s + chunk], probs), target[s:s + chunk])) * len(ids[s:s + chunk])
    return total / len(ids)


def check_moves(net, state: MoveState, rows: list[tuple[str, tuple]], ids: torch.Tensor, target: torch.Tensor, *,
                table, workload, price_per_ms: float, step: int, lead: float, loss: Callable) -> list[MoveCheck]:
    """Measure each move in ``rows`` against the current most probable subnet (see module docstring); freeze
    the ones that fail at their start (logit lead ``lead``). ``loss(student_logits, target)`` is the search's
    KD (passed in: the search imports this module). Appends to and returns ``state.checks``' new entries.
    Costs one forward of ``ids`` for the subnet plus one per move."""
    if not rows:
        return []
    current = net.choice_indices()
    probs = net.onehot(current)
    kd_with = _kd(net, ids, target, probs, loss)
    lat_with = float(net.expected_latency(table, workload, probs))
    new = []
    for k, row in rows:
        start, idx = int(state.start[k][row]), int(current[k][row])
        alt = {key: v.clone() for key, v in current.items()}
        alt[k][row] = start
        p = net.onehot(alt)
        kd_without = _kd(net, ids, target, p, loss)
        saved = float(net.expected_latency(table, workload, p)) - lat_with
        ok = kd_with - kd_without <= price_per_ms * saved
        if not ok:
            net.freeze(k, row, start, lead)
        values = _NAMES[k][1](net.space)
        new.append(MoveCheck(step, _NAMES[k][0](row), str(values[start]), str(values[idx]), kd_with, kd_without,
                             saved, price_per_ms, ok))
    state.checks.extend(new)
    return new
