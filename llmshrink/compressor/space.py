"""SearchSpace: the decisions a search makes, from the model's shape and the target's kernels.

Decisions (``DESIGN.md``): one global hidden width; per layer keep/drop,
kv groups, query heads per group (so query heads are always a multiple of
the kv groups), head size and MLP width; one precision per linear layer and
one for the lm_head. Every candidate width is a prefix of an importance
order (weight entanglement), so a candidate is just a number.

Candidates must build: a width that is the K of a grouped format must be a
multiple of that format's group size, so widths are drawn on a grid of the
largest group among the candidate formats. Defaults come from the model
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
from dataclasses import dataclass, fields
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
        per_layer += len(LINEARS) * math.log10(d["precision"])
        return math.log10(d["hidden"]) + math.log10(d["lm_head"]) + self.base.num_layers * per_layer

    def largest(self, fmt: str | None = None) -> SubnetSpec:
        """Every width at its largest, every block kept, in ``fmt`` (default: the first, widest-bit format)."""
        return self._uniform(max, fmt or self.formats[0], keep=self.base.num_layers)

    def smallest(self, fmt: str | None = None) -> SubnetSpec:
        """Every width at its smallest and only ``min_layers`` blocks (the first ones; the search picks
        which by importance), in ``fmt`` (default: the last format)."""
        return self._uniform(min, fmt or self.formats[-1], keep=self.min_layers)

    def _uniform(self, pick, fmt: str, keep: int) -> SubnetSpec:
        b = self.base
        layer = LayerSpec(True, pick(self.kv_groups) * pick(self.heads_per_group), pick(self.kv_groups),
                          pick(self.head_dim), pick(self.mlp), dict.fromkeys(LINEARS, fmt))
        layers = tuple(layer if i < keep else LayerSpec(False, layer.num_heads, layer.num_kv_heads, layer.head_dim,
                                                        layer.intermediate_size, layer.precision)
                       for i in range(b.num_layers))
        lm_head = fmt if fmt in self.lm_head_formats else self.lm_head_formats[0]
        return SubnetSpec(b, pick(self.hidden), layers, lm_head=lm_head)

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
        group = grid_step(self.formats + self.lm_head_formats)
        for name, vals in (("hidden", self.hidden), ("mlp", self.mlp)):
            bad = [v for v in vals if v % group]
            if bad:
                raise UsageError(f"Search space {name}: {bad} are not multiples of {group}, the largest quantization "
                                 "group among the candidate formats (a grouped format needs K divisible by its group).")
        bad = [(h, d) for h in (g * r for g in self.kv_groups for r in self.heads_per_group) for d in self.head_dim
               if (h * d) % group]
        if bad:
            raise UsageError(f"Search space: attention widths heads x head_dim {bad} are not multiples of {group} "
                             "(o_proj's K).", "Restrict head_dim or heads_per_group, or use smaller groups.")
        if len(self.heads_per_group) > 1 and any(d % group for d in self.head_dim):
            raise UsageError(f"Search space: head_dim {list(self.head_dim)} must be a multiple of {group} when heads "
                             "per group are searched (o_proj's quantization groups must not straddle heads).")
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

    Without ``search_formats``, the target's formats whose group divides the
    model's full widths (a 128-group format cannot quantize a 576-wide input).
    ``check=False`` skips validation (for a --space file to override first).
    """
    full = math.gcd(base.hidden_size, base.intermediate_size)
    formats = tuple(search_formats or (f for f in target_formats if full % (parse_format(f).group_size or 1) == 0))
    if not formats:
        raise UsageError(f"None of the target's formats ({', '.join(target_formats)}) fits widths "
                         f"{base.hidden_size}/{base.intermediate_size}.", "Give formats in a --space file.")
    step = math.lcm(32, grid_step(formats))  # default widths: multiples of 32 at least (kernel-friendly)
    space = SearchSpace(
        base=base,
        hidden=_grid(base.hidden_size, step, hidden_frac, 5) if hidden_frac < 1 else (base.hidden_size,),
        kv_groups=tuple(range(1, base.num_kv_heads + 1)),
        heads_per_group=tuple(range(1, base.heads_per_group + 1)),
        head_dim=(base.head_dim,),
        mlp=_grid(base.intermediate_size, step, 0.25, 6),
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
    from dataclasses import replace

    return replace(space, **changes).validate(target_formats)
