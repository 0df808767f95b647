"""SearchSpace: the decisions a search makes, from the model's shape and the target's kernels.

Decisions (``DESIGN.md``): one global hidden width; per layer keep/drop,
kv groups, query heads per group (so query heads are always a multiple of
the kv groups), head size and MLP width; one precision per linear layer and
one for the lm_head. Every candidate width is a prefix of an importance
order (weight entanglement), so a candidate is just a number.

Candidates must build: a grouped format needs its group to divide the input
width K of the linear it quantizes. A format is offered for a linear only
where its group divides every K that linear can have in the space
(:meth:`SearchSpace.linear_formats`): on SmolLM2 (hidden 576) a 128-group
format quantizes ``down_proj`` (MLP widths on a 128 grid) but not q/k/v,
gate, up or the lm_head. Only a linear with no offered format at all is an
error. Default widths are drawn on a grid of the groups that divide the full
width. Defaults come from the model
(head and MLP widths from about a quarter to full, the hidden width full:
see :func:`default_space`) and the target (its ``search_formats``, else
every format it has); a ``--space`` YAML overrides any of them::

    hidden: [384, 448, 512, 576]
    kv_groups: [1, 2, 3]
    heads_per_group: [1, 2, 3]
    head_dim: [64]
    mlp: [512, 768, 1024, 1280, 1536]
    min_layers: 20          # depth: keep at least this many blocks (= num_layers: no depth search)
    formats: [w8g64a8, w4g32a8, w4g128a8]
    lm_head_formats: [w8g64a8, w4g32a8]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from functools import cached_property
from pathlib import Path

from llmshrink import serde
from llmshrink.errors import UsageError
from llmshrink.formats import parse_format
from llmshrink.spec import LINEARS, BaseShape, LayerSpec, SubnetSpec


@serde.serializable("SearchSpace")
@dataclass(frozen=True)
class SearchSpace:
    """Candidate values per decision (each tuple ascending; see module docstring)."""

    base: BaseShape
    hidden: tuple[int, ...]
    kv_groups: tuple[int, ...]
    heads_per_group: tuple[int, ...]
    head_dim: tuple[int, ...]
    mlp: tuple[int, ...]
    min_layers: int
    formats: tuple[str, ...]
    lm_head_formats: tuple[str, ...]

    # ------------------------------------------------------------- queries
    @property
    def depth_search(self) -> bool:
        return self.min_layers < self.base.num_layers

    def decisions(self) -> dict[str, int]:
        """Number of candidates per kind of decision, per occurrence (for logs and sizing)."""
        return {"hidden": len(self.hidden), "keep": 2 if self.depth_search else 1, "kv_groups": len(self.kv_groups),
                "heads_per_group": len(self.heads_per_group), "head_dim": len(self.head_dim), "mlp": len(self.mlp),
                "precision": len(self.formats), "lm_head": len(self.lm_head_formats)}

    def log10_size(self) -> float:
        """log10 of the number of distinct subnets (ignoring the min_layers bound)."""
        d = self.decisions()
        per_layer = sum(math.log10(d[k]) for k in ("keep", "kv_groups", "heads_per_group", "head_dim", "mlp"))
        per_layer += sum(math.log10(len(self.linear_formats(n))) for n in LINEARS)
        head = math.log10(len(self.linear_formats("lm_head")))
        return math.log10(d["hidden"]) + head + self.base.num_layers * per_layer

    def input_widths(self, linear: str) -> tuple[int, ...]:
        """Every input width K that ``linear`` (a name of ``LINEARS`` or ``lm_head``) has in the space, and
        its full width in the model (the supernet quantizes the full, entangled weight and slices it).

        o_proj's K is heads x head size; unless every kv group keeps all its query heads, the heads a
        subnet keeps are not a prefix of the importance order, so its quantization groups must not
        straddle heads: the head size itself counts as a width then.
        """
        b = self.base
        if linear == "down_proj":
            return tuple(sorted({*self.mlp, b.intermediate_size}))
        if linear == "o_proj":
            ks = {g * r * d for g in self.kv_groups for r in self.heads_per_group for d in self.head_dim}
            ks.add(b.num_heads * b.head_dim)
            if self.heads_per_group != (b.heads_per_group,):
                ks |= set(self.head_dim)
            return tuple(sorted(ks))
        if linear in LINEARS or linear == "lm_head":
            return tuple(sorted({*self.hidden, b.hidden_size}))
        raise ValueError(f"unknown linear {linear!r}")

    def linear_formats(self, linear: str) -> tuple[str, ...]:
        """The candidate formats offered for ``linear``: those whose group divides each of its input widths
        (``lm_head`` draws from ``lm_head_formats``, every other linear from ``formats``), in space order."""
        return self._offered[linear]

    @cached_property
    def _offered(self) -> dict[str, tuple[str, ...]]:
        # computed once per space: fit_to_budget asks for every linear of every layer at each step
        out = {}
        for linear in (*LINEARS, "lm_head"):
            fmts = self.lm_head_formats if linear == "lm_head" else self.formats
            ks = self.input_widths(linear)
            out[linear] = tuple(f for f in fmts if all(k % (parse_format(f).group_size or 1) == 0 for k in ks))
        return out

    def fit_format(self, fmt: str, linear: str) -> str:
        """``fmt`` where ``linear`` is offered it, else the offered format nearest to it: the same bits,
        activations and symmetry first, then the nearest group (w4g128 -> w4g64 on a 576-wide input)."""
        offered = self.linear_formats(linear)
        if fmt in offered:
            return fmt
        if not offered:  # validate() refuses such a space; say which linear all the same
            raise UsageError(f"Search space: no candidate format fits {linear}.")
        want = parse_format(fmt)

        def group(f) -> float:  # one scale per channel: the coarsest "group"
            return f.group_size or float("inf")

        def distance(name: str) -> tuple:
            f = parse_format(name)
            gap = 0.0 if group(f) == group(want) else abs(math.log2(group(f) / group(want)))
            return (f.weight_bits != want.weight_bits, f.act != want.act, f.symmetric != want.symmetric, gap)

        return min(offered, key=distance)

    def in_format(self, spec: SubnetSpec, fmt: str) -> SubnetSpec:
        """``spec``'s architecture with every linear (and the lm_head) in ``fmt`` as :meth:`largest` places it
        (:meth:`fit_format`): e.g. a subnet priced in the space's fastest format."""
        layers = tuple(replace(ls, precision={n: self.fit_format(fmt, n) for n in ls.precision}) for ls in spec.layers)
        return replace(spec, layers=layers, lm_head=self.fit_format(fmt, "lm_head"))

    def largest(self, fmt: str | None = None) -> SubnetSpec:
        """Every width at its largest, every block kept, in ``fmt`` (default: the first, widest-bit format)
        where each linear is offered it (else the nearest offered format, :meth:`fit_format`)."""
        return self._uniform(max, fmt or self.formats[0], keep=self.base.num_layers)

    def expresses(self, spec: SubnetSpec) -> bool:
        """Whether every choice of ``spec`` is a candidate of this space (kept blocks' widths and formats,
        hidden width, lm_head format; a dropped block only where depth is searched)."""
        if spec.base != self.base or spec.hidden_size not in self.hidden:
            return False
        if spec.lm_head not in self.linear_formats("lm_head") or len(spec.kept_layers()) < self.min_layers:
            return False
        for ls in spec.layers:
            if not ls.keep:
                continue
            if (ls.num_kv_heads not in self.kv_groups or ls.num_heads // ls.num_kv_heads not in self.heads_per_group
                    or ls.head_dim not in self.head_dim or ls.intermediate_size not in self.mlp):
                return False
            if any(ls.precision[n] not in self.linear_formats(n) for n in LINEARS):
                return False
        return True

    def smallest(self, fmt: str | None = None) -> SubnetSpec:
        """Every width at its smallest and only ``min_layers`` blocks (the first ones; the search picks
        which by importance), in ``fmt`` (default: the last format) as :meth:`largest` places it."""
        return self._uniform(min, fmt or self.formats[-1], keep=self.min_layers)

    def _uniform(self, pick, fmt: str, keep: int) -> SubnetSpec:
        b = self.base
        layer = LayerSpec(True, pick(self.kv_groups) * pick(self.heads_per_group), pick(self.kv_groups),
                          pick(self.head_dim), pick(self.mlp), {n: self.fit_format(fmt, n) for n in LINEARS})
        layers = tuple(layer if i < keep else LayerSpec(False, layer.num_heads, layer.num_kv_heads, layer.head_dim,
                                                        layer.intermediate_size, layer.precision)
                       for i in range(b.num_layers))
        return SubnetSpec(b, pick(self.hidden), layers, lm_head=self.fit_format(fmt, "lm_head"))

    # ------------------------------------------------------------- checks
    def validate(self, target_formats: Sequence[str] | None = None) -> SearchSpace:
        """Raise UsageError naming the first candidate that cannot be built or is out of range."""
        b = self.base
        limits = {"hidden": b.hidden_size, "kv_groups": b.num_kv_heads, "heads_per_group": b.heads_per_group,
                  "head_dim": b.head_dim, "mlp": b.intermediate_size}
        for name, top in limits.items():
            vals = getattr(self, name)
            if not vals or list(vals) != sorted(set(vals)) or vals[0] < 1 or vals[-1] > top:
                raise UsageError(f"Search space {name}: {list(vals)} must be distinct ascending values in 1..{top}.")
        if self.head_dim and any(d % 2 for d in self.head_dim):
            raise UsageError(f"Search space head_dim: {list(self.head_dim)} must be even (rotary pairs).")
        if not 1 <= self.min_layers <= b.num_layers:
            raise UsageError(f"Search space min_layers {self.min_layers} must be in 1..{b.num_layers}.")
        for what, fmts in (("formats", self.formats), ("lm_head_formats", self.lm_head_formats)):
            if not fmts:
                raise UsageError(f"Search space {what} is empty.")
            for f in fmts:
                if target_formats is not None and f not in target_formats:
                    raise UsageError(f"Search space {what}: {f} is not a kernel of the target.",
                                     f"The target has: {', '.join(target_formats)}.")
        for name in (*LINEARS, "lm_head"):
            if not self.linear_formats(name):
                fmts = self.lm_head_formats if name == "lm_head" else self.formats
                field = "lm_head_formats" if name == "lm_head" else "formats"
                raise UsageError(
                    f"Search space: no candidate format fits {name}: its input widths {list(self.input_widths(name))} "
                    f"are not all multiples of the group size of any of {', '.join(fmts)}.",
                    f"Add a format with a smaller group or none (e.g. w4g32, w8a8 or a float format) to `{field}` "
                    "in a --space file, or choose widths on a multiple of the group size.")
        return self


def grid_step(formats: Sequence[str]) -> int:
    """The widths the formats allow are multiples of this: the least common multiple of their group sizes."""
    return math.lcm(1, *(parse_format(f).group_size or 1 for f in formats))


def _grid(full: int, step: int, lo_frac: float, n: int) -> tuple[int, ...]:
    """About ``n`` multiples of ``step`` from ``lo_frac * full`` to ``full`` (``full`` always included)."""
    top = full - full % step
    lo = max(step, math.ceil(lo_frac * full / step) * step)
    if top < lo:
        return (full,)
    k = max(1, round((top - lo) / step / max(1, n - 1)))
    vals = sorted(set(range(lo, top + 1, k * step)) | {top})
    return tuple(vals if full == top else vals + [full])


def default_space(base: BaseShape, target_formats: Sequence[str], *, search_formats: Sequence[str] | None = None,
                  min_layers_frac: float = 0.6, hidden_frac: float = 1.0, check: bool = True) -> SearchSpace:
    """The default space for ``base`` on a target: heads and MLP widths ~25-100 %, ≥ 60 % of the blocks, the
    target's formats, and the hidden (residual) width from ``hidden_frac`` to full — by default full only.

    Why the hidden width is not searched by default: on SmolLM2-135M, cutting it costs the most quality
    per millisecond saved (448 of 576 channels: held-out perplexity 29.5 → 379 before recovery for
    0.70 ms; dropping the 4 least influential blocks: → 102 for 0.79 ms), and the search's first-order
    signal underrates that — a 576 → 320 cut moves every RMSNorm at once — so searches took it first.
    Short recoveries (minutes of KD, not Minitron's billions of tokens) cannot repair it. A ``--space``
    file with ``hidden: [...]`` searches it.

    Without ``search_formats``, every format of the target; each linear is offered those whose group
    fits its input widths (:meth:`SearchSpace.linear_formats`).
    ``check=False`` skips validation (for a --space file to override first).
    """
    formats = tuple(search_formats or target_formats)

    def step(full: int) -> int:  # default widths: multiples of 32 at least (kernel-friendly) and of every
        return math.lcm(32, grid_step([f for f in formats  # group that fits the full width
                                       if full % (parse_format(f).group_size or 1) == 0]))

    space = SearchSpace(
        base=base,
        hidden=(_grid(base.hidden_size, step(base.hidden_size), hidden_frac, 5) if hidden_frac < 1
                else (base.hidden_size,)),
        kv_groups=tuple(range(1, base.num_kv_heads + 1)),
        heads_per_group=tuple(range(1, base.heads_per_group + 1)),
        head_dim=(base.head_dim,),
        mlp=_grid(base.intermediate_size, step(base.intermediate_size), 0.25, 6),
        min_layers=max(1, math.ceil(min_layers_frac * base.num_layers)),
        formats=formats, lm_head_formats=formats,
    )
    return space.validate(target_formats) if check else space


def load_space(path: str | Path, base: BaseShape, target_formats: Sequence[str], *,
               search_formats: Sequence[str] | None = None) -> SearchSpace:
    """The default space with the fields a ``--space`` YAML sets replaced (see module docstring)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"No such search-space file: {path}.")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML: {e}") from e
    known = {f.name for f in fields(SearchSpace)} - {"base"}
    if not isinstance(d, dict) or set(d) - known:
        raise UsageError(f"{path}: unknown fields {', '.join(sorted(set(d) - known)) if isinstance(d, dict) else d}.",
                         f"A space file may set: {', '.join(sorted(known))}.")
    space = default_space(base, target_formats, search_formats=d.get("formats") or search_formats, check=False)
    changes = {k: (int(v) if k == "min_layers" else tuple(str(x) if "formats" in k else int(x) for x in v))
               for k, v in d.items()}
    if "formats" in changes and "lm_head_formats" not in changes:
        changes["lm_head_formats"] = changes["formats"]
    return replace(space, **changes).validate(target_formats)
