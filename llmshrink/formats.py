"""Precision formats of linear layers: what a spec names and a target offers.

A format is written as a short string users can read and hand-edit:

=================  ==========================================================
``fp32``           float32 weights and activations
``fp16``           float16 weights and activations (GPU targets)
``w{b}g{G}``       b-bit integer weights in groups of G along K, float activations
``w{b}g{G}a8``     the same with int8 activations, quantized per block of G
                   along K (ONNX Runtime MatMulNBits, accuracy_level 4)
``w8a8``           int8 per-output-channel weights, int8 activations quantized
                   dynamically per tensor (ONNX Runtime DynamicQuantizeMatMul)
``w8a8s``          int8 per-output-channel weights, int8 activations with one
                   *static* symmetric scale per tensor, calibrated on text
                   before export (TensorRT INT8 Q/DQ, which needs constant scales)
suffix ``z``       asymmetric weights (a zero point per group), e.g. ``w4g32z``
=================  ==========================================================

Bits are 2, 4 or 8; groups 32, 64 or 128. Aliases (``int4``, ``int8``) name
the common choices. Whether a target can *run* a format is the target's
business (its kernel list); this module only says what a format means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from llmshrink.errors import UsageError
from llmshrink.registry import suggest

WEIGHT_BITS = (2, 4, 8)
GROUP_SIZES = (32, 64, 128)
ActQuant = Literal["none", "int8-block", "int8-tensor", "int8-static"]

_PATTERN = re.compile(r"^w(?P<bits>\d+)(?:g(?P<group>\d+))?(?P<act>a8)?(?P<asym>z)?$")


@dataclass(frozen=True)
class QuantFormat:
    """Meaning of one precision format.

    Attributes:
        weight_bits: 32 or 16 for float formats, else 2, 4 or 8.
        group_size: quantization group along K; None = one scale per output channel.
        symmetric: False when each group also has a zero point.
        act: activation quantization: ``none``, ``int8-block`` (per token and
            block of ``group_size`` along K, symmetric) or ``int8-tensor``
            (dynamic, per tensor, asymmetric uint8) or ``int8-static`` (one
            calibrated symmetric int8 scale per tensor, constant at run time).
    """

    weight_bits: int
    group_size: int | None = None
    symmetric: bool = True
    act: ActQuant = "none"

    @property
    def is_float(self) -> bool:
        return self.weight_bits >= 16

    @property
    def name(self) -> str:
        if self.is_float:
            return f"fp{self.weight_bits}"
        if self.group_size is None:
            return "w8a8s" if self.act == "int8-static" else "w8a8"
        return (f"w{self.weight_bits}g{self.group_size}" + ("a8" if self.act != "none" else "")
                + ("" if self.symmetric else "z"))

    def bits_per_weight(self) -> float:
        """Storage bits per weight, scales (fp32 on disk, fp16 in kernels: counted as 16) included."""
        if self.is_float:
            return float(self.weight_bits)
        group = self.group_size or 1 << 30
        extra = 16 / group + (0 if self.symmetric else self.weight_bits / group)
        return self.weight_bits + extra

    def __str__(self) -> str:
        return self.name


ALIASES = {
    "int4": "w4g32",
    "int4-a8": "w4g32a8",
    "int8": "w8a8",
    "int2": "w2g32a8",
}
FP32 = QuantFormat(32)
# How integer weights are rounded onto their grid (llmshrink.compressor.materialize): GPTQ by default.
QUANTIZERS = ("gptq", "rtn")
# Where the float weights a quantizer reads come from (llmshrink.exporters.export.streams_layers): the model loaded
# whole, or one decoder layer at a time from disk.
LAYER_STREAMING = ("auto", "on", "off")


def parse_format(name: str) -> QuantFormat:
    """Parse a format name or alias.

    Raises:
        UsageError: the name is not a format; the message says what is.
    """
    raw = name
    name = ALIASES.get(name.strip().lower(), name.strip().lower())
    if name in ("fp32", "fp16"):
        return QuantFormat(int(name[2:]))
    if name == "w8a8":
        return QuantFormat(8, None, True, "int8-tensor")
    if name == "w8a8s":
        return QuantFormat(8, None, True, "int8-static")
    m = _PATTERN.match(name)
    if m and m["group"]:
        bits, group = int(m["bits"]), int(m["group"])
        if bits in WEIGHT_BITS and group in GROUP_SIZES:
            return QuantFormat(bits, group, symmetric=not m["asym"], act="int8-block" if m["act"] else "none")
    examples = ["fp32", "fp16", "w4g32", "w4g32a8", "w8g128", "w2g64a8", "w4g32z", "w8a8", "w8a8s", *ALIASES]
    raise UsageError(
        f"Unknown precision format {raw!r}.",
        f"Formats are fp32, fp16, w8a8, w8a8s, or w{{2,4,8}}g{{32,64,128}}[a8][z]; e.g. {', '.join(examples[:7])}; "
        f"aliases: {', '.join(ALIASES)}. Nearest: {', '.join(suggest(raw, examples))}.",
    )


_ACT_LOSS = {"none": 0, "int8-block": 1, "int8-static": 2, "int8-tensor": 3}


def fidelity_key(name: str) -> tuple:
    """Sort key, most faithful to the float model first: more weight bits; then float activations
    before int8 ones (per block of K, static per tensor, dynamic per tensor); then smaller groups (one
    scale per channel last); then a zero point before none. A prior, not a measurement: it orders
    formats of the same model where nothing has been scored yet."""
    f = parse_format(name)
    return (-f.weight_bits, _ACT_LOSS[f.act], f.group_size or 1 << 30, f.symmetric)


def at_least_as_faithful(a: str, b: str) -> bool:
    """Whether format ``a`` loses nothing ``b`` keeps, on every axis at once: as many weight bits, activations
    quantized no coarser, groups no larger, and a zero point wherever ``b`` has one. A partial order
    (``w4g32a8`` and ``w4g64`` are not comparable), unlike :func:`fidelity_key`'s total one."""
    fa, fb = parse_format(a), parse_format(b)
    if fa.is_float or fb.is_float:
        return fa.weight_bits >= fb.weight_bits
    return (fa.weight_bits >= fb.weight_bits and _ACT_LOSS[fa.act] <= _ACT_LOSS[fb.act]
            and (fa.group_size or 1 << 30) <= (fb.group_size or 1 << 30) and (not fa.symmetric or fb.symmetric))


def all_formats() -> list[QuantFormat]:
    """Every format this module can express (targets pick their subset)."""
    out = [QuantFormat(32), QuantFormat(16), parse_format("w8a8"), parse_format("w8a8s")]
    for bits in WEIGHT_BITS:
        for g in GROUP_SIZES:
            for act in ("none", "int8-block"):
                for sym in (True, False):
                    out.append(QuantFormat(bits, g, sym, act))
    return out
