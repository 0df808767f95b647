"""SubnetSpec: one concrete point of the search space.

A spec says, for a base model, which hidden width to keep, which layers to
keep, and per kept layer how many query / kv heads, which head size, which
MLP width, and which precision format each linear layer uses (plus the
lm_head and the embedding table). It is the single description that the
latency predictor, the torch materializer and the ONNX exporters read.

Which channels and heads survive comes from importance *orders* the spec
carries (``None`` = keep the first ones): weight entanglement means every
width is a prefix of an order.

GQA structure is kept: a layer keeps ``num_kv_heads`` whole kv groups and
the same number of query heads in each. Head size is pruned by rotary
*pairs* (dimension i and i + head_dim/2 rotate together) for q/k, and by
dimensions for v; the kept pairs keep their original rotary frequencies and
the attention scale stays 1/sqrt(original head size).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from llmshrink import serde
from llmshrink.errors import UsageError
from llmshrink.formats import parse_format

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class SpecError(UsageError):
    """A spec breaks a rule; ``rule`` names it (e.g. ``heads-divisible``)."""

    def __init__(self, rule: str, message: str, hint: str | None = None) -> None:
        self.rule = rule
        super().__init__(f"Spec rule {rule!r} broken: {message}", hint)


@serde.serializable("BaseShape")
@dataclass(frozen=True)
class BaseShape:
    """The base model's dimensions a spec is relative to."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool = True

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config) -> BaseShape:
        from llmshrink.models.info import model_info

        info = model_info(config)
        return cls(num_layers=info.num_layers, hidden_size=info.hidden_size, num_heads=info.num_heads,
                   num_kv_heads=info.num_kv_heads, head_dim=info.head_dim,
                   intermediate_size=info.intermediate_size, vocab_size=info.vocab_size,
                   tied_embeddings=info.tied_embeddings)


@serde.serializable("LayerOrder")
@dataclass(frozen=True)
class LayerOrder:
    """Importance orders inside one layer (most important first).

    Attributes:
        kv_groups: permutation of the base kv groups.
        heads_in_group: for each base group, a permutation of its query heads.
        rope_pairs: permutation of the head_dim/2 rotary pairs (q and k).
        v_dims: permutation of the head_dim value dimensions.
        mlp: permutation of the MLP neurons.
    """

    kv_groups: tuple[int, ...]
    heads_in_group: tuple[tuple[int, ...], ...]
    rope_pairs: tuple[int, ...]
    v_dims: tuple[int, ...]
    mlp: tuple[int, ...]

    @classmethod
    def identity(cls, base: BaseShape) -> LayerOrder:
        return cls(tuple(range(base.num_kv_heads)),
                   tuple(tuple(range(base.heads_per_group)) for _ in range(base.num_kv_heads)),
                   tuple(range(base.head_dim // 2)), tuple(range(base.head_dim)),
                   tuple(range(base.intermediate_size)))


@serde.serializable("LayerSpec")
@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer of a subnet. A dropped layer (``keep=False``) ignores the rest."""

    keep: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    precision: dict[str, str]
    order: LayerOrder | None = None

    def fmt(self, linear: str):
        return parse_format(self.precision[linear])


@serde.serializable("SubnetSpec")
@dataclass(frozen=True)
class SubnetSpec:
    """A concrete subnet of ``base``; see the module docstring.

    Attributes:
        base: dimensions of the model the spec prunes.
        hidden_size: kept hidden width (global).
        layers: one entry per base layer.
        lm_head: precision of the output projection.
        embedding: precision of the token embedding table (fp32, fp16, or w4g*/w8g*
            gathered block-quantized; with tied embeddings and the same format as the
            lm_head the two share one set of integer weights in the ort flavour).
        hidden_order: importance order of hidden channels (None = identity).
        model: where the base model came from (informational).
    """

    base: BaseShape
    hidden_size: int
    layers: tuple[LayerSpec, ...]
    lm_head: str = "fp32"
    embedding: str = "fp32"
    hidden_order: tuple[int, ...] | None = None
    model: str = ""
    notes: dict[str, str] = field(default_factory=dict)

    # ----------------------------------------------------------------- build
    @classmethod
    def original(cls, base: BaseShape, model: str = "") -> SubnetSpec:
        """The unpruned, float32 model."""
        return cls.uniform(base, "fp32", model=model)

    @classmethod
    def uniform(cls, base: BaseShape, fmt: str, *, lm_head: str | None = None, model: str = "") -> SubnetSpec:
        """The unpruned model with every linear layer (and lm_head) in format ``fmt``."""
        name = parse_format(fmt).name
        layer = LayerSpec(True, base.num_heads, base.num_kv_heads, base.head_dim, base.intermediate_size,
                          dict.fromkeys(LINEARS, name))
        return cls(base, base.hidden_size, tuple(layer for _ in range(base.num_layers)),
                   lm_head=parse_format(lm_head).name if lm_head else name, model=model)

    def with_precision(self, fmt: str, linears: Sequence[str] = LINEARS, *, lm_head: bool = True) -> SubnetSpec:
        """A copy with ``linears`` of every kept layer (and the lm_head) set to ``fmt``."""
        name = parse_format(fmt).name
        layers = tuple(replace(ls, precision={**ls.precision, **dict.fromkeys(linears, name)}) for ls in self.layers)
        return replace(self, layers=layers, lm_head=name if lm_head else self.lm_head)

    # ----------------------------------------------------------------- query
    def kept_layers(self) -> list[int]:
        return [i for i, ls in enumerate(self.layers) if ls.keep]

    def layer_order(self, i: int) -> LayerOrder:
        return self.layers[i].order or LayerOrder.identity(self.base)

    def hidden_channels(self) -> list[int]:
        """Indices of the kept hidden channels, in base order."""
        order = self.hidden_order if self.hidden_order is not None else range(self.base.hidden_size)
        return sorted(order[: self.hidden_size])

    def formats_used(self, *, embedding: bool = True) -> set[str]:
        """Format names of the kept linears and the lm_head (and the embedding table, unless ``embedding=False``)."""
        used = {self.lm_head, self.embedding} if embedding else {self.lm_head}
        for ls in self.layers:
            if ls.keep:
                used |= set(ls.precision.values())
        return used

    def to_json(self) -> str:
        return serde.dumps(self)

    @classmethod
    def from_json(cls, text: str) -> SubnetSpec:
        spec = serde.loads(text, expect=cls)
        spec.validate()
        return spec

    def fingerprint(self) -> str:
        """16 hex digits identifying the subnet (everything but ``model`` and ``notes``)."""
        d = serde.to_dict(replace(self, model="", notes={}))
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------- validate
    def validate(self, allowed_formats: set[str] | None = None) -> SubnetSpec:
        """Check every rule; raise :class:`SpecError` naming the first broken one.

        Args:
            allowed_formats: format names the target has kernels for (None: any).

        Returns:
            self, so calls can chain.
        """
        b = self.base
        if len(self.layers) != b.num_layers:
            raise SpecError("layer-count", f"{len(self.layers)} layer entries for a {b.num_layers}-layer model.")
        if not self.kept_layers():
            raise SpecError("keep-one-layer", "every layer is dropped.", "Keep at least one layer.")
        if not 1 <= self.hidden_size <= b.hidden_size:
            raise SpecError("hidden-range", f"hidden_size {self.hidden_size} is outside 1..{b.hidden_size}.")
        _check_perm("hidden-order", self.hidden_order, b.hidden_size, "hidden_order")
        self._check_format(self.lm_head, "lm_head", allowed_formats)
        self._check_format(self.embedding, "embedding", None)  # a table lookup, not a matmul kernel
        emb = parse_format(self.embedding)
        if not emb.is_float and (emb.weight_bits == 2 or emb.act != "none" or emb.group_size is None):
            raise SpecError("embedding-format", f"embedding format {self.embedding} cannot be gathered.",
                            "Use fp32, fp16, or w4g*/w8g* (optionally with z) for the embedding table.")
        self._check_group("embedding", self.embedding, self.hidden_size)
        self._check_group("lm_head", self.lm_head, self.hidden_size)
        for i, ls in enumerate(self.layers):
            if ls.keep:
                self._validate_layer(i, ls, allowed_formats)
        return self

    def _validate_layer(self, i: int, ls: LayerSpec, allowed: set[str] | None) -> None:
        b, where = self.base, f"layer {i}"
        if not 1 <= ls.num_kv_heads <= b.num_kv_heads:
            raise SpecError("kv-heads-range", f"{where}: num_kv_heads {ls.num_kv_heads} is outside 1..{b.num_kv_heads}.")
        if ls.num_heads % ls.num_kv_heads:
            raise SpecError("heads-divisible", f"{where}: num_heads {ls.num_heads} is not a multiple of num_kv_heads {ls.num_kv_heads}.",
                            "GQA needs the same number of query heads in every kv group.")
        if not 1 <= ls.num_heads // ls.num_kv_heads <= b.heads_per_group:
            raise SpecError("heads-per-group", f"{where}: {ls.num_heads // ls.num_kv_heads} query heads per kv group; the model has {b.heads_per_group}.")
        if ls.head_dim % 2 or not 2 <= ls.head_dim <= b.head_dim:
            raise SpecError("head-dim", f"{where}: head_dim {ls.head_dim} must be even and within 2..{b.head_dim}.",
                            "Rotary embedding prunes q/k dimensions in pairs.")
        if not 1 <= ls.intermediate_size <= b.intermediate_size:
            raise SpecError("mlp-range", f"{where}: intermediate_size {ls.intermediate_size} is outside 1..{b.intermediate_size}.")
        missing = [n for n in LINEARS if n not in ls.precision]
        extra = [n for n in ls.precision if n not in LINEARS]
        if missing or extra:
            raise SpecError("precision-keys", f"{where}: precision must name exactly {', '.join(LINEARS)}"
                            + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else "") + ".")
        k_of = {"q_proj": self.hidden_size, "k_proj": self.hidden_size, "v_proj": self.hidden_size,
                "gate_proj": self.hidden_size, "up_proj": self.hidden_size,
                "o_proj": ls.num_heads * ls.head_dim, "down_proj": ls.intermediate_size}
        for name in LINEARS:
            self._check_format(ls.precision[name], f"{where} {name}", allowed)
            self._check_group(f"{where} {name}", ls.precision[name], k_of[name])
        if ls.order is not None:
            o = ls.order
            _check_perm("layer-order", o.kv_groups, b.num_kv_heads, f"{where} kv_groups")
            if len(o.heads_in_group) != b.num_kv_heads:
                raise SpecError("layer-order", f"{where}: heads_in_group needs {b.num_kv_heads} entries.")
            for g in o.heads_in_group:
                _check_perm("layer-order", g, b.heads_per_group, f"{where} heads_in_group")
            _check_perm("layer-order", o.rope_pairs, b.head_dim // 2, f"{where} rope_pairs")
            _check_perm("layer-order", o.v_dims, b.head_dim, f"{where} v_dims")
            _check_perm("layer-order", o.mlp, b.intermediate_size, f"{where} mlp")

    @staticmethod
    def _check_format(name: str, where: str, allowed: set[str] | None) -> None:
        try:
            fmt = parse_format(name)
        except UsageError as e:
            raise SpecError("known-format", f"{where}: {e.message}", e.hint) from None
        if fmt.name != name:
            raise SpecError("canonical-format", f"{where}: write {fmt.name!r}, not {name!r}.")
        if allowed is not None and name not in allowed:
            raise SpecError("target-kernel", f"{where}: the target has no kernel for {name}.",
                            f"The target offers: {', '.join(sorted(allowed))}.")

    @staticmethod
    def _check_group(where: str, name: str, k: int) -> None:
        g = parse_format(name).group_size
        if g and k % g:
            raise SpecError("group-divides-k", f"{where}: input width {k} is not a multiple of group size {g} ({name}).",
                            "Choose widths that are multiples of the group size, or a smaller group.")


def _check_perm(rule: str, order: Sequence[int] | None, n: int, what: str) -> None:
    if order is not None and sorted(order) != list(range(n)):
        raise SpecError(rule, f"{what} is not a permutation of 0..{n - 1}.")


def random_spec(base: BaseShape, seed: int, formats: Sequence[str] = ("fp32", "w4g32", "w8g32", "w4g32a8"),
                *, keep_prob: float = 0.85, model: str = "") -> SubnetSpec:
    """A seeded random valid spec (for tests and benchmarks).

    Widths are drawn on a grid that suits group sizes (multiples of 32 where
    the base allows); each linear draws a format from ``formats`` among those
    whose group size divides its input width, falling back to fp32.
    """
    import numpy as np

    rng = np.random.default_rng(seed)

    def grid(full: int, step: int, lo_frac: float) -> int:
        if full < step:
            return full
        choices = [w for w in range(step, full + 1, step) if w >= lo_frac * full] or [full]
        return int(rng.choice(choices))

    def pick(k: int) -> str:
        ok = [f for f in formats if not parse_format(f).group_size or k % parse_format(f).group_size == 0]
        return str(rng.choice(ok)) if ok else "fp32"

    hidden = grid(base.hidden_size, 32, 0.5)
    keep = rng.random(base.num_layers) < keep_prob
    if not keep.any():
        keep[rng.integers(base.num_layers)] = True
    layers = []
    for i in range(base.num_layers):
        kv = int(rng.integers(1, base.num_kv_heads + 1))
        per = int(rng.integers(1, base.heads_per_group + 1))
        hd = base.head_dim if rng.random() < 0.5 else grid(base.head_dim, 16, 0.5)
        mlp = grid(base.intermediate_size, 32, 0.25)
        k_of = {"o_proj": kv * per * hd, "down_proj": mlp}
        prec = {n: pick(k_of.get(n, hidden)) for n in LINEARS}
        layers.append(LayerSpec(bool(keep[i]), kv * per, kv, hd, mlp, prec))
    spec = SubnetSpec(base, hidden, tuple(layers), lm_head=pick(hidden), model=model)
    return spec.validate()


def load_spec(spec: SubnetSpec | str | Path) -> SubnetSpec:
    """A spec object, or one read (and validated) from a JSON file."""
    if isinstance(spec, SubnetSpec):
        return spec.validate()
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"No such spec file: {path}.", "Make one with `llmshrink spec new`.")
    return SubnetSpec.from_json(path.read_text())


def precision_summary(spec: SubnetSpec) -> dict[str, int]:
    """How many linear layers (lm_head included) use each format."""
    counts: dict[str, int] = {}
    for i in spec.kept_layers():
        for name in LINEARS:
            f = spec.layers[i].precision[name]
            counts[f] = counts.get(f, 0) + 1
    counts[spec.lm_head] = counts.get(spec.lm_head, 0) + 1
    return dict(sorted(counts.items()))
