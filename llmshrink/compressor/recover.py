"""Recovery: distil the original model into an extracted subnet through LoRA adapters, quantization-aware.

The student is the subnet as materialized (:func:`materialize`), with each
kept layer's seven linears made trainable through LoRA adapters (peft) and
every projection run *fake-quantized in its planned format*: the forward
uses ``Q(W + B·A)`` with a straight-through estimator, so the adapters learn
what survives quantization — merged and quantized for export, the weights
are the ones that were trained (up to the exporter's finer scale search).
peft has no layer that quantizes the merged weight, so :class:`QATLoraLinear`
is peft's own LoRA ``Linear`` with that forward, registered for our
:class:`QATLinear` through peft's custom-module hook.

The loss is the forward KL from the original model's logits (the same
:func:`~llmshrink.compressor.search.kd_loss` the search uses), on the
calibration sequences only. After training the adapters are merged
(``merge_and_unload``), the merged weights written back into a copy of the
original model at the kept rows and columns, and the subnet materialized
from that copy — so the result is an ordinary :class:`CompressedModel`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from llmshrink import serde
from llmshrink.compressor.materialize import linear_slices, materialize
from llmshrink.compressor.model import CompressedModel
from llmshrink.compressor.quant import quantize_activation
from llmshrink.compressor.search import kd_loss
from llmshrink.compressor.supernet import fake_quant
from llmshrink.compressor.teacher import TeacherTargets
from llmshrink.formats import QuantFormat, parse_format
from llmshrink.progress import NULL_PROGRESS, Progress
from llmshrink.spec import LINEARS, SubnetSpec


@serde.serializable("RecoveryConfig")
@dataclass(frozen=True)
class RecoveryConfig:
    """Knobs of :func:`recover` (defaults sized for a 2-core CPU and a ~135M model)."""

    steps: int = 80
    batch_size: int = 4
    seq_len: int = 128
    # LoRA's usual 1e-4..3e-4 assumes thousands of steps; recovery gets tens. On SmolLM2-135M (joint 5.27 ms
    # subnet, 19 of 30 blocks, KD before 2.21) 40 steps gave WikiText-2 ppl 572 at 2e-4, 431 at 1e-3, 302 at
    # 3e-3, 270 at 6e-3; 80 steps at 3e-3: 298 (calibration KD fell on to 0.84: the 16k-token split is
    # what limits longer recovery, so the default stays at the lr measured both at 40 and 80 steps).
    lr: float = 3e-3
    rank: int = 16
    alpha: int = 32
    kd_temperature: float = 1.0
    seed: int = 0


@serde.serializable("RecoveryLog")
@dataclass(frozen=True)
class RecoveryLog:
    step: int
    kd: float
    seconds: float


@dataclass
class RecoveryResult:
    model: CompressedModel
    history: list[RecoveryLog] = field(default_factory=list)
    kd_before: float | None = None
    kd_after: float | None = None


class QATLinear(nn.Linear):
    """A linear layer trained as it will run: weight fake-quantized to ``fmt``, activations rounded as the kernel does."""

    def __init__(self, weight: torch.Tensor, fmt: QuantFormat) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias=False)
        self.fmt = fmt
        with torch.no_grad():
            self.weight.copy_(weight)

    def quantized_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            resid = fake_quant(w.detach(), self.fmt) - w.detach()
            xq = quantize_activation(x.detach(), self.fmt) - x.detach()
        return F.linear(x + xq, w + resid)  # straight-through: gradients as if unquantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized_forward(x, self.weight)


def _lora_linear_class():
    from peft.tuners.lora.layer import Linear as LoraLinear

    class QATLoraLinear(LoraLinear):
        """peft's LoRA Linear, quantizing the *merged* weight ``W + B·A`` in the forward (see module docstring)."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            base = self.get_base_layer()
            w = base.weight
            if not self.disable_adapters and not self.merged:
                for name in self.active_adapters:
                    if name in self.lora_A:
                        w = w + self.get_delta_weight(name)
            return base.quantized_forward(x, w)

    return QATLoraLinear


# Calibration rows for static activation scales (w8a8s) of the recovered model: a max calibrator
# settles within a few thousand tokens, and the recovered weights are what the scales must fit.
CALIB_ROWS = 32


def _student(teacher, spec: SubnetSpec) -> CompressedModel:
    """The subnet with trainable, quantization-aware linears in its kept layers (lm_head and embedding frozen)."""
    # every linear and the lm_head as float: they become QATLinears below (a w8a8s lm_head, calibrated only
    # after recovery, would otherwise ask for calibration text here)
    fp32 = replace(spec, lm_head="fp32",
                   layers=tuple(replace(ls, precision=dict.fromkeys(LINEARS, "fp32")) for ls in spec.layers))
    cm = materialize(teacher, fp32)
    for i, block in zip(spec.kept_layers(), cm.blocks, strict=True):
        for name in LINEARS:
            old = getattr(block, name)
            setattr(block, name, QATLinear(old.weight, spec.layers[i].fmt(name)))
    head = QATLinear(cm.lm_head.weight, parse_format(spec.lm_head))
    head.weight.requires_grad_(False)
    cm.lm_head = head
    return cm


def _write_back(teacher, spec: SubnetSpec, student: CompressedModel):
    """A copy of ``teacher`` with the student's (merged) linear weights at the kept rows and columns."""
    hf = copy.deepcopy(teacher)
    hidden = torch.tensor(spec.hidden_channels(), dtype=torch.long)
    with torch.no_grad():
        for i, block in zip(spec.kept_layers(), student.blocks, strict=True):
            where = linear_slices(spec, i, hf.model.layers[i], hidden)
            for name in LINEARS:
                lin, r, c = where[name]
                lin.weight[r[:, None], c[None, :]] = getattr(block, name).weight.to(lin.weight.dtype)
    return hf


def recover(teacher, spec: SubnetSpec, calib: torch.Tensor, *, config: RecoveryConfig = RecoveryConfig(),
            tokenizer=None, targets: TeacherTargets | None = None,
            progress: Progress = NULL_PROGRESS) -> RecoveryResult:
    """KD-with-LoRA recovery of ``spec`` from ``teacher`` on ``calib`` ``[N, T]``; the quantized result.

    ``targets``: the teacher's log-probabilities on ``calib[:, :seq_len]`` when the caller has them
    (the search's); computed here otherwise.
    """
    from peft import LoraConfig, get_peft_model

    cfg = config
    teacher.eval()
    calib = calib[:, : cfg.seq_len]
    targets = TeacherTargets.reuse(targets, teacher, calib, batch_size=cfg.batch_size, progress=progress)
    student = _student(teacher, spec)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(LINEARS))
    qat_lora = _lora_linear_class()
    lora._register_custom_module({QATLinear: qat_lora})
    model = get_peft_model(student, lora)
    adapted = [m for m in model.modules() if hasattr(m, "lora_A")]
    if len(adapted) != len(LINEARS) * len(spec.kept_layers()) or not all(isinstance(m, qat_lora) for m in adapted):
        raise RuntimeError("peft did not wrap every kept linear with the quantization-aware LoRA layer")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / max(cfg.steps, 1)))  # warm-up, then linear decay
    gen = torch.Generator().manual_seed(cfg.seed)
    held = torch.arange(min(cfg.batch_size, len(calib)))  # a fixed batch to report the KD before and after

    def kd_on(rows: torch.Tensor, grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return kd_loss(model(calib[rows])[0], targets[rows], cfg.kd_temperature)

    kd_before = kd_on(held, False).item()
    history = []
    with progress.task("Recovery (KD + LoRA, quantization-aware)", total=cfg.steps) as task:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            loss = kd_on(torch.randint(len(calib), (cfg.batch_size,), generator=gen), True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.append(RecoveryLog(step + 1, loss.item(), time.perf_counter() - t0))
            task.advance(1, info=f"kd {loss.item():.3f}")
    kd_after = kd_on(held, False).item()
    merged = model.merge_and_unload()
    with progress.task("Quantizing the recovered subnet"):
        result = materialize(_write_back(teacher, spec, merged), spec, tokenizer, calib=calib[:CALIB_ROWS])
    return RecoveryResult(result, history, kd_before, kd_after)
