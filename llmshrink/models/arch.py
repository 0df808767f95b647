"""Which decoder architectures llmshrink can compress, and what differs between them.

Everything downstream (search space, materializer, ONNX builder) reads a
model through this adapter instead of branching on ``model_type``. Adding a
Llama-family architecture means registering one :class:`ArchSupport`.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmshrink.errors import UnsupportedModelError
from llmshrink.registry import Registry


@dataclass(frozen=True)
class ArchSupport:
    """What llmshrink needs to know about a supported ``model_type``.

    Attributes:
        model_type: the HF ``config.model_type``.
        family: human name for listings.
        qkv_bias: whether q/k/v projections carry a bias by default (Qwen2).
    """

    model_type: str
    family: str
    qkv_bias: bool = False


ARCHITECTURES: Registry[ArchSupport] = Registry("architecture")
for _a in (
    ArchSupport("llama", "Llama / SmolLM / TinyLlama"),
    ArchSupport("mistral", "Mistral"),
    ArchSupport("qwen2", "Qwen2 / Qwen2.5", qkv_bias=True),
):
    ARCHITECTURES.register(_a.model_type, _a)


def check_supported(config, source: str = "") -> ArchSupport:
    """Return the adapter for ``config`` or raise naming what is supported.

    Raises:
        UnsupportedModelError: ``config.model_type`` is not registered.
    """
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES.get(model_type)
    supported = ", ".join(f"{a} ({ARCHITECTURES.get(a).family})" for a in ARCHITECTURES)
    where = f" {source}" if source else ""
    raise UnsupportedModelError(
        f"Model{where} has architecture {model_type!r}, which llmshrink cannot compress.",
        f"Supported decoder architectures: {supported}.",
    )
