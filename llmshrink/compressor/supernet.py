"""Supernet: every subnet of a SearchSpace in one model, weighted by architecture probabilities.

Weights are reordered once by importance (:mod:`.importance`) so that every
candidate width is a prefix of one shared tensor (weight entanglement). Each
decision has logits; a forward pass computes the *expected* network under
their softmax (optionally Gumbel-perturbed, with a temperature):

- widths (hidden, MLP, kv groups, heads per group): a soft mask per channel,
  ``mask[c] = sum_i p_i * [c < w_i]`` — the probability that channel ``c``
  survives — built for all candidates at once as ``probs @ indicator`` (no
  loop over candidates). A query head's mask is its group's mask times its
  rank's mask. Hidden channels are masked in the residual stream, and
  RMSNorm divides by the expected number of kept channels, so at one-hot
  probabilities each norm is exactly the subnet's norm over its channels.
- depth: a block adds ``p(keep) * (attention + MLP)`` to the residual stream.
- precision: each linear uses ``W + sum_k p_k * (Q_k(W) - W)``, the expected
  fake-quantized weight, with the quantization residuals detached (straight-
  through estimator: weights get the full-precision gradient, the logits
  get ``<dL/dW, Q_k(W) - W>``). The residuals of all candidates are one
  stacked tensor and the sum one ``einsum``. Int8 activations (``a8``
  formats) enter the same way, weighted by the probability of an a8 format.

:meth:`Supernet.sample` gives the same forward a one-hot draw instead of
the probabilities (straight-through Gumbel-softmax): one real subnet runs,
through the same masks and expected weights, and the logits get the relaxed
sample's gradient.

Search-time fake quantization rounds to nearest on the export's grid (the
clip-searched scales of :func:`.quant.weight_grid`, computed once per weight
and format); groups there run over kept channels in base order, and the
export rounds with GPTQ, so the search's quantization error is an estimate
of the export's, not a copy.

Settling: :meth:`Supernet.settle` freezes every decision whose normalized
entropy is below a threshold at its argmax, and candidates whose
probability falls below a floor are dropped. Compute then shrinks to the
widest candidate still alive (weights are sliced before the matmuls), a
dropped block is skipped, a frozen precision quantizes once — so steps get
faster as the search settles.

Head size is not searched yet (the space must offer one head size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmshrink.compressor.importance import Importance
from llmshrink.compressor.model import rotate_half
from llmshrink.compressor.quant import fake_quant, quantize_activation, weight_grid
from llmshrink.compressor.space import SearchSpace
from llmshrink.errors import UsageError
from llmshrink.formats import QuantFormat, parse_format
from llmshrink.spec import LINEARS, LayerOrder, LayerSpec, SubnetSpec

# width decision -> the SearchSpace field holding its candidates
WIDTHS = {"hidden": "hidden", "kv": "kv_groups", "hpg": "heads_per_group", "mlp": "mlp"}


def width_mask(probs: torch.Tensor, cands: torch.Tensor, width: int) -> torch.Tensor:
    """``[..., n]`` probabilities over candidate widths ``cands`` ``[n]`` -> ``[..., width]``
    survival probability of each of the first ``width`` channels (all candidates in one matmul)."""
    ind = (torch.arange(width, device=cands.device)[None, :] < cands[:, None]).to(probs.dtype)  # [n, width]
    return probs @ ind


class _ExpectedWeight(torch.autograd.Function):
    """``w + sum_k p_k * r_k`` (the expected fake-quantized weight) without stacking the residuals ``r_k``:
    terms with ``p_k`` ~ 0 (the other formats of a hard sample) cost nothing forward, and the backward gives
    each ``p_k`` its straight-through gradient ``<dL/dw_eff, r_k>`` (the residuals are constants). The
    einsum over a stacked copy this replaces spent most of a sampled forward copying residuals."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, w: torch.Tensor, *resid: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*resid)
        out = w.clone(memory_format=torch.contiguous_format)
        for pk, r in zip(p.tolist(), resid, strict=True):
            if abs(pk) > 1e-7:
                out.add_(r, alpha=pk)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        resid = ctx.saved_tensors
        gp = torch.stack([(grad * r).sum() for r in resid]) if ctx.needs_input_grad[0] else None
        return (gp, grad if ctx.needs_input_grad[1] else None, *(None for _ in resid))


def _permute_rows(w: torch.Tensor, order: list[int]) -> torch.Tensor:
    return w[torch.tensor(order, dtype=torch.long, device=w.device)]


class _Residuals(nn.ParameterDict):
    """One weight's (or one layer's) cached quantization residuals ``Q_k(W) - W``, one frozen tensor per offered
    format (key ``{linear}__{k}``, ``k`` the format's index in the space; formats a linear is not offered have
    none). Parameters, not plain attributes, so that FSDP shards them with the weights they belong to
    (:meth:`Supernet.shard`); never in a state dict: they are recomputed from the weights."""

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        pass

    def get_all(self, name: str, n: int) -> list[torch.Tensor | None]:
        return [self.get(f"{name}__{k}") for k in range(n)]

    def set_all(self, name: str, resid: list[torch.Tensor | None]) -> None:
        for k, r in enumerate(resid):
            key = f"{name}__{k}"
            if key in self:
                del self[key]
            if r is not None:
                self[key] = nn.Parameter(r, requires_grad=False)


class _Layer(nn.Module):
    """One base layer's weights, reordered so that candidate widths are prefixes, and their cached
    quantization residuals (:class:`_Residuals`). Its forward is one block of :meth:`Supernet.forward`: a
    module call, so that FSDP gathers the layer's shards around it (:meth:`Supernet.shard`)."""

    def __init__(self, hf_layer, order: LayerOrder, hidden_idx: torch.Tensor, base) -> None:
        super().__init__()
        hd, per = base.head_dim, base.heads_per_group
        att, mlp = hf_layer.self_attn, hf_layer.mlp
        heads = [g * per + h for g in order.kv_groups for h in order.heads_in_group[g]]  # slot (rank g, rank r)
        q_rows = [u * hd + d for u in heads for d in range(hd)]
        kv_rows = [g * hd + d for g in order.kv_groups for d in range(hd)]
        neurons = torch.tensor(order.mlp, dtype=torch.long, device=hidden_idx.device)

        def p(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().float().clone().contiguous())

        self.q = p(_permute_rows(att.q_proj.weight, q_rows)[:, hidden_idx])
        self.k = p(_permute_rows(att.k_proj.weight, kv_rows)[:, hidden_idx])
        self.v = p(_permute_rows(att.v_proj.weight, kv_rows)[:, hidden_idx])
        self.o = p(att.o_proj.weight[hidden_idx][:, torch.tensor(q_rows, device=hidden_idx.device)])
        self.gate = p(mlp.gate_proj.weight[neurons][:, hidden_idx])
        self.up = p(mlp.up_proj.weight[neurons][:, hidden_idx])
        self.down = p(mlp.down_proj.weight[hidden_idx][:, neurons])
        self.ln1 = p(hf_layer.input_layernorm.weight[hidden_idx])
        self.ln2 = p(hf_layer.post_attention_layernorm.weight[hidden_idx])
        self.resid = _Residuals()
        for lin in (att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            if lin.bias is not None:
                raise UsageError("The supernet does not support biased projections yet.")

    def weight(self, name: str) -> nn.Parameter:
        return getattr(self, {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                              "up_proj": "up", "down_proj": "down"}[name])

    def forward(self, net: Supernet, i: int, x: torch.Tensor, pr: Probs, H: int, m_h: torch.Tensor,
                n_h: torch.Tensor, mask_g: torch.Tensor, mask_r: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """The residual stream ``x`` after base layer ``i`` (attention then MLP, each added with p(keep)).

        With ``net.recompute`` (and gradients on) the block keeps only its input for the backward and runs
        again there (activation checkpointing): its effective weights, one fp32 copy of the layer per linear
        and sample, then live one layer at a time instead of all at once. Same gradients; the backward
        costs one more forward of the block. Inside the module call, so that FSDP's gathers wrap both runs."""
        args = (net, i, x, pr, H, m_h, n_h, mask_g, mask_r, cos, sin)
        if net.recompute and torch.is_grad_enabled():
            # non-reentrant: the architecture probabilities reach the block inside ``pr`` (not as tensor
            # arguments) and still get their gradients
            return checkpoint(self._block, *args, use_reentrant=False)
        return self._block(*args)

    def _block(self, net: Supernet, i: int, x: torch.Tensor, pr: Probs, H: int, m_h: torch.Tensor,
               n_h: torch.Tensor, mask_g: torch.Tensor, mask_r: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        p_keep = pr.keep[i, 1]
        G_a, R_a, I_a = net._top("kv", i), net._top("hpg", i), net._top("mlp", i)
        alive_p, p_lin = net.alive("prec")[i], pr.prec[i]

        def lin(x, name, cut):
            j = LINEARS.index(name)
            return net._linear(x, self.weight(name), self.resid.get_all(name, len(net.fmts)), cut, p_lin[j],
                               alive_p[j], net.fmts)

        h = net._norm(x, self.ln1[:H], n_h)
        if net.vectorized:
            att_out = net._attention(h, lin, G_a, R_a, H, cos, sin,
                                     (mask_g[i, :G_a, None] * mask_r[i, None, :R_a]).reshape(-1))
        else:  # one attention block per (kv groups, heads per group) candidate
            att_out = 0
            for gi, g in enumerate(net.cands_kv.tolist()):
                for ri, r in enumerate(net.cands_hpg.tolist()):
                    if net.alive("kv")[i, gi] and net.alive("hpg")[i, ri]:
                        ones = torch.ones(g * r, device=h.device)
                        att_out = att_out + pr.kv[i, gi] * pr.hpg[i, ri] * net._attention(
                            h, lin, g, r, H, cos, sin, ones)
        x = x + p_keep * att_out * m_h
        h = net._norm(x, self.ln2[:H], n_h)
        if net.vectorized:
            m_mlp = width_mask(pr.mlp[i], net.cands_mlp, I_a)
            rows = lambda t: t[..., :I_a, :H]  # noqa: E731
            a = F.silu(lin(h, "gate_proj", rows)) * lin(h, "up_proj", rows) * m_mlp
            mlp_out = lin(a, "down_proj", lambda t: t[..., :H, :I_a])
        else:  # one MLP per width candidate
            mlp_out = 0
            for wi, w in enumerate(net.cands_mlp.tolist()):
                if net.alive("mlp")[i, wi]:
                    rows = lambda t, w=w: t[..., :w, :H]  # noqa: E731
                    a = F.silu(lin(h, "gate_proj", rows)) * lin(h, "up_proj", rows)
                    mlp_out = mlp_out + pr.mlp[i, wi] * lin(a, "down_proj", lambda t, w=w: t[..., :H, :w])
        return x + p_keep * mlp_out * m_h


@dataclass
class Probs:
    """One forward's choice probabilities (dead candidates have probability 0)."""

    hidden: torch.Tensor  # [nH]
    keep: torch.Tensor  # [L, 2]: (drop, keep)
    kv: torch.Tensor  # [L, nG]
    hpg: torch.Tensor  # [L, nR]
    mlp: torch.Tensor  # [L, nM]
    prec: torch.Tensor  # [L, 7, nP]
    lm_head: torch.Tensor  # [nPh]


class Supernet(nn.Module):
    """The expected network over a SearchSpace (see module docstring).

    Args:
        hf_model: the pretrained HF Llama-family model (left unchanged).
        space: the decisions and their candidates.
        importance: orders that make candidate widths prefixes (None: base order).
        vectorized: False computes the same expectation the way a per-candidate
            (DARTS mixed-op) implementation does — one sub-block per MLP width,
            per head configuration and per format, weighted and summed — the
            baseline the search-throughput benchmark compares with. Hidden
            width is masked either way.
        latency_formats: price the latency with these formats (per linear name and ``lm_head``)
            instead of the precision decisions: the sequential baseline searches at full precision
            and prices each linear in the format it will be quantized to.
    """

    def __init__(self, hf_model, space: SearchSpace, importance: Importance | None = None, *,
                 vectorized: bool = True, latency_formats: dict[str, str] | None = None) -> None:
        super().__init__()
        self.vectorized = vectorized
        # recompute each block in the backward instead of keeping its activations (set by run_search)
        self.recompute = False
        self.latency_formats = latency_formats
        base = space.base
        if len(space.head_dim) != 1 or space.head_dim[0] != base.head_dim:
            raise UsageError("Searching the head size is not supported yet.",
                             f"Use head_dim: [{base.head_dim}] in the space.")
        self.space, self.base = space, base
        self.importance = importance
        self.orders = [importance.layer_order(i) if importance else LayerOrder.identity(base)
                       for i in range(base.num_layers)]
        self.hidden_order = importance.hidden_order() if importance else tuple(range(base.hidden_size))
        m = hf_model.model
        # everything the supernet holds lives where the model's weights do (a GPU, or the CPU); random draws
        # come from CPU generators and are moved, so a seed gives the same search on every device
        dev = m.embed_tokens.weight.device
        hidden_idx = torch.tensor(self.hidden_order, dtype=torch.long, device=dev)
        self.layers = nn.ModuleList(_Layer(m.layers[i], self.orders[i], hidden_idx, base)
                                    for i in range(base.num_layers))
        self.embed = nn.Parameter(m.embed_tokens.weight[:, hidden_idx].detach().float().clone())
        self.final_norm = nn.Parameter(m.norm.weight[hidden_idx].detach().float().clone())
        tied = base.tied_embeddings and hf_model.lm_head.weight.data_ptr() == m.embed_tokens.weight.data_ptr()
        self.lm_head = self.embed if tied else nn.Parameter(
            hf_model.lm_head.weight[:, hidden_idx].detach().float().clone())
        rot = m.rotary_emb
        self.register_buffer("inv_freq", rot.inv_freq.detach().float().clone())
        self.rope_scaling = float(getattr(rot, "attention_scaling", 1.0))
        self.eps = float(hf_model.config.rms_norm_eps)
        self.attn_scale = 1.0 / math.sqrt(base.head_dim)
        L, nP = base.num_layers, len(space.formats)
        shapes = {"hidden": (len(space.hidden),), "keep": (L, 2), "kv": (L, len(space.kv_groups)),
                  "hpg": (L, len(space.heads_per_group)), "mlp": (L, len(space.mlp)),
                  "prec": (L, len(LINEARS), nP), "lm_head": (len(space.lm_head_formats),)}
        self.alpha = nn.ParameterDict({k: nn.Parameter(torch.zeros(s, device=dev)) for k, s in shapes.items()})
        for k, s in shapes.items():
            self.register_buffer(f"alive_{k}", torch.ones(s, dtype=torch.bool, device=dev))
        if not space.depth_search:
            self.alive_keep[:, 0] = False
        # a format is a candidate of a linear only where its group fits the linear's input widths
        self.offered_prec = torch.tensor([[f in space.linear_formats(n) for f in space.formats] for n in LINEARS],
                                         device=dev)
        self.offered_lm_head = torch.tensor([f in space.linear_formats("lm_head") for f in space.lm_head_formats],
                                            device=dev)
        self.alive_prec &= self.offered_prec
        self.alive_lm_head &= self.offered_lm_head
        for k, field in WIDTHS.items():
            self.register_buffer(f"cands_{k}", torch.tensor(getattr(space, field), dtype=torch.long, device=dev))
        self.fmts = [parse_format(f) for f in space.formats]
        self.head_fmts = [parse_format(f) for f in space.lm_head_formats]
        self.head_resid = _Residuals()
        self._has_resid = self._frozen = self._sharded = False
        self._sources: dict = {}  # format -> the run quantizer's model of it (use_quantized)
        self._quantized: dict = {}  # (id(weight), format) -> that model's weight, reordered; read per layer
        self._read: set = set()  # layers (None: the lm_head) read into _quantized
        self._grids = self._make_grids()

    @torch.no_grad()
    def _make_grids(self) -> dict:
        """The export's grid (clip-searched scales per group) of every grouped integer format of every linear, from
        the pretrained weights: fixed for the whole search, so a resumed search rounds exactly as an unbroken one,
        and the ~10 s per format a clip search costs on 135M weights is paid once."""
        grids = {}
        pairs = [(lay.weight(n), self.fmts, self.offered_prec[j]) for lay in self.layers for j, n in enumerate(LINEARS)]
        for w, fmts, offered in [*pairs, (self.lm_head, self.head_fmts, self.offered_lm_head)]:
            for f, ok in zip(fmts, offered, strict=True):
                if ok and not f.is_float and f.group_size is not None:
                    grids[(id(w), f.name)] = weight_grid(w, f)
        return grids

    # ------------------------------------------------------------ parameters
    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.alpha.values())

    def weight_parameters(self) -> list[nn.Parameter]:
        """The weights (the pretrained ones, reordered), without the architecture logits and the cached residuals."""
        skip = {id(p) for p in self.arch_parameters()}
        skip |= {id(p) for m in self.modules() if isinstance(m, _Residuals) for p in m.values()}
        return [p for p in self.parameters() if id(p) not in skip]

    def freeze_weights(self, shard: bool = False) -> None:
        """Fix the weights for good (the search's default: they stay the pretrained ones): no gradient is
        kept for them, their residuals are computed now and kept, and what recomputing them needs (the
        export's grids, the run quantizer's dequantized copies: a float copy of the model per format) is
        freed. :meth:`refresh_quant` is then a no-op.

        ``shard``: also shard the weights and their residuals over the ranks with FSDP (``fully_shard``: one
        unit per decoder layer, the embedding, final norm and lm_head in the root's), so each rank holds
        about 1/N of them and gathers a layer for its forward and again for its backward. Layer by layer:
        each layer's residuals are made and the layer sharded before the next one's are made, so the peak is
        the whole supernet's weights plus one layer's residuals, not every residual at once. The
        architecture logits stay whole on every rank (FSDP ignores them;
        :func:`~llmshrink.distributed.all_reduce_grads` sums their gradients, as without sharding). Every
        rank must then run the same number of forward passes (:func:`.search.run_search` shares its samples
        evenly).

        Raises:
            UsageError: ``shard`` with one process.
        """
        from llmshrink import distributed as dist
        from llmshrink.host import release_freed_memory

        if shard and dist.world_size() == 1:
            raise UsageError("Sharding needs more than one process.",
                             "Start the run with torchrun --nproc-per-node N (N > 1), or leave out --shard fsdp.")
        from torch.distributed.fsdp import fully_shard

        for p in self.weight_parameters():
            p.requires_grad_(False)
        shard = shard and not self._sharded
        # layer by layer (the weights may have been trained: residuals made again, as before every search; frozen
        # already, e.g. by an earlier search of the same supernet, they are what they were)
        for i, lay in enumerate(self.layers):
            if not self._frozen:
                self._refresh_layer(i)
                self._forget_quantized([lay.weight(n) for n in LINEARS])
            if shard:
                fully_shard(lay)
        if not self._frozen:
            self._refresh_head()
            self._forget_quantized([self.lm_head])
        if shard:
            fully_shard(self, ignored_params=set(self.arch_parameters()))
        self._sharded = self._sharded or shard
        self._has_resid = self._frozen = True
        self._grids, self._quantized, self._sources = {}, {}, {}
        # the whole layers just sharded, the quantizer's copies and the grids were freed into glibc's heap, which
        # keeps them; given back, one process recomputing the search of SmolLM2-135M held 2.5 GiB instead of 3.2
        # after this and peaked at 3.3 instead of 3.9 (benchmarks/search_sharding.py --no-trim against without)
        release_freed_memory()

    def search_state(self) -> dict[str, torch.Tensor]:
        """What a search changes, for its checkpoint: the architecture logits and which candidates are alive
        (with frozen weights, the rest is rebuilt from the model exactly; a sharded supernet's weights are
        not whole on any rank)."""
        out = {f"alpha.{k}": a.detach() for k, a in self.alpha.items()}
        out.update({f"alive_{k}": self.alive(k) for k in self.alpha})
        return out

    @torch.no_grad()
    def load_search_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`search_state` (from any checkpoint: keys for the weights are left alone when the
        weights are frozen, and loaded otherwise).

        Raises:
            KeyError: a logit or alive mask is missing, or the checkpoint has no weights for unfrozen ones.
        """
        for k in self.alpha:
            self.alpha[k].copy_(state[f"alpha.{k}"])
            self.alive(k).copy_(state[f"alive_{k}"])
        if not self._frozen:
            self.load_state_dict(state)

    def alive(self, name: str) -> torch.Tensor:
        return getattr(self, f"alive_{name}")

    def probs(self, tau: float = 1.0, gumbel: bool = False, generator: torch.Generator | None = None) -> Probs:
        """Softmax of each decision's logits over its alive candidates, at temperature ``tau``."""
        out = {}
        for k, a in self.alpha.items():
            logits = a
            if gumbel:
                u = torch.rand(a.shape, generator=generator, device="cpu").to(a.device).clamp(1e-9, 1 - 1e-9)
                logits = logits - torch.log(-torch.log(u))
            out[k] = (logits / tau).masked_fill(~self.alive(k), float("-inf")).softmax(-1)
        return Probs(**out)

    def sample(self, tau: float, generator: torch.Generator) -> Probs:
        """One subnet drawn from ``softmax(logits / tau)`` (Gumbel-max), as one-hot "probabilities" whose
        gradient is the relaxed sample's (straight-through Gumbel-softmax, as GDAS does).

        The forward then runs a real subnet — a block is in or out, a linear has one format — so the KD
        loss sees what extraction will ship; with expected (soft) masks a block at p(keep) = 0.5 adds
        half its output, the loss barely tells keeping from dropping, and the argmax flips undecided
        blocks at extraction. Sampling from the tempered distribution makes the draws settle as the
        temperature anneals."""
        out = {}
        for k, a in self.alpha.items():
            u = torch.rand(a.shape, generator=generator, device="cpu").to(a.device).clamp(1e-9, 1 - 1e-9)
            z = (a / tau - torch.log(-torch.log(u))).masked_fill(~self.alive(k), float("-inf"))
            soft = z.softmax(-1)
            hard = F.one_hot(z.argmax(-1), a.shape[-1]).to(soft.dtype)
            out[k] = hard - soft.detach() + soft
        return Probs(**out)

    def init_width_logits(self, prior: float) -> None:
        """Start every width decision (hidden, kv groups, heads per group, MLP) at logits
        ``prior * width / widest``: the full width most probable, each narrower one less so. A
        decision the search leaves undecided is then extracted at the pretrained width, not at
        whichever candidate a tie happens to put first."""
        with torch.no_grad():
            for k in WIDTHS:
                c = getattr(self, f"cands_{k}").float()
                self.alpha[k].copy_((prior * c / c.max()).expand_as(self.alpha[k]))

    def init_keep_logits(self, prior: float) -> None:
        """Start each block's keep-vs-drop logit at ``prior`` (p(keep) = sigmoid(prior)) plus its
        log drop cost relative to the median block's, clipped to ±1 (:mod:`.importance`: the KL of the
        model without it), so a search starts from "keep everything, the cheapest blocks to drop least
        surely" instead of a coin flip per block."""
        with torch.no_grad():
            self.alpha["keep"].zero_()
            self.alpha["keep"][:, 1] = prior + self._drop_cost_bonus()

    def _drop_cost_bonus(self) -> torch.Tensor:
        """Each block's log drop cost relative to the median block's, clipped to ±1 (zeros without
        importance scores): what a keep logit starts with on top of its prior."""
        dev = self.alpha["keep"].device
        if self.importance is None:
            return torch.zeros(self.base.num_layers, device=dev)
        b = torch.as_tensor(self.importance.blocks, dtype=torch.float32, device=dev).clamp_min(1e-6)
        return (b / b.median()).log().clamp(-1.0, 1.0)

    def init_from_spec(self, spec: SubnetSpec, strength: float) -> None:
        """Start every decision at ``spec``'s choice, ``strength`` logits ahead of each other candidate (a
        choice the space does not offer leaves its row even); each block's keep logit is ``±strength`` (kept
        or dropped in ``spec``) plus its log drop cost relative to the median's, clipped to ±1 (as in
        :meth:`init_keep_logits`), so the search starts at a baseline that fits the budget (e.g. the
        importance order's blocks) and leaves it only where its samples say so."""
        s = self.space

        def row(values, chosen) -> torch.Tensor:
            r = torch.zeros(len(values), device=self.alpha["hidden"].device)
            if chosen in values:
                r[values.index(chosen)] = strength
            return r

        with torch.no_grad():
            self.alpha["hidden"].copy_(row(s.hidden, spec.hidden_size))
            self.alpha["lm_head"].copy_(row(s.lm_head_formats, spec.lm_head))
            bonus = self._drop_cost_bonus()
            for i, ls in enumerate(spec.layers):
                self.alpha["keep"][i, 0] = 0.0
                self.alpha["keep"][i, 1] = (strength if ls.keep else -strength) + float(bonus[i])
                self.alpha["kv"][i] = row(s.kv_groups, ls.num_kv_heads)
                self.alpha["hpg"][i] = row(s.heads_per_group, ls.num_heads // ls.num_kv_heads)
                self.alpha["mlp"][i] = row(s.mlp, ls.intermediate_size)
                for j, name in enumerate(LINEARS):
                    self.alpha["prec"][i, j] = row(s.formats, ls.precision[name])

    # --------------------------------------------------------------- forward
    def _top(self, name: str, row: int | None = None) -> int:
        """The widest alive candidate (compute never goes beyond it)."""
        alive = self.alive(name) if row is None else self.alive(name)[row]
        return int(getattr(self, f"cands_{name}")[alive].max())

    def _norm(self, x: torch.Tensor, w: torch.Tensor, n_kept: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / n_kept + self.eps) * w

    @torch.no_grad()
    def use_quantized(self, models: dict) -> None:
        """Fake-quantize with the run's quantizer from now on: ``models`` maps a format name to the unpruned
        model quantized in it (a :class:`~.model.CompressedModel` of ``space.largest(fmt)``, e.g. by GPTQ, or a
        :class:`~.model.SavedModel` of one, read a layer at a time), and every linear (and the lm_head) offered
        that format takes its dequantized weight, reordered like the supernet's, as ``Q(W)``. Formats not listed
        keep rounding to nearest on the export's grid. A layer's weights are read when its residuals are made
        (:meth:`refresh_quant`, :meth:`freeze_weights`), and kept on the host.

        Why: GPTQ compensates most of what rounding to nearest loses at 4 bits (SmolLM2-135M uniform w4g32a8,
        KL from the original on held-out rows: 0.61 rounded to nearest, 0.15 with GPTQ), but it cannot
        compensate a dropped block. A search that prices formats by rounding-to-nearest error buys 8-bit
        weights with blocks (a 1.0x int4 search: KL 0.50 vs 0.61 for uniform int4 under rounding to
        nearest, 0.35 vs 0.15 under the GPTQ that ships). A pruned subnet's GPTQ compensates over its kept
        columns only, so its error is the unpruned one's estimate, sliced, not a copy.

        Raises:
            UsageError: a model is pruned, or the weights are frozen already (their residuals are made).
        """
        if self._frozen:
            raise UsageError("use_quantized comes before freeze_weights: frozen weights' residuals are made once.")
        for fmt, m in models.items():
            if len(m.spec.kept_layers()) != self.base.num_layers or m.spec.hidden_size != self.base.hidden_size:
                raise UsageError(f"The {fmt} model given to the search is pruned; it needs the unpruned one.")
        self._sources, self._quantized, self._read = dict(models), {}, set()
        self._has_resid = False  # made from these at the next forward, refresh_quant or freeze_weights

    @torch.no_grad()
    def _read_quantized(self, i: int | None) -> None:
        """Put layer ``i``'s (None: the lm_head's) weights from the run quantizer's models in ``_quantized``."""
        if i in self._read:
            return
        for fmt, src in self._sources.items():
            if i is None:
                if src.spec.lm_head == fmt:
                    w = src.linear("lm_head").weight
                    hidden_idx = torch.tensor(self.hidden_order, dtype=torch.long, device=w.device)
                    self._quantized[(id(self.lm_head), fmt)] = w[:, hidden_idx].float().clone()
                continue
            names = [n for n in LINEARS if src.spec.layers[i].precision[n] == fmt]  # else the space placed another
            if not names:
                continue
            lins = {n: SimpleNamespace(weight=src.linear(f"blocks.{i}.{n}").weight, bias=None) for n in LINEARS}
            dev = lins["q_proj"].weight.device  # sliced where the quantized model is (the host)
            norm = SimpleNamespace(weight=torch.ones(self.base.hidden_size, device=dev))  # its norms are not read
            hf_like = SimpleNamespace(self_attn=SimpleNamespace(**{n: lins[n] for n in LINEARS[:4]}),
                                      mlp=SimpleNamespace(**{n: lins[n] for n in LINEARS[4:]}),
                                      input_layernorm=norm, post_attention_layernorm=norm)
            q = _Layer(hf_like, self.orders[i], torch.tensor(self.hidden_order, dtype=torch.long, device=dev),
                       self.base)
            for name in names:
                self._quantized[(id(self.layers[i].weight(name)), fmt)] = q.weight(name).data
        self._read.add(i)

    def _forget_quantized(self, weights: list[torch.Tensor]) -> None:
        """Drop what made ``weights``' residuals (their quantizer weights and export grids): frozen, never needed again."""
        for w in weights:
            for f in (*self.fmts, *self.head_fmts):
                self._quantized.pop((id(w), f.name), None)
                self._grids.pop((id(w), f.name), None)

    @torch.no_grad()
    def refresh_quant(self) -> None:
        """Recompute every linear's quantization residuals ``Q_k(W) - W`` for all offered formats.

        Quantizing 135M weights in three formats costs far more than a step's
        matmuls, and at search learning rates the weights barely move between
        steps, so residuals are cached and refreshed every
        ``SearchConfig.requant_every`` steps (and whenever asked). Groups run
        along K and widths are cut at group boundaries, so a candidate's
        residual is a slice of the full one (per-channel formats, whose scale
        spans the row, are recomputed on the slice). After :meth:`freeze_weights`
        the weights never move, and neither do their residuals: this is a no-op.

        Raises:
            UsageError: the weights are sharded but not frozen (cannot happen through :meth:`freeze_weights`).
        """
        if self._frozen and self._has_resid:
            return
        if self._sharded:
            raise UsageError("A sharded supernet's residuals cannot be recomputed; shard it after freeze_weights().")
        for i in range(len(self.layers)):
            self._refresh_layer(i)
        self._refresh_head()
        self._has_resid = True

    def _quantize(self, w: torch.Tensor, f: QuantFormat) -> torch.Tensor:
        """``Q_f(w)``: the run's quantizer's weight (:meth:`use_quantized`), else rounding to nearest."""
        if (id(w), f.name) in self._quantized:  # kept on the host: moved here one weight at a time
            return self._quantized[(id(w), f.name)].to(w.device)
        if f.is_float or f.group_size is None:  # float, or per-channel int8 (absmax: cheap)
            return fake_quant(w, f)
        return self._grids[(id(w), f.name)].fake_quant(w)  # at search learning rates the weights barely move

    def _residuals(self, w: torch.Tensor, fmts: list[QuantFormat], offered: torch.Tensor) -> list[torch.Tensor | None]:
        # a format the linear is not offered (its group does not divide K) never runs: nothing kept
        return [self._quantize(w, f) - w if ok else None for f, ok in zip(fmts, offered, strict=True)]

    @torch.no_grad()
    def _refresh_layer(self, i: int) -> None:
        self._read_quantized(i)
        lay = self.layers[i]
        for j, name in enumerate(LINEARS):
            lay.resid.set_all(name, self._residuals(lay.weight(name), self.fmts, self.offered_prec[j]))

    @torch.no_grad()
    def _refresh_head(self) -> None:
        self._read_quantized(None)
        self.head_resid.set_all("lm_head", self._residuals(self.lm_head, self.head_fmts, self.offered_lm_head))

    def _linear(self, x: torch.Tensor, w: torch.Tensor, resid: list[torch.Tensor | None], cut, p: torch.Tensor,
                alive: torch.Tensor, fmts: list[QuantFormat]) -> torch.Tensor:
        """``x @ E_p[Q(cut(w))].T`` with int8 activations weighted by P(an a8 format).

        ``resid``: ``w``'s cached residuals per format (:meth:`refresh_quant`). ``cut`` slices an
        ``[..., out, in]`` tensor to the live widths (the weight and its residuals alike).
        """
        idx = [i for i in range(len(fmts)) if alive[i]]
        wc, resid = cut(w), [None if r is None else cut(r) for r in resid]
        if any(fmts[i].group_size is None and not fmts[i].is_float for i in idx):
            # a per-channel scale spans the whole row: a slice of it is not the sliced weight's
            with torch.no_grad():
                resid = [resid[i] if fmts[i].group_size or fmts[i].is_float or not alive[i]
                         else fake_quant(wc, fmts[i]) - wc for i in range(len(fmts))]
        if not self.vectorized:  # one matmul per format, each with its own activation rounding
            out = 0
            for i in idx:
                with torch.no_grad():
                    xq = quantize_activation(x, fmts[i]) - x
                out = out + p[i] * F.linear(x + xq, wc + resid[i])
            return out
        w_eff = wc + resid[idx[0]] if len(idx) == 1 else _ExpectedWeight.apply(p[idx], wc, *(resid[i] for i in idx))
        a8 = [i for i in idx if fmts[i].act != "none"]
        if a8:
            fine = min((fmts[i] for i in a8), key=lambda f: f.group_size or 1 << 30)
            with torch.no_grad():
                xq = quantize_activation(x, fine) - x
            x = x + p[a8].sum() * xq
        return F.linear(x, w_eff)

    def forward(self, ids: torch.Tensor, probs: Probs | None = None) -> torch.Tensor:
        """Expected logits ``[B, T, V]`` of ``ids`` ``[B, T]`` (no cache: the search reads whole chunks)."""
        if not self._has_resid:
            self.refresh_quant()
        pr = probs or self.probs()
        base = self.base
        T = ids.shape[1]
        H = self._top("hidden")
        m_h = width_mask(pr.hidden, self.cands_hidden, H)
        n_h = m_h.sum()
        R = base.heads_per_group
        pos = torch.arange(T, dtype=torch.float32, device=ids.device)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling
        x = F.embedding(ids, self.embed[:, :H]) * m_h
        mask_g = width_mask(pr.kv, self.cands_kv, base.num_kv_heads)  # [L, G]
        mask_r = width_mask(pr.hpg, self.cands_hpg, R)  # [L, R]
        for i, lay in enumerate(self.layers):
            if not bool(self.alive("keep")[i, 1]):
                continue  # dropped for good: no compute
            x = lay(self, i, x, pr, H, m_h, n_h, mask_g, mask_r, cos, sin)
        x = self._norm(x, self.final_norm[:H], n_h)
        return self._linear(x, self.lm_head, self.head_resid.get_all("lm_head", len(self.head_fmts)),
                            lambda t: t[..., :H], pr.lm_head, self.alive("lm_head"), self.head_fmts)

    def _attention(self, h, lin, G_a: int, R_a: int, H: int, cos, sin, head_mask) -> torch.Tensor:
        """Attention over the first ``G_a`` groups x ``R_a`` heads each, heads weighted by ``head_mask``,
        through o_proj."""
        base = self.base
        B, T, _ = h.shape
        hd, R = base.head_dim, base.heads_per_group
        G = base.num_kv_heads
        q = lin(h, "q_proj", lambda t: t.unflatten(-2, (G, R, hd))[..., :G_a, :R_a, :, :H].flatten(-4, -2))
        q = q.view(B, T, G_a, R_a, hd)
        kv = lambda t: t[..., :G_a * hd, :H]  # noqa: E731
        k = lin(h, "k_proj", kv).view(B, T, G_a, 1, hd)
        v = lin(h, "v_proj", kv).view(B, T, G_a, 1, hd)
        q = q * cos[None, :, None, None] + rotate_half(q) * sin[None, :, None, None]
        k = k * cos[None, :, None, None] + rotate_half(k) * sin[None, :, None, None]
        qh = q.reshape(B, T, G_a * R_a, hd).transpose(1, 2)
        kh = k.expand(B, T, G_a, R_a, hd).reshape(B, T, G_a * R_a, hd).transpose(1, 2)
        vh = v.expand(B, T, G_a, R_a, hd).reshape(B, T, G_a * R_a, hd).transpose(1, 2)
        att = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.attn_scale)
        att = (att.transpose(1, 2) * head_mask[None, None, :, None]).reshape(B, T, -1)
        return lin(att, "o_proj", lambda t: t.unflatten(-1, (G, R, hd))[..., :H, :G_a, :R_a, :].flatten(-3))

    # ------------------------------------------------------------- settling
    def entropies(self, tau: float = 1.0) -> dict[str, torch.Tensor]:
        """Normalized entropy (0 settled .. 1 uniform) of every decision row at temperature ``tau``
        (the distribution the forward pass samples from); 0 where one candidate is left."""
        out = {}
        with torch.no_grad():
            for k, a in self.alpha.items():
                alive = self.alive(k)
                p = (a / tau).masked_fill(~alive, float("-inf")).softmax(-1)
                ent = -(p * p.clamp_min(1e-12).log()).masked_fill(~alive, 0).sum(-1)
                n = alive.sum(-1)
                out[k] = torch.where(n > 1, ent / n.clamp_min(2).float().log(), torch.zeros_like(ent))
        return out

    def settling(self, threshold: float, tau: float = 1.0) -> dict[str, torch.Tensor]:
        """Per decision, which rows :meth:`settle` with this ``threshold`` and ``tau`` would freeze now."""
        ents = self.entropies(tau)
        return {k: (ents[k] < threshold) & (self.alive(k).sum(-1) > 1) for k in self.alpha}

    def settle(self, threshold: float, floor: float = 0.0, tau: float = 1.0,
               protect: dict[str, torch.Tensor] | None = None) -> int:
        """Freeze decisions with normalized entropy below ``threshold`` at their argmax; drop
        candidates whose probability is below ``floor``; both judged at temperature ``tau``, the one
        the forward pass currently uses (as it anneals, decisions settle). ``protect`` (per decision, candidate
        indices ``[...]`` like :meth:`choice_indices`) names one candidate per row the floor never drops: a
        search's start, kept alive until a decision settles elsewhere, so a move can still be undone
        (:mod:`.moves`). Returns how many decisions were frozen now."""
        frozen = 0
        ents = self.entropies(tau)
        with torch.no_grad():
            for k, a in self.alpha.items():
                alive = self.alive(k)
                p = (a / tau).masked_fill(~alive, float("-inf")).softmax(-1)
                settle = (ents[k] < threshold) & (alive.sum(-1) > 1)
                choice = p.argmax(-1)
                if k == "keep":
                    choice, settle = self._respect_min_layers(p, alive, choice, settle)
                onehot = F.one_hot(choice, p.shape[-1]).bool()
                kept = onehot if protect is None else onehot | F.one_hot(protect[k], p.shape[-1]).bool()
                frozen += int(settle.sum())
                new = torch.where(settle[..., None], onehot, alive & ((p >= floor) | kept))
                if k == "keep":
                    new[~settle] = alive[~settle]  # a block is kept or dropped, never left with no option
                alive.copy_(new)
        return frozen

    def _respect_min_layers(self, p, alive, choice, settle):
        """Freeze no more blocks to "drop" than ``min_layers`` allows; the most likely to be kept
        of the would-be drops are frozen to "keep" instead."""
        can_keep = alive[:, 1]
        drops = torch.nonzero(settle & (choice == 0)).flatten()
        room = int(can_keep.sum()) - self.space.min_layers
        if len(drops) > room:
            by_keep = drops[torch.argsort(p[drops, 1], stable=True)]  # least likely kept first
            forced = by_keep[max(room, 0):]
            choice = choice.clone()
            choice[forced] = 1
        return choice, settle

    def choice_indices(self) -> dict[str, torch.Tensor]:
        """Each decision row's most probable alive candidate: per decision, indices ``alpha[k].shape[:-1]``."""
        with torch.no_grad():
            return {k: a.masked_fill(~self.alive(k), float("-inf")).argmax(-1) for k, a in self.alpha.items()}

    def onehot(self, choices: dict[str, torch.Tensor]) -> Probs:
        """The one subnet ``choices`` (as :meth:`choice_indices` gives them) names, as probabilities a forward
        pass and :meth:`expected_latency` read."""
        return Probs(**{k: F.one_hot(choices[k], a.shape[-1]).to(a.dtype) for k, a in self.alpha.items()})

    def freeze(self, name: str, row: tuple[int, ...], index: int, lead: float) -> None:
        """Decide row ``row`` of decision ``name`` at candidate ``index``: it alone stays alive, and its logit
        leads the row's others by ``lead`` (what later reads the logits of pruned candidates, the fit's grow
        step, then prefers it too)."""
        with torch.no_grad():
            alive, a = self.alive(name), self.alpha[name]
            alive[row] = False
            alive[row + (index,)] = True
            a[row] = 0.0
            a[row + (index,)] = lead

    def settled(self) -> tuple[int, int]:
        """(decisions with one candidate left, all decisions)."""
        n = total = 0
        for k in self.alpha:
            rows = self.alive(k).sum(-1).reshape(-1)
            n += int((rows == 1).sum())
            total += rows.numel()
        return n, total

    # ------------------------------------------------------------ expectation
    def choices(self, probs: Probs):
        """The :class:`~llmshrink.targets.predict.Choice` view of ``probs`` the latency predictor reads."""
        from llmshrink.targets.predict import Choice

        s = self.space
        hd = Choice((self.base.head_dim,), torch.ones(1, device="cpu"))
        layers = []
        for i in range(self.base.num_layers):
            d = {"kv_heads": Choice(s.kv_groups, probs.kv[i]), "heads_per_group": Choice(s.heads_per_group, probs.hpg[i]),
                 "head_dim": hd, "mlp": Choice(s.mlp, probs.mlp[i])}
            if self.latency_formats:
                d.update({n: Choice((self.latency_formats[n],), torch.ones(1, device="cpu")) for n in LINEARS})
            else:
                d.update({name: Choice(s.formats, probs.prec[i, j]) for j, name in enumerate(LINEARS)})
            layers.append(d)
        head = (Choice((self.latency_formats["lm_head"],), torch.ones(1, device="cpu")) if self.latency_formats
                else Choice(s.lm_head_formats, probs.lm_head))
        return dict(hidden=Choice(s.hidden, probs.hidden), layers=layers, keep=list(probs.keep[:, 1]), lm_head=head)

    def expected_latency(self, table, workload, probs: Probs) -> torch.Tensor:
        """E[latency] in ms under ``probs``, differentiable, on the device of ``probs``. The table's arithmetic
        (a few hundred scalars) runs on the host, where the predictor keeps its tensors; autograd carries the
        gradient across the move."""
        from llmshrink.targets.predict import expected_latency

        dev = probs.hidden.device
        host = Probs(**{k: getattr(probs, k).cpu() for k in Probs.__dataclass_fields__})
        return expected_latency(table, workload, vocab_size=self.base.vocab_size, **self.choices(host)).to(dev)

    def expected_params(self, probs: Probs) -> torch.Tensor:
        """Expected weight count (embedding, linears; a tied lm_head in the embedding's format counts once)."""
        c = {k: getattr(self, f"cands_{k}").double() for k in WIDTHS}
        h = probs.hidden.double() @ c["hidden"]
        kv, per, mlp = probs.kv.double() @ c["kv"], probs.hpg.double() @ c["hpg"], probs.mlp.double() @ c["mlp"]
        hd = self.base.head_dim
        per_layer = h * hd * (kv * per * 2 + kv * 2) + 3 * h * mlp
        total = (probs.keep[:, 1].double() * per_layer).sum() + self.base.vocab_size * h
        # the embedding stays fp32; a tied lm_head in another format is a second tensor (as num_params counts)
        p_own = 1.0 if not self.base.tied_embeddings else 1.0 - sum(
            probs.lm_head[i] for i, f in enumerate(self.space.lm_head_formats) if f == "fp32")
        return total + self.base.vocab_size * h * p_own

    # -------------------------------------------------------------- extract
    def log_prob(self, spec: SubnetSpec, *, alive_only: bool = True) -> float:
        """Log-probability of ``spec``'s choices under the current logits (a dropped block's widths and
        formats do not count); -inf for a choice outside the space or (with ``alive_only``) no longer
        alive. ``alive_only=False`` scores pruned candidates by the logits they had when pruned."""
        s = self.space
        with torch.no_grad():
            pr = self.probs() if alive_only else Probs(**{k: a.softmax(-1) for k, a in self.alpha.items()})

            def lp(p: torch.Tensor, values, v) -> float:
                return math.log(max(float(p[values.index(v)]), 0.0)) if v in values and p[values.index(v)] > 0 \
                    else float("-inf")

            total = lp(pr.hidden, s.hidden, spec.hidden_size) + lp(pr.lm_head, s.lm_head_formats, spec.lm_head)
            for i, ls in enumerate(spec.layers):
                total += lp(pr.keep[i], (False, True), ls.keep)
                if not ls.keep:
                    continue
                total += lp(pr.kv[i], s.kv_groups, ls.num_kv_heads)
                total += lp(pr.hpg[i], s.heads_per_group, ls.num_heads // ls.num_kv_heads)
                total += lp(pr.mlp[i], s.mlp, ls.intermediate_size)
                total += sum(lp(pr.prec[i, j], s.formats, ls.precision[n]) for j, n in enumerate(LINEARS))
        return total

    def argmax_spec(self, model: str = "") -> SubnetSpec:
        """The most probable subnet, with the importance orders; at least ``min_layers`` blocks kept
        (the most probable to keep, by p(keep))."""
        s, b = self.space, self.base
        with torch.no_grad():
            pr = self.probs()
            keep_p = pr.keep[:, 1]
            keep = set(int(i) for i in torch.nonzero(keep_p > 0.5).flatten())
            if len(keep) < s.min_layers:
                keep = set(int(i) for i in torch.argsort(keep_p, descending=True, stable=True)[:s.min_layers])
            layers = []
            for i in range(b.num_layers):
                kv = s.kv_groups[int(pr.kv[i].argmax())]
                per = s.heads_per_group[int(pr.hpg[i].argmax())]
                prec = {name: s.formats[int(pr.prec[i, j].argmax())] for j, name in enumerate(LINEARS)}
                layers.append(LayerSpec(i in keep, kv * per, kv, b.head_dim, s.mlp[int(pr.mlp[i].argmax())], prec,
                                        self.orders[i]))
            return SubnetSpec(b, s.hidden[int(pr.hidden.argmax())], tuple(layers),
                              lm_head=s.lm_head_formats[int(pr.lm_head.argmax())],
                              hidden_order=tuple(self.hidden_order), model=model)

