"""Importance of heads, MLP neurons, hidden channels and blocks, measured on calibration text.

Activation-based, as Minitron ranks width (Muralidharan et al. 2024, "Compact
Language Models via Pruning and Knowledge Distillation"): one forward pass
over calibration batches with hooks, no gradients.

- MLP neuron ``j`` of a layer: the magnitude of its activation
  ``act(gate_j) * up_j`` (the input of ``down_proj``).
- Query head: the L2 norm of its attention output (its slice of ``o_proj``'s
  input). A kv group scores the sum of its query heads; heads are ranked
  within their group, so any number of groups x heads per group is a prefix.
- Head size: value dimensions by their magnitude in the attention output;
  rotary pairs ``(d, d + head_dim/2)`` by the energy of q times k on them.
- Hidden channel: its magnitude at the output of every RMSNorm (each
  layer's two and the final one), combined — what every consumer reads.
- Block: what dropping it alone costs, measured: the mean per-token forward
  KL from the original model to the model without that block, on the first
  calibration batches (the perplexity criterion of Kim et al. 2024,
  "Shortened LLaMA", in the distillation loss the search and recovery use).
  ShortGPT's block influence (``1 - cos(input, output)`` of the residual
  stream, Men et al. 2024), measured before, misranked SmolLM2-135M: block
  11, 12th-least influential of 30, costs KL 2.31 to drop, its least
  influential block 14 0.12 (fp32, WikiText-2 screening rows). One extra
  forward per block and batch.

Per-token magnitudes are averaged over the sequence and combined over
sequences by an L2 norm (Minitron's best aggregation: mean over the
sequence, L2 over the batch). Orders put the most important first, so a
candidate width is a prefix (weight entanglement); see :meth:`Importance.apply`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch

from llmshrink.device import device_of
from llmshrink.host import release_freed_memory
from llmshrink.progress import NULL_PROGRESS, Progress
from llmshrink.spec import BaseShape, LayerOrder, SubnetSpec


@dataclass(frozen=True)
class Importance:
    """Scores (higher = more important), arrays in base coordinates.

    Attributes:
        heads: ``[layers, num_heads]``.
        v_dims: ``[layers, head_dim]``.
        rope_pairs: ``[layers, head_dim // 2]``.
        mlp: ``[layers, intermediate_size]``.
        hidden: ``[hidden_size]``.
        blocks: ``[layers]`` the KL from the original when the block alone is dropped (see module docstring).
        tokens: calibration tokens read.
    """

    base: BaseShape
    heads: np.ndarray
    v_dims: np.ndarray
    rope_pairs: np.ndarray
    mlp: np.ndarray
    hidden: np.ndarray
    blocks: np.ndarray
    tokens: int

    def layer_order(self, i: int) -> LayerOrder:
        b = self.base
        per = b.heads_per_group
        heads = self.heads[i].reshape(b.num_kv_heads, per)
        return LayerOrder(
            kv_groups=_desc(heads.sum(1)),
            heads_in_group=tuple(_desc(heads[g]) for g in range(b.num_kv_heads)),
            rope_pairs=_desc(self.rope_pairs[i]), v_dims=_desc(self.v_dims[i]), mlp=_desc(self.mlp[i]))

    def hidden_order(self) -> tuple[int, ...]:
        return _desc(self.hidden)

    def block_order(self) -> tuple[int, ...]:
        """Blocks, most important first: keeping ``k`` blocks keeps the first ``k`` of this."""
        return _desc(self.blocks)

    def apply(self, spec: SubnetSpec, *, choose_blocks: bool = True) -> SubnetSpec:
        """``spec`` with these importance orders; with ``choose_blocks``, its number of kept
        blocks moved onto the most important ones (each keeping its own layer's shape)."""
        layers = [replace(ls, order=self.layer_order(i)) for i, ls in enumerate(spec.layers)]
        if choose_blocks:
            n = len(spec.kept_layers())
            keep = set(self.block_order()[:n])
            layers = [replace(ls, keep=i in keep) for i, ls in enumerate(layers)]
        return replace(spec, layers=tuple(layers), hidden_order=self.hidden_order())

    def preference(self, spec: SubnetSpec) -> float:
        """How much of the model's importance ``spec`` keeps, as a negative loss (0 = nothing removed): the
        prior a fit without a search steps down by (:func:`~.budget.fit_to_budget`'s ``preference``).

        Each block weighs its share of the total block drop cost; dropping it loses all of that share.
        Narrowing a kept block loses, out of that share, half (the attention) times the fraction of the
        head importance energy (squared scores) its kept heads leave out, and half (the MLP) times the
        MLP neurons' fraction likewise (head size cuts count into the attention's half through the value
        dimensions). Narrowing the hidden width loses the fraction of hidden-channel energy left out, of
        every block. Kept widths are the most important prefix (what :meth:`apply` gives). A prior, not a
        measurement: it ranks cuts the way the importance orders rank channels, one unit across kinds.
        """
        b = self.base
        share = np.maximum(np.asarray(self.blocks, dtype=np.float64), 0.0)
        share = share / share.sum() if share.sum() > 0 else np.full(b.num_layers, 1.0 / b.num_layers)
        loss = _left_out(self.hidden, spec.hidden_size)
        for i, ls in enumerate(spec.layers):
            if not ls.keep:
                loss += share[i]
                continue
            per = ls.num_heads // ls.num_kv_heads
            heads = self.heads[i].reshape(b.num_kv_heads, b.heads_per_group)
            groups = np.argsort(-heads.sum(1), kind="stable")[:ls.num_kv_heads]
            kept = sum(float(np.sort(heads[g] ** 2)[::-1][:per].sum()) for g in groups)
            attn = 1.0 - kept / max(float((heads ** 2).sum()), 1e-30)
            attn = 1.0 - (1.0 - attn) * (1.0 - _left_out(self.v_dims[i], ls.head_dim))
            loss += share[i] * 0.5 * (attn + _left_out(self.mlp[i], ls.intermediate_size))
        return -float(loss)


def _left_out(scores: np.ndarray, keep: int) -> float:
    """The fraction of ``scores``' energy (sum of squares) outside its ``keep`` largest."""
    sq = np.sort(np.asarray(scores, dtype=np.float64) ** 2)[::-1]
    total = float(sq.sum())
    return 0.0 if total <= 0 else 1.0 - float(sq[:keep].sum()) / total


def _desc(x: np.ndarray) -> tuple[int, ...]:
    # stable: ties keep base order, so equal scores give the identity
    return tuple(int(i) for i in np.argsort(-np.asarray(x, dtype=np.float64), kind="stable"))


class _Acc:
    """Sum of squares over sequences of per-sequence mean magnitudes (L2 over the batch)."""

    def __init__(self) -> None:
        self.sq: torch.Tensor | None = None

    def add(self, per_seq: torch.Tensor) -> None:  # [B, N]
        s = per_seq.double().pow(2).sum(0)
        self.sq = s if self.sq is None else self.sq + s

    def value(self) -> np.ndarray:
        return self.sq.sqrt().cpu().numpy()


DROP_BATCHES = 4  # calibration batches the block drop costs are measured on (16 sequences at compress's size 4)


class _Stats:
    """The width statistics, gathered by forward hooks on an HF layer's modules (one pass, no gradients).

    Hooks see what the modules compute, so the whole model and one streamed layer give the same numbers.
    """

    def __init__(self, base: BaseShape) -> None:
        self.base = base
        self.acc = {k: [_Acc() for _ in range(base.num_layers)] for k in ("heads", "v", "q", "k", "mlp")}
        self.hidden = _Acc()

    def hook_layer(self, i: int, layer) -> list:
        """Hooks on HF decoder layer ``i`` (its attention's o/q/k projections, its MLP's down_proj, its norms)."""
        base, acc = self.base, self.acc
        hd, half = base.head_dim, base.head_dim // 2
        att, mlp = layer.self_attn, layer.mlp

        def o_in(_m, args):
            x = args[0].float()
            B, T, _ = x.shape
            h = x.view(B, T, base.num_heads, hd)
            acc["heads"][i].add(h.norm(dim=-1).mean(1))
            acc["v"][i].add(h.abs().mean(2).mean(1))

        def qk_out(kind, heads):
            def fn(_m, _args, out):
                x = out.float()
                B, T, _ = x.shape
                e = x.view(B, T, heads, hd).pow(2)
                acc[kind][i].add((e[..., :half] + e[..., half:]).mean(2).sqrt().mean(1))
            return fn

        return [att.o_proj.register_forward_pre_hook(o_in),
                att.q_proj.register_forward_hook(qk_out("q", base.num_heads)),
                att.k_proj.register_forward_hook(qk_out("k", base.num_kv_heads)),
                mlp.down_proj.register_forward_pre_hook(lambda _m, args: acc["mlp"][i].add(args[0].abs().mean(1))),
                *(self.hook_norm(norm) for norm in (layer.input_layernorm, layer.post_attention_layernorm))]

    def hook_norm(self, norm):
        """Hook on an RMSNorm: its output's channel magnitudes go into the hidden-channel score."""
        return norm.register_forward_hook(lambda _m, _a, out: self.hidden.add(out.abs().mean(1)))

    def importance(self, blocks: np.ndarray, tokens: int) -> Importance:
        acc = self.acc
        q = np.stack([a.value() for a in acc["q"]])
        k = np.stack([a.value() for a in acc["k"]])
        return Importance(self.base, heads=np.stack([a.value() for a in acc["heads"]]),
                          v_dims=np.stack([a.value() for a in acc["v"]]), rope_pairs=q * k,
                          mlp=np.stack([a.value() for a in acc["mlp"]]), hidden=self.hidden.value(),
                          blocks=blocks, tokens=tokens)


@torch.no_grad()
def measure_importance(model, batches: Iterable[torch.Tensor], *, progress: Progress = NULL_PROGRESS,
                       total: int | None = None, drop_batches: int = DROP_BATCHES) -> Importance:
    """Run ``model`` (an HF Llama-family causal LM) over ``batches`` of token ids ``[B, T]`` and score everything;
    each block's drop cost is measured on the first ``drop_batches`` of them (:func:`block_drop_kl`).

    Padding is not supported: give full-length sequences (calibration chunks). :func:`measure_importance_streamed`
    gives the same scores with the weights read from disk a layer at a time.
    """
    batches = list(batches)
    stats = _Stats(BaseShape.from_config(model.config))
    hooks = [h for i, layer in enumerate(model.model.layers) for h in stats.hook_layer(i, layer)]
    hooks.append(stats.hook_norm(model.model.norm))
    tokens = 0
    dev = device_of(model)
    try:
        with progress.task("Importance (heads, neurons, channels, blocks)", total=total) as task:
            for ids in batches:
                model(input_ids=ids.to(dev), use_cache=False)
                tokens += ids.numel()
                task.advance(1)
    finally:
        for h in hooks:
            h.remove()
    return stats.importance(block_drop_kl(model, batches[:max(drop_batches, 1)], progress=progress), tokens)


def _kl(logits: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean forward KL per token from ``teacher`` (log-probabilities) to ``logits``, as search.kd_loss."""
    import torch.nn.functional as F

    return float(F.kl_div(torch.log_softmax(logits.float(), -1), teacher, log_target=True,
                          reduction="none").sum(-1).mean())


class _Caught(Exception):
    """Raised by the first decoder layer once it has seen its inputs: nothing after it has weights to run."""


def _first_layer_inputs(lazy, batches: list[torch.Tensor], device) -> list[tuple[torch.Tensor, dict]]:
    """Per batch, what the HF model hands its first decoder layer: (hidden states, keyword arguments: mask,
    rotary cos/sin, positions). Run through the model's own forward with only the embedding loaded, so the
    mask and positions are the ones a whole-model forward makes (llm-compressor catches them the same way)."""
    core = lazy.model.model
    first = core.layers[0]
    caught: list[tuple[torch.Tensor, dict]] = []

    def catch(*args, **kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        caught.append((x, kwargs))
        raise _Caught

    embed = lazy.load("model.embed_tokens", core.embed_tokens).to(device)
    core.rotary_emb.to(device)
    first.forward = catch  # an instance attribute shadows Module.forward
    try:
        for ids in batches:
            with contextlib.suppress(_Caught):
                core(input_ids=ids.to(device), use_cache=False)
    finally:
        del first.forward
        lazy.release(embed)
    return caught


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def measure_importance_streamed(lazy, batches: Iterable[torch.Tensor], *, device=None,
                                progress: Progress = NULL_PROGRESS, drop_batches: int = DROP_BATCHES) -> Importance:
    """:func:`measure_importance` with the weights streamed from disk, one decoder layer at a time (layer streaming).

    Each layer of ``lazy`` (a :class:`~llmshrink.models.lazy.LazyModel`) is read from safetensors, runs every
    batch with the statistics' hooks, then (without them) carries each block-drop branch one layer on, and is
    dropped. A branch is the residual stream of the first ``drop_batches`` batches with one earlier block
    skipped: it starts as that block's input and goes through every later layer, so each drop cost is the
    whole path's computation (:func:`block_drop_kl`), done in one read of the weights. The same scores as the
    whole path (the hidden-channel sums are added in another order: equal to float64 rounding).

    Peak memory: one decoder layer (then the final norm and lm_head), the hidden states of every batch, and
    the branches' (``layers x drop_batches`` batches of hidden states, what the whole path records too), never
    the whole model; the teacher's log-probabilities are made for one batch at a time (the whole path keeps
    them for every drop batch).

    Args:
        device: where the layers run (default the CPU); they are read on the host and moved there one at a time.
    """
    batches = list(batches)
    device = torch.device("cpu" if device is None else device)
    base = BaseShape.from_config(lazy.config)
    vocab = int(lazy.config.vocab_size)
    stats = _Stats(base)
    inputs = _first_layer_inputs(lazy, batches, device)
    xs = [x for x, _ in inputs]
    kwargs = [kw for _, kw in inputs]
    n_drop = min(max(drop_batches, 1), len(batches))
    branches: list[list[torch.Tensor]] = []  # [skipped block][drop batch]
    core = lazy.model.model
    with progress.task("Importance (streamed layer by layer)", total=base.num_layers + 1) as task:
        for i in range(base.num_layers):
            layer = lazy.layer(i).to(device)
            hooks = stats.hook_layer(i, layer)
            try:
                ys = [_hidden(layer(x, **kw)) for x, kw in zip(xs, kwargs, strict=True)]
            finally:
                for h in hooks:
                    h.remove()
            branches = [[_hidden(layer(x, **kwargs[b])) for b, x in enumerate(br)] for br in branches]
            branches.append(xs[:n_drop])  # block i skipped: its input goes on unchanged
            xs = ys
            lazy.release(layer)
            # glibc keeps what a layer's forwards freed: give it back, or the streamed peak grows layer by layer
            release_freed_memory()
            task.advance(1)
        norm = lazy.load("model.norm", core.norm).to(device)
        head = lazy.load("lm_head", lazy.model.lm_head).to(device)
        try:
            hook = stats.hook_norm(norm)
            try:
                hs = [norm(x) for x in xs]
            finally:
                hook.remove()
            hs = hs[:n_drop]
            del xs
            cost = np.zeros(base.num_layers)
            for b in range(n_drop):  # one batch's teacher at a time; each cost still adds its batches in order
                teacher = torch.log_softmax(head(hs[b])[..., :vocab].float(), -1)
                for i, br in enumerate(branches):
                    cost[i] += _kl(head(norm(br[b]))[..., :vocab], teacher) * batches[b].numel()
                    br[b] = None  # done with: the branches' states go as their costs are taken
                del teacher
        finally:
            lazy.release(norm)
            lazy.release(head)
            core.rotary_emb.to("cpu")
        task.advance(1)
    drop_tokens = sum(ids.numel() for ids in batches[:n_drop])
    return stats.importance(cost / max(drop_tokens, 1), sum(ids.numel() for ids in batches))


@torch.no_grad()
def block_drop_kl(model, batches: Iterable[torch.Tensor], *, progress: Progress = NULL_PROGRESS) -> np.ndarray:
    """``[layers]``: the mean per-token forward KL from ``model`` to ``model`` with block ``i`` alone skipped
    (its output replaced by its input: the residual stream passes it by), over ``batches`` ``[B, T]``.

    The cost a drop has, not a proxy for it. Each block's output on each batch is kept from one full pass, so
    the pass without block ``i`` runs only the blocks after it (and the lm_head): ~0.6 of a forward per block
    and batch. Pairs of drops are not measured (a fit dropping several blocks sums them; they are roughly
    additive while few are dropped).
    """
    layers = list(model.model.layers)
    dev = device_of(model)
    vocab = int(model.config.vocab_size)
    batches = [ids.to(dev) for ids in batches]
    cost = np.zeros(len(layers))
    outputs: list[list[object]] = [[] for _ in batches]  # [batch][layer]: that block's output in the full pass

    def record(b):
        return [layer.register_forward_hook(lambda _m, _a, out, b=b: outputs[b].append(out)) for layer in layers]

    teacher = []
    for b, ids in enumerate(batches):
        hooks = record(b)
        try:
            teacher.append(torch.log_softmax(model(input_ids=ids, use_cache=False).logits[..., :vocab].float(), -1))
        finally:
            for h in hooks:
                h.remove()

    def passthrough(b, i):  # the dropped block: its input goes on unchanged, in the type the block returns
        def forward(*args, **kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            out = outputs[b][i]
            return (x, *out[1:]) if isinstance(out, tuple) else x
        return forward

    with progress.task("Block drop costs", total=len(layers)) as task:
        for i, layer in enumerate(layers):
            for b, (ids, t) in enumerate(zip(batches, teacher, strict=True)):
                # blocks before i replay their recorded outputs (instance attributes shadow Module.forward)
                for j in range(i):
                    layers[j].forward = lambda *a, out=outputs[b][j], **k: out
                layer.forward = passthrough(b, i)
                try:
                    out = model(input_ids=ids, use_cache=False).logits[..., :vocab]
                finally:
                    for j in range(i + 1):
                        del layers[j].forward
                cost[i] += _kl(out, t) * ids.numel()
            task.advance(1)
    tokens = sum(ids.numel() for ids in batches)
    return cost / max(tokens, 1)

