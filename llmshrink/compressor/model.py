"""CompressedModel: a Llama-family decoder whose layers may all differ.

Every layer has its own head count, kv groups, head size, MLP width and a
precision per linear layer; dropped layers are absent. HF's modules read one
config for all layers, so this is our own small decoder (nanoGPT style). It
is the numerical reference every ONNX export is checked against, and it
runs forward with a KV cache and greedy / sampled generation.

Saved as a directory: ``model.safetensors`` (float tensors, integer codes,
scales, per-layer rotary frequencies), ``spec.json`` and ``model_meta.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmshrink import storage
from llmshrink.compressor.quant import QuantizedWeight, quantize_activation, quantize_weight
from llmshrink.formats import QuantFormat, parse_format
from llmshrink.spec import LINEARS, SubnetSpec

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per kept layer: (B, nkv, S, hd) key, value


@dataclass(frozen=True)
class ModelMeta:
    """Numbers a CompressedModel needs beyond its spec and tensors."""

    rms_norm_eps: float
    rope_attention_scaling: float  # multiplies cos/sin (1.0 for default rope)
    attention_scale: float  # softmax scale, 1/sqrt(base head_dim) unless the model says otherwise
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    max_position_embeddings: int


class QuantLinear(nn.Module):
    """``y = quant_act(x) @ dequant(W).T + b`` for one precision format.

    The integer codes are kept as buffers (the exporters pack them); the
    dequantized float weight is kept too so the forward pass is one matmul.
    A format with static activation scales (``w8a8s``) also needs
    ``act_scale``, set by :func:`llmshrink.compressor.calibrate.calibrate_activations`;
    until then the layer refuses to run (it would not be the model that ships),
    except under a calibration ``observer``, which sees the float input and
    lets it through unrounded.
    """

    act_scale: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: QuantFormat,
                 act_scale: float | None = None) -> None:
        super().__init__()
        self.fmt = fmt
        self._init_act(act_scale, weight.device)
        self.out_features, self.in_features = weight.shape
        if fmt.is_float:
            w = weight.detach().float()
            if fmt.weight_bits == 16:
                w = w.half().float()  # what an fp16 kernel sees
            self.register_buffer("weight", w.contiguous())
            self.quantized: QuantizedWeight | None = None
        else:
            self.quantized = quantize_weight(weight, fmt)
            self.register_buffer("weight", self.quantized.dequantize().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: torch.Tensor | None,
                       act_scale: float | None = None) -> QuantLinear:
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.fmt = q.fmt
        self._init_act(act_scale, q.codes.device)
        self.out_features, self.in_features = q.codes.shape
        self.quantized = q
        self.register_buffer("weight", q.dequantize().contiguous())
        self.register_buffer("bias", bias)
        return self

    def _init_act(self, act_scale: float | None, device) -> None:
        self.observer = None
        self.round_input: torch.dtype | None = None  # parity's perturbation probe (exporters.parity.rounded_inputs)
        self.register_buffer("act_scale", None if act_scale is None else torch.tensor(float(act_scale), device=device))

    def _apply(self, fn, recurse=True):
        """``.to(device)`` / ``.cpu()`` / ``.cuda()``: the codes and scales (a plain attribute, not buffers) follow
        the weight buffer's device; their dtypes never change (a ``.half()`` must not round the scales)."""
        super()._apply(fn, recurse)
        q = self.quantized
        if q is not None and q.codes.device != self.weight.device:
            dev = self.weight.device
            self.quantized = replace(q, codes=q.codes.to(dev), scales=q.scales.to(dev),
                                     zeros=None if q.zeros is None else q.zeros.to(dev))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.round_input is not None:
            x = x.to(self.round_input).to(x.dtype)
        if self.fmt.act == "int8-static":
            if self.observer is not None:
                self.observer(x)
                return F.linear(x, self.weight, self.bias)
            if self.act_scale is None:
                raise RuntimeError(f"{self.fmt} layer without a calibrated activation scale: run "
                                   "llmshrink.compressor.calibrate.calibrate_activations on the model first.")
            return F.linear(quantize_activation(x, self.fmt, float(self.act_scale)), self.weight, self.bias)
        return F.linear(quantize_activation(x, self.fmt), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt}"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(var + eps) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block(nn.Module):
    """One kept decoder layer: pre-norm GQA attention with rotary, pre-norm SwiGLU MLP."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, linears: dict[str, QuantLinear],
                 input_norm: torch.Tensor, post_norm: torch.Tensor, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        for name in LINEARS:
            self.add_module(name, linears[name])
        self.register_buffer("input_norm", input_norm.float().clone())
        self.register_buffer("post_norm", post_norm.float().clone())
        self.register_buffer("inv_freq", inv_freq.float().clone())  # (head_dim/2,) kept rotary frequencies

    def rope(self, positions: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * scaling, emb.sin() * scaling

    def forward(self, x: torch.Tensor, positions: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
                meta: ModelMeta) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        att, kv = self.attention(rms_norm(x, self.input_norm, meta.rms_norm_eps), positions, past, meta)
        x = x + self.o_proj(att)
        h = rms_norm(x, self.post_norm, meta.rms_norm_eps)
        return x + self.down_proj(self.mlp_hidden(h)), kv

    def mlp_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """``silu(gate(h)) * up(h)``: the down projection's input."""
        return F.silu(self.gate_proj(h)) * self.up_proj(h)

    def attention(self, h: torch.Tensor, positions: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
                  meta: ModelMeta) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The heads' outputs ``(B, T, nh * hd)`` for the normed input ``h`` (the o projection's input), and the cache."""
        B, T, _ = h.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(h).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(h).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(h).view(B, T, nkv, -1).transpose(1, 2)  # (B, nkv, T, hd)
        cos, sin = self.rope(positions, meta.rope_attention_scaling)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        S = k.shape[2]
        rep = nh // nkv
        kr = k.repeat_interleave(rep, dim=1)  # (B, nh, S, hd)
        vr = v.repeat_interleave(rep, dim=1)
        # Query t (absolute position S - T + t) sees keys 0 .. S - T + t.
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        att = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=meta.attention_scale)
        return att.transpose(1, 2).reshape(B, T, -1), (k, v)


class CompressedModel(nn.Module):
    """A materialized subnet; see the module docstring.

    Build one with :func:`llmshrink.compressor.materialize.materialize`, or
    :meth:`load` a saved directory.
    """

    def __init__(self, spec: SubnetSpec, meta: ModelMeta, embedding: QuantLinear, blocks: list[Block],
                 final_norm: torch.Tensor, lm_head: QuantLinear) -> None:
        super().__init__()
        self.spec, self.meta = spec, meta
        self.embedding = embedding  # [vocab, hidden] table; integer formats quantize along hidden
        self.blocks = nn.ModuleList(blocks)
        self.register_buffer("final_norm", final_norm.float().clone())
        self.lm_head = lm_head

    @property
    def embed(self) -> torch.Tensor:
        """The (dequantized) embedding table ``[vocab, hidden]``."""
        return self.embedding.weight

    @property
    def num_params(self) -> int:
        """Weights (embedding, linears, norms); a tied lm_head counts once unless its format differs.

        A tied, alike lm_head is the embedding table itself in the export, as in
        the original model (134.5M for SmolLM2-135M); quantized differently, it
        is a second tensor.
        """
        shared = self.spec.base.tied_embeddings and self.spec.lm_head == self.spec.embedding
        n = self.embed.numel() + self.final_norm.numel() + (0 if shared else self.lm_head.weight.numel())
        for b in self.blocks:
            n += sum(getattr(b, name).weight.numel() for name in LINEARS) + b.input_norm.numel() + b.post_norm.numel()
        return n

    def forward(self, input_ids: torch.Tensor, past: KVCache | None = None,
                keep: int | None = None) -> tuple[torch.Tensor, KVCache]:
        """Logits ``(B, T, V)`` for ``input_ids`` ``(B, T)`` after ``past``; returns the new cache.

        With ``keep``, only the last ``keep`` positions get logits ``(B, keep, V)``
        (the lm_head is the costliest layer of a small model; a prompt needs one row).
        Weights are buffers, so no autograd graph is built; recovery swaps in
        trainable linears and trains through this same forward.
        """
        offset = past[0][0].shape[2] if past else 0
        positions = torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device)
        x = F.embedding(input_ids, self.embed)
        present: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, positions, past[i] if past else None, self.meta)
            present.append(kv)
        if keep is not None:
            x = x[:, -keep:]
        x = rms_norm(x, self.final_norm, self.meta.rms_norm_eps)
        return self.lm_head(x), present

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 stop_ids: tuple[int, ...] | None = None) -> torch.Tensor:
        """Greedy (default) or sampled continuation of one prompt ``(1, T)``; returns new ids ``(1, n)``."""
        stop = set(self.meta.eos_token_ids if stop_ids is None else stop_ids)
        logits, past = self.forward(input_ids)
        out = []
        for _ in range(max_new_tokens):
            nxt = pick_next(logits[:, -1], do_sample, temperature, top_p, generator)
            out.append(nxt)
            if int(nxt) in stop:
                break
            logits, past = self.forward(nxt.view(1, 1), past)
        return torch.stack(out).view(1, -1) if out else input_ids.new_zeros(1, 0)

    # ------------------------------------------------------------------ io
    def state(self) -> dict[str, torch.Tensor]:
        """All tensors under stable names (the exporters read these)."""
        t: dict[str, torch.Tensor] = {"final_norm": self.final_norm}
        _linear_state(t, "embed", self.embedding)
        _linear_state(t, "lm_head", self.lm_head)
        for i, b in enumerate(self.blocks):
            p = f"blocks.{i}."
            t[p + "input_norm"], t[p + "post_norm"], t[p + "inv_freq"] = b.input_norm, b.post_norm, b.inv_freq
            for name in LINEARS:
                _linear_state(t, p + name, getattr(b, name))
        return t

    def linear(self, name: str) -> QuantLinear:
        """The linear ``name``: ``blocks.{j}.{q_proj,...}`` or ``lm_head`` (as :meth:`SavedModel.linear`)."""
        if name == "lm_head":
            return self.lm_head
        _, j, linear = name.split(".")
        return getattr(self.blocks[int(j)], linear)

    def save(self, directory: str | Path) -> Path:
        """Write ``model.safetensors``, ``spec.json`` and ``model_meta.json`` atomically."""
        from safetensors.torch import save

        directory = Path(directory)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state().items()}  # from any device
        storage.atomic_write_bytes(directory / "model.safetensors", save(tensors))
        storage.atomic_write_text(directory / "spec.json", self.spec.to_json())
        storage.atomic_write_text(directory / "model_meta.json", json.dumps(asdict(self.meta), indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> CompressedModel:
        """Inverse of :meth:`save`."""
        from safetensors.torch import load_file

        directory = Path(directory)
        spec = SubnetSpec.from_json((directory / "spec.json").read_text())
        m = json.loads((directory / "model_meta.json").read_text())
        meta = ModelMeta(**{**m, "eos_token_ids": tuple(m["eos_token_ids"])})
        t = load_file(str(directory / "model.safetensors"))
        blocks = []
        for j, i in enumerate(spec.kept_layers()):
            ls, p = spec.layers[i], f"blocks.{j}."
            linears = {n: _linear_from_state(t, p + n, ls.fmt(n)) for n in LINEARS}
            blocks.append(Block(ls.num_heads, ls.num_kv_heads, ls.head_dim, linears,
                                t[p + "input_norm"], t[p + "post_norm"], t[p + "inv_freq"]))
        lm_head = _linear_from_state(t, "lm_head", parse_format(spec.lm_head))
        embedding = _linear_from_state(t, "embed", parse_format(spec.embedding))
        return cls(spec, meta, embedding, blocks, t["final_norm"], lm_head)


class SavedModel:
    """A :meth:`CompressedModel.save` directory read one linear at a time: its spec now, a linear's tensors from
    the safetensors file when :meth:`linear` asks for them, so holding one costs no memory until then (the
    joint search reads the run quantizer's models this way, a layer at a time: :meth:`.Supernet.use_quantized`).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.spec = SubnetSpec.from_json((self.directory / "spec.json").read_text())

    def linear(self, name: str) -> QuantLinear:
        """The linear ``name`` (``blocks.{j}.{q_proj,...}`` or ``lm_head``) as :meth:`CompressedModel.load` makes it."""
        from safetensors import safe_open

        if name == "lm_head":
            fmt = parse_format(self.spec.lm_head)
        else:
            _, j, linear = name.split(".")
            fmt = self.spec.layers[self.spec.kept_layers()[int(j)]].fmt(linear)
        with safe_open(self.directory / "model.safetensors", "pt") as st:
            keys = set(st.keys())
            t = {k: st.get_tensor(k) for k in (f"{name}.{part}" for part in _LINEAR_PARTS) if k in keys}
        return _linear_from_state(t, name, fmt)


_LINEAR_PARTS = ("weight", "codes", "scales", "zeros", "bias", "act_scale")  # what _linear_state may write


def _linear_state(t: dict[str, torch.Tensor], prefix: str, lin: QuantLinear) -> None:
    if lin.quantized is None:
        t[prefix + ".weight"] = lin.weight
    else:
        t[prefix + ".codes"] = lin.quantized.codes
        t[prefix + ".scales"] = lin.quantized.scales
        if lin.quantized.zeros is not None:
            t[prefix + ".zeros"] = lin.quantized.zeros
    if lin.bias is not None:
        t[prefix + ".bias"] = lin.bias
    if lin.act_scale is not None:
        t[prefix + ".act_scale"] = lin.act_scale


def _linear_from_state(t: dict[str, torch.Tensor], prefix: str, fmt: QuantFormat) -> QuantLinear:
    bias = t.get(prefix + ".bias")
    act = t.get(prefix + ".act_scale")
    act = None if act is None else float(act)
    if fmt.is_float:  # fp16 rounding of a saved (already rounded) weight is idempotent
        return QuantLinear(t[prefix + ".weight"], bias, fmt, act)
    q = QuantizedWeight(t[prefix + ".codes"], t[prefix + ".scales"], t.get(prefix + ".zeros"), fmt)
    return QuantLinear.from_quantized(q, bias, act)


def pick_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
              generator: torch.Generator | None) -> torch.Tensor:
    """Next token from ``(1, V)`` logits: argmax, or nucleus sampling at ``temperature``."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p * keep)
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator).view(-1)
