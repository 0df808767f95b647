"""Static activation scales: calibrate the ``w8a8s`` layers of a CompressedModel on text.

TensorRT's INT8 GEMMs take activations through a QuantizeLinear whose scale
is a build-time constant, so a ``w8a8s`` layer needs one scale per input
tensor before it can be exported. This is post-training max calibration (the
"max" calibrator of TensorRT and ModelOpt's INT8 recipes): run the model in
float over calibration tokens, record each such layer's largest absolute
input, and set ``scale = amax / 127`` (rounded to float16, as the graph
stores it). All layers observe the same float pass, so the scales do not
depend on the order layers are calibrated in.
"""

from __future__ import annotations

import torch

from llmshrink.compressor.model import CompressedModel, QuantLinear
from llmshrink.compressor.quant import static_scale
from llmshrink.formats import parse_format
from llmshrink.spec import SubnetSpec

# Rows of calibration tokens per forward: bounds memory on long calibration sets.
BATCH = 4
# Rows static activation scales are calibrated on: a max calibrator settles within a few thousand tokens.
STATIC_CALIB_ROWS = 32


def needs_calibration(spec: SubnetSpec) -> bool:
    """True when ``spec`` uses a format with static activation scales."""
    return any(parse_format(f).act == "int8-static" for f in spec.formats_used())


def static_layers(cm: CompressedModel) -> dict[str, QuantLinear]:
    """The model's linears with static activation scales, by module name."""
    return {n: m for n, m in cm.named_modules() if isinstance(m, QuantLinear) and m.fmt.act == "int8-static"}


@torch.no_grad()
def calibrate_activations(cm: CompressedModel, tokens: torch.Tensor) -> dict[str, float]:
    """Set ``act_scale`` of every static-scale layer of ``cm`` from its inputs on ``tokens``; return the scales.

    Args:
        tokens: ids ``[N, T]``, run in batches of :data:`BATCH` rows. Use text the model will see
            (the run's calibration split), not the evaluation data.

    Raises:
        ValueError: no tokens, or a layer saw only zeros (its scale would be meaningless).
    """
    layers = static_layers(cm)
    if not layers:
        return {}
    amax = dict.fromkeys(layers, 0.0)

    def observer(name: str):
        def see(x: torch.Tensor) -> None:
            amax[name] = max(amax[name], float(x.detach().abs().max()))
        return see

    if not tokens.numel():
        raise ValueError("calibrating activation scales needs at least one token")
    for n, m in layers.items():
        m.observer, m.act_scale = observer(n), None
    try:
        for b in tokens.split(BATCH):
            cm(b.to(cm.embed.device))
    finally:
        for m in layers.values():
            m.observer = None
    if dead := [n for n, a in amax.items() if not a > 0]:
        raise ValueError(f"layers saw only zero inputs on the calibration tokens: {', '.join(dead[:5])}")
    scales = {n: static_scale(a) for n, a in amax.items()}
    for n, m in layers.items():
        m.act_scale = torch.tensor(scales[n], device=cm.embed.device)
    return scales
