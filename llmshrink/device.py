"""Where the torch phases of ``compress`` run: ``--device auto|cpu|cuda[:N]``, and in which precision.

The latency side is the target's (its table prices subnets wherever the
search trains); this module only says which torch device trains, scores and
quantizes, and what it offers: its name, its memory, how many like it are
visible, and the dtype the phases compute in there:

* CUDA: bf16 where the GPU supports it (Ampere and later), fp16 is not used
  (no loss scaling in the KD loops), fp32 otherwise.
* CPU: fp32 weights; recovery autocasts its forward to bf16 where the CPU has
  native bf16 (``RecoveryConfig.bf16 = "auto"``), which measured faster there.

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
    dtype: str  # "bf16" or "fp32": what weights and activations are held in

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
    index = 0 if index is None else index
    if index >= count:
        raise MissingHardwareError(f"--device cuda:{index}: torch sees {count} CUDA device(s) (cuda:0..{count - 1}).",
                                   "Pick one of them, or set CUDA_VISIBLE_DEVICES.")
    props = torch.cuda.get_device_properties(index)
    dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return Device(f"cuda:{index}", props.name, int(props.total_memory), count, dtype)
