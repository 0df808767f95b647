"""Where the torch phases of ``compress`` run: ``--device auto|cpu|cuda[:N]``, and in which precision.

The latency side is the target's (its table prices subnets wherever the
search trains); this module only says which torch device trains, scores and
quantizes, and what it offers: its name, its memory, how many like it are
visible, and the dtype the phases compute in there:

* CUDA: the original model's parameters in bf16 where the GPU supports it
  (Ampere and later), fp32 otherwise; fp16 is not used (no loss scaling in the
  KD loops). Recovery autocasts its forward to bf16 there.
* CPU: fp32 weights; recovery autocasts its forward to bf16 where the CPU has
  native bf16 (``RecoveryConfig.bf16 = "auto"``), which measured faster there.
* Everywhere: what a phase trains or quantizes is an fp32 copy, and the search
  computes in fp32 (it prices rounding errors as small as bf16's own).

``auto`` takes the first CUDA device when torch sees one, else the CPU.
Asking for CUDA where torch sees none is :class:`MissingHardwareError`
(exit code 5), raised before any weights load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmshrink import serde
from llmshrink.errors import MissingHardwareError, UsageError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"


@serde.serializable("Device")
@dataclass(frozen=True)
class Device:
    """One resolved torch device and what it offers."""

    torch_device: str  # "cpu" or "cuda:N": what torch.device() takes
    name: str  # CPU model name or GPU product name
    memory_bytes: int  # this device's memory: total GPU memory, or the host's available RAM
    count: int  # devices of this kind visible to the process (GPUs; 1 for the CPU)
    dtype: str  # "bf16" or "fp32": what the original model's parameters are held in (:func:`place_model`)

    @property
    def kind(self) -> str:
        """``cpu`` or ``cuda``."""
        return self.torch_device.partition(":")[0]

    def torch(self):
        """The ``torch.device``."""
        import torch

        return torch.device(self.torch_device)

    def torch_dtype(self):
        """The ``torch.dtype`` of :attr:`dtype`."""
        import torch

        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]


def parse_device(text: str) -> tuple[str, int | None]:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> (kind, index or None).

    Raises:
        UsageError: anything else.
    """
    t = (text or "auto").strip().lower()
    if m := re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", t):
        kind, index = m.group(1), m.group(2)
        if index is not None and kind != "cuda":
            raise UsageError(f"--device {text!r}: only cuda takes an index.", f"Use one of: {DEVICE_CHOICES}.")
        return kind, None if index is None else int(index)
    raise UsageError(f"--device {text!r} is not a device llmshrink can train on.", f"Use one of: {DEVICE_CHOICES}.")


def resolve_device(text: str = "auto") -> Device:
    """The :class:`Device` ``text`` names on this machine.

    Raises:
        UsageError: ``text`` is not ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        MissingHardwareError: CUDA was asked for and torch sees no CUDA device (or not that many).
    """
    import torch

    kind, index = parse_device(text)
    has_cuda = torch.cuda.is_available()
    if kind == "auto":
        kind = "cuda" if has_cuda else "cpu"
    if kind == "cpu":
        from llmshrink.host import available_memory_bytes, cpu_model

        return Device("cpu", cpu_model(), available_memory_bytes(), 1, "fp32")
    if not has_cuda:
        build = torch.__version__
        raise MissingHardwareError(
            f"--device {text}: torch {build} sees no CUDA device on this machine"
            + (" (it is a CPU-only build)." if "+cpu" in build or torch.version.cuda is None else "."),
            "Run where a CUDA GPU and a CUDA build of torch are present, or use --device cpu "
            "(or auto: CUDA when present, else the CPU).")
    count = torch.cuda.device_count()
    # plain `cuda`: the current device, which under torchrun is this rank's own (distributed.init_from_env)
    index = torch.cuda.current_device() if index is None else index
    if index >= count:
        raise MissingHardwareError(f"--device cuda:{index}: torch sees {count} CUDA device(s) (cuda:0..{count - 1}).",
                                   "Pick one of them, or set CUDA_VISIBLE_DEVICES.")
    props = torch.cuda.get_device_properties(index)
    dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return Device(f"cuda:{index}", props.name, int(props.total_memory), count, dtype)


def device_of(module):
    """The ``torch.device`` a module's parameters (else buffers) live on; the CPU for one that holds neither.

    The phases of ``compress`` place every tensor they make on the device of the model they work on, so
    that the same code runs on the CPU and on a GPU (tests/unit/compressor/test_placement.py checks it
    by running the phases with torch's default device set elsewhere)."""
    import torch

    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def autocast_bf16(device, enabled: bool):
    """``torch.autocast`` to bfloat16 on ``device``'s kind (cpu or cuda), or a no-op when not ``enabled``."""
    import torch

    kind = device.type if hasattr(device, "type") else str(device).partition(":")[0]
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=enabled)


def place_model(model, device: Device):
    """``model`` (an HF causal LM, as loaded) moved to ``device`` for the torch phases, its parameters in
    ``device.dtype``: fp32 on the CPU; on a GPU bf16 where supported (the dtype 1-8B Llama checkpoints ship
    in, so nothing is rounded, and half the memory), which :mod:`llmshrink.compressor.plan` assumes.

    Only parameters change dtype: buffers keep theirs. The rotary inverse frequencies are a buffer, and
    rounded to bf16 their angles drift by radians at a few thousand positions. What a phase trains or
    quantizes (the supernet, a materialized subnet) is copied from these weights in fp32."""
    import torch

    model = model.to(device.torch())
    dtype = device.torch_dtype()
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model
