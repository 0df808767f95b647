"""A model's shape, read from its config: what `llmshrink models info` prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llmshrink.models.arch import check_supported


@dataclass(frozen=True)
class ModelInfo:
    """Architecture facts of a Llama-family decoder.

    ``num_params`` is computed from the config (no weights are read) and
    counts every parameter once, tied embeddings once.
    """

    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_params: int
    tied_embeddings: bool
    max_position_embeddings: int
    rope_theta: float | None
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


def head_dim_of(config) -> int:
    """Head size: ``config.head_dim`` when set, else hidden / heads."""
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def count_params(config) -> int:
    """Parameter count of a Llama-family decoder from its config alone."""
    arch = check_supported(config)
    h, v, i = config.hidden_size, config.vocab_size, config.intermediate_size
    nh = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nh
    hd = head_dim_of(config)
    qkv_bias = arch.qkv_bias or bool(getattr(config, "attention_bias", False))
    o_bias = bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h
    attn += (nh * hd + 2 * nkv * hd) * qkv_bias + h * o_bias
    mlp = 3 * h * i + (2 * i + h) * mlp_bias
    per_layer = attn + mlp + 2 * h
    embed = v * h
    lm_head = 0 if getattr(config, "tie_word_embeddings", False) else v * h
    return embed + config.num_hidden_layers * per_layer + h + lm_head


def _rope_theta(config) -> float | None:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta) if theta is not None else None


def model_info(config, source: str = "") -> ModelInfo:
    """Build :class:`ModelInfo` from an HF config of a supported architecture."""
    check_supported(config, source)
    archs = getattr(config, "architectures", None) or []
    return ModelInfo(
        architecture=archs[0] if archs else config.model_type,
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim_of(config),
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        num_params=count_params(config),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_position_embeddings=getattr(config, "max_position_embeddings", 0),
        rope_theta=_rope_theta(config),
        source=source,
    )
