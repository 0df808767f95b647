"""Recovery: distil the original model into a quantized subnet, quantization-aware, on the grid that ships.

1. The subnet is materialized with the run's quantizer (GPTQ by default,
   :mod:`.sequential`): integer codes on a grid of scales (and zero points)
   per group, fixed from here on.
2. The student is that model with every kept linear trainable, activations
   rounded as the kernel does, and RMSNorm weights trainable. The embedding
   and lm_head stay frozen (tied, and a fifth of a small model; the lm_head
   still runs quantized; ``train_head`` trains its scales in mode ``scales``).
   What trains in each linear (``RecoveryConfig.mode``):

   * ``scales`` (default): the quantizer's codes stay and each group's scale
     trains, as EfficientQAT's end-to-end stage does (Chen et al. 2024, arXiv
     2407.11062). The weight is always exactly on its trained grid, so the
     gradient is exact: no straight-through estimator.
   * ``full``: the weight, starting at the dequantized codes; the forward
     rounds it to the nearest point of the *same* grid (straight-through).
   * ``lora``: LoRA adapters (peft), the forward rounding ``W + B·A`` likewise.
3. The loss is the forward KL from the original model's logits, computed on
   the fly (or read from the search's cached targets), on the calibration
   rows (``RecoveryConfig.rows`` of them in ``compress``: more than the
   search's, so that 300 steps see each about once); KD before and after is
   reported on held-out rows the training never sees.
4. What ships is exactly what the last training forward computed: the
   quantizer's codes on the trained scales (``scales``), or the nearest grid
   points of the trained weights on the grid's scales (``full``, ``lora``).
   Static activation scales (``w8a8s``) are calibrated on the trained model.
   If training raised the held-out KD, the quantizer's model ships instead.

With zero steps the result is the materialized subnet itself, so recovery
never ships codes other than the quantizer's unless it trained them.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from llmshrink import distributed as dist
from llmshrink import serde
from llmshrink.compressor.materialize import materialize
from llmshrink.compressor.model import CompressedModel, QuantLinear
from llmshrink.compressor.quant import WeightGrid, quantize_activation
from llmshrink.compressor.search import kd_loss
from llmshrink.compressor.teacher import TeacherTargets
from llmshrink.device import autocast_bf16, device_of
from llmshrink.progress import NULL_PROGRESS, Progress
from llmshrink.spec import LINEARS, SubnetSpec

MODES = ("full", "lora", "scales")
log = logging.getLogger("llmshrink")


@serde.serializable("RecoveryConfig")
@dataclass(frozen=True)
class RecoveryConfig:
    """Knobs of :func:`recover` (defaults sized for a 2-core CPU and a ~135M model)."""

    # Sized for a 45-minute run on 2 cores (benchmarks/recovery.py): ~2.6 s a step with bf16 autocast on an AMX
    # Xeon, ~4.6 s in fp32, so 300 steps (154k tokens) take ~13 / ~23 min; 3.1-3.3 s on a Zen 4 (AVX-512 BF16).
    # More steps keep paying, slowly: on that Zen 4 from the same GPTQ model, 300 steps gave WikiText-2 32.63 and
    # 400 steps 32.45 (scratch runs, 2026-12-01); 300 leave room in 45 min for the calibration text and GPTQ.
    steps: int = 300
    batch_size: int = 4
    seq_len: int = 128
    # Training sequences (of seq_len tokens): the search's calibration rows plus more of the same text. 300 steps
    # of 4 draw 1,200 rows: on 128 distinct rows they are ~9 passes over 16k tokens and held-out KD stops
    # improving after ~150 steps; on 1,024 rows each is seen about once.
    rows: int = 1024
    # "scales" is the default: on SmolLM2-135M uniform w4g32a8 from GPTQ (WikiText-2 perplexity 34.08, held-out
    # KD 0.168), 150 steps each: scales (lr 1e-3) 33.19 / KD 0.144 at 200 tokens/s; LoRA (rank 16, lr 3e-3)
    # 33.49 / 0.164 at 194 tokens/s; full fine-tuning (lr 1e-4) 33.85 / 0.162 at 168 tokens/s; scales at lr 4e-3
    # raised the held-out KD (reverted).
    # "lora": adapters of rank ``rank`` train; "full": the kept linears' weights do; "scales": the quantizer's codes
    # stay and each group's scale trains (exact gradients, no straight-through estimator; float linears stay)
    mode: str = "scales"
    lr: float = 1e-4  # full fine-tuning's
    scales_lr: float = 1e-3  # of the scales' log gains: about 0.1 % of a scale per step
    rank: int = 16
    alpha: int = 32
    # LoRA's adapters start at zero and take a larger step; 3e-3 beat 2e-4, 1e-3 and 6e-3 at 40 and 80 steps
    lora_lr: float = 3e-3
    train_norms: bool = True
    # mode "scales": the lm_head's scales train too (its codes stay). Off: on SmolLM2-135M w4g32a8 (300 steps,
    # 1,024 rows) it left perplexity where it was (32.86 with, 32.85 without) and made a step 20 % slower.
    train_head: bool = False
    kd_temperature: float = 1.0
    # Early stop (off by default): every ``check_every`` steps the held-out KD is measured, and training stops once
    # a check lowers it by less than ``min_gain`` of the last check's value (the best state seen ships). Tried as
    # the default (check_every 50) on SmolLM2-135M with 188 of 210 linears in w8g64a8 (Zen 4, 2026-12-02): the
    # first check found held-out KD unchanged (0.0633), so the quantizer's model shipped and the run took 38.8
    # min instead of 52.6; but its held-out perplexity was 27.05 against 26.56 after the full 300 steps, whose
    # KD had moved only 0.0633 -> 0.0630. Eight rows' KD is not the signal perplexity is, so it stays off.
    check_every: int = 0
    min_gain: float = 0.01
    bf16: str = "auto"  # autocast the forward to bfloat16: "auto" where the CPU has native bf16, "on", "off"
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
    kd_before: float | None = None  # on the held-out rows
    kd_after: float | None = None
    tokens: int = 0  # training tokens seen
    seconds: float = 0.0
    reverted: bool = False  # training raised the held-out KD, so the quantizer's model ships (kd_after = kd_before)
    checks: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out KD) of the early-stop checks
    stopped_at: int | None = None  # the step training stopped at, when the early stop ended it before ``steps``


class QATLinear(nn.Linear):
    """A trainable linear that runs as it will ship: weight on its grid, activations rounded as the kernel.

    Built from a materialized :class:`QuantLinear`. With ``train_scales`` the codes are
    fixed and the grid's scales train; otherwise the weight trains and is rounded onto the
    fixed grid. :meth:`to_quant_linear` gives the shipped layer back, equal to the forward.
    """

    def __init__(self, lin: QuantLinear, *, train_scales: bool = False) -> None:
        super().__init__(lin.in_features, lin.out_features, bias=False, device=lin.weight.device)
        self.fmt = lin.fmt
        q = lin.quantized
        self.grid = None if q is None else q.grid
        self.act_scale = None if lin.act_scale is None else float(lin.act_scale)
        self.register_buffer("lin_bias", lin.bias)
        self._frozen_rounded: torch.Tensor | None = None
        with torch.no_grad():
            self.weight.copy_(lin.weight)
        # mode "scales": the quantizer's codes stay, each group's scale trains (as a log gain, so a step moves
        # every scale by the same fraction); the weight is then exactly on its (trained) grid, no rounding
        self.log_gain: nn.Parameter | None = None
        if train_scales:
            self.weight.requires_grad_(False)  # float linears stay as they are
            if q is not None:
                self.register_buffer("codes", q.codes.float())
                self.log_gain = nn.Parameter(torch.zeros_like(q.scales))

    def trained_grid(self) -> WeightGrid | None:
        """The grid the forward runs on: the quantizer's, with the trained scales in mode ``scales``."""
        if self.grid is None or self.log_gain is None:
            return self.grid
        return replace(self.grid, scales=self.grid.scales * self.log_gain.exp())

    def _round(self, w: torch.Tensor) -> torch.Tensor:
        if self.grid is not None:
            return self.grid.fake_quant(w)
        return w.half().float() if self.fmt.weight_bits == 16 else w

    def quantized_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        frozen = w is self.weight and not self.weight.requires_grad  # the lm_head: rounded once, kept rounded
        if frozen:
            if self._frozen_rounded is None:
                with torch.no_grad():
                    self._frozen_rounded = self._round(w.detach().float())
            return F.linear(self._kernel_input(x), self._frozen_rounded, self.lin_bias)
        with torch.no_grad():
            resid = self._round(w.detach().float()) - w.detach()
        # straight-through: gradients as if unrounded
        return F.linear(self._kernel_input(x), w + resid, self.lin_bias)

    def _kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` rounded as the kernel rounds its input, with the gradient of ``x`` (straight-through)."""
        with torch.no_grad():
            xq = quantize_activation(x.detach().float(), self.fmt, self.act_scale).to(x.dtype) - x.detach()
        return x + xq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.log_gain is not None:
            return F.linear(self._kernel_input(x), self.trained_grid().dequantize(self.codes), self.lin_bias)
        return self.quantized_forward(x, self.weight)

    def to_quant_linear(self) -> QuantLinear:
        if self.log_gain is not None:
            with torch.no_grad():
                grid = self.trained_grid()
            return QuantLinear.from_quantized(grid.quantized(self.codes), self.lin_bias)
        w = self.weight.detach().float()
        if self.grid is None:
            return QuantLinear(w, self.lin_bias, self.fmt)
        return QuantLinear.from_quantized(self.grid.quantized(self.grid.codes(w)), self.lin_bias)


def _lora_linear_class():
    from peft.tuners.lora.layer import Linear as LoraLinear

    class QATLoraLinear(LoraLinear):
        """peft's LoRA Linear, rounding the *merged* weight ``W + B·A`` onto the grid in the forward."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            base = self.get_base_layer()
            w = base.weight
            if not self.disable_adapters and not self.merged:
                for name in self.active_adapters:
                    if name in self.lora_A:
                        w = w + self.get_delta_weight(name)
            return base.quantized_forward(x, w)

    return QATLoraLinear


_NORMS = ("input_norm", "post_norm")


def _set_norms_trainable(cm: CompressedModel, trainable: bool) -> None:
    """Turn the RMSNorm weights (buffers) into parameters, or back."""
    mods = [(b, n) for b in cm.blocks for n in _NORMS] + [(cm, "final_norm")]
    for mod, name in mods:
        t = getattr(mod, name).detach().clone()
        delattr(mod, name)
        if trainable:
            mod.register_parameter(name, nn.Parameter(t))
        else:
            mod.register_buffer(name, t)


def _student(cm: CompressedModel, config: RecoveryConfig) -> CompressedModel:
    """A copy of ``cm`` with trainable, quantization-aware kept linears (and norms); lm_head frozen."""
    student = copy.deepcopy(cm)
    for block in student.blocks:
        for name in LINEARS:
            setattr(block, name, QATLinear(getattr(block, name), train_scales=config.mode == "scales"))
    # The lm_head's weight stays frozen; in mode "scales" its grid's scales train (``train_head``), unless it is
    # tied to an embedding in its own format: the export then stores one table for both, which must stay one.
    shares_table = cm.spec.base.tied_embeddings and cm.spec.lm_head == cm.spec.embedding
    head = QATLinear(student.lm_head, train_scales=config.mode == "scales" and config.train_head and not shares_table)
    head.weight.requires_grad_(False)
    student.lm_head = head
    if config.train_norms:
        _set_norms_trainable(student, True)
    if config.mode == "full":
        for block in student.blocks:
            for name in LINEARS:
                getattr(block, name).weight.requires_grad_(True)
    return student


def _shipped(student: CompressedModel, original_head: QuantLinear) -> CompressedModel:
    """The student as an ordinary CompressedModel: codes on its grids, norms as buffers."""
    for block in student.blocks:
        for name in LINEARS:
            setattr(block, name, getattr(block, name).to_quant_linear())
    head = student.lm_head
    student.lm_head = head.to_quant_linear() if head.log_gain is not None else original_head
    if isinstance(student.final_norm, nn.Parameter):
        _set_norms_trainable(student, False)
    return student.eval()


def use_bf16(setting: str, device=None) -> bool:
    """Whether to autocast to bfloat16 on ``device`` (default the CPU): ``auto`` where the CPU has native bf16
    (AVX-512 BF16 or AMX), on a GPU where it supports bf16 (Ampere and later)."""
    if setting in ("on", "off"):
        return setting == "on"
    if device is not None and torch.device(device).type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        import torch.backends.mkldnn as mkldnn

        return bool(mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class _Teacher:
    """The teacher's log-probabilities for calibration rows: from cached targets, or its forward on the fly."""

    def __init__(self, hf, calib: torch.Tensor, targets: TeacherTargets | None, bf16: bool) -> None:
        self.hf, self.calib, self.targets, self.bf16 = hf, calib, targets, bf16
        self.device = device_of(hf)

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities ``[len(rows), T, V]`` on the teacher's device."""
        if ids is None and self.targets is not None:
            return self.targets[rows].to(self.device)
        ids = self.calib[rows] if ids is None else ids
        vocab = int(self.hf.config.vocab_size)
        with autocast_bf16(self.device, self.bf16):
            logits = self.hf(input_ids=ids.to(self.device), use_cache=False).logits[..., :vocab]
        return F.log_softmax(logits.float(), -1)


def _epochs(n: int, draws: int, seed: int) -> torch.Tensor:
    """``draws`` row indices in ``range(n)``: whole seeded permutations, one after another, so that every row is
    seen once before any is seen twice (drawing with replacement, 1,200 draws from 1,024 rows leave 31 % unseen)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(n, generator=gen, device="cpu") for _ in range(-(-draws // n))])[:draws]


def recover(teacher, spec: SubnetSpec, calib: torch.Tensor, *, config: RecoveryConfig = RecoveryConfig(),
            tokenizer=None, targets: TeacherTargets | None = None, held_out: torch.Tensor | None = None,
            quantizer: str = "gptq", quant_calib: torch.Tensor | None = None, start: CompressedModel | None = None,
            progress: Progress = NULL_PROGRESS) -> RecoveryResult:
    """Quantization-aware KD recovery of ``spec`` from ``teacher``, trained on ``calib`` ``[N, T]``.

    Args:
        quant_calib: the rows the quantizer (GPTQ) calibrates on (default: the training rows); ``compress``
            gives its first ``n_quant``, the rows ``export`` of the same spec calibrates on too.
        targets: the teacher's log-probabilities on ``calib[:, :seq_len]`` when the caller has them
            (the search's); computed on the fly otherwise.
        held_out: rows ``[M, T]`` never trained on, for the KD reported before and after
            (default: the last ``batch_size`` rows of ``calib``, which are then left out of training).
        quantizer: how the subnet's codes start (``gptq`` on ``calib``, or ``rtn``).
        start: ``spec`` already materialized with ``quantizer`` on ``quant_calib`` (a screened contender):
            recovery starts from it instead of quantizing again.
    """
    cfg = config
    if cfg.mode not in MODES:
        raise ValueError(f"unknown recovery mode {cfg.mode!r} (use one of {MODES})")
    if dist.world_size() > cfg.batch_size:
        raise ValueError(f"{dist.world_size()} processes share recovery batches of {cfg.batch_size} rows: use at "
                         "most that many")
    teacher.eval()
    dev = device_of(teacher)  # the student trains where the teacher runs; rows and targets come from the host
    t_start = time.perf_counter()
    calib = calib[:, : cfg.seq_len]
    if held_out is None:
        calib, held_out = calib[: -cfg.batch_size], calib[-cfg.batch_size:]
        targets = None if targets is None else targets.take(slice(0, len(calib)))
    held_out = held_out[:, : cfg.seq_len]
    if targets is not None and not torch.equal(targets.calib, calib):
        raise ValueError("targets were computed for other sequences than calib[:, :seq_len]")
    if start is not None:
        if start.spec.fingerprint() != spec.fingerprint():
            raise ValueError("start is a materialization of another spec")
        cm = start.to(dev)
    else:
        with progress.task(f"Quantizing the subnet ({quantizer})"):
            cm = materialize(teacher, spec, tokenizer, calib=calib if quant_calib is None else quant_calib,
                             quantizer=quantizer, progress=progress)
    if cfg.steps == 0:
        return RecoveryResult(cm, seconds=time.perf_counter() - t_start)
    bf16 = use_bf16(cfg.bf16, dev)
    teach = _Teacher(teacher, calib, targets, bf16)
    held_targets = teach(None, held_out).cpu()  # [M, T, V]: kept on the host, moved a batch at a time
    student = _student(cm, cfg)
    model = student
    if cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(LINEARS))
        qat_lora = _lora_linear_class()
        lora._register_custom_module({QATLinear: qat_lora})
        with torch.device(dev):  # the adapters are made where the student is, not on the default device
            model = get_peft_model(student, lora)
        if cfg.train_norms:  # peft freezes everything it does not adapt
            for n, p in model.named_parameters():
                if n.endswith(("input_norm", "post_norm", "final_norm")):
                    p.requires_grad_(True)
    lr = {"full": cfg.lr, "lora": cfg.lora_lr, "scales": cfg.scales_lr}[cfg.mode]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.steps // 10)) * max(0.0, 1 - s / max(cfg.steps, 1)))

    def kd_on(ids: torch.Tensor, target_logp: torch.Tensor, grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad), autocast_bf16(dev, bf16):
            logits = model(ids.to(dev))[0]
        return kd_loss(logits.float(), target_logp.to(dev), cfg.kd_temperature)

    def held_kd() -> float:
        return sum(kd_on(held_out[i:i + cfg.batch_size], held_targets[i:i + cfg.batch_size], False).item()
                   * len(held_out[i:i + cfg.batch_size]) for i in range(0, len(held_out), cfg.batch_size)) / len(held_out)

    kd_before = held_kd()
    order = _epochs(len(calib), cfg.steps * cfg.batch_size, cfg.seed)
    history, tokens = [], 0
    stop = _EarlyStop(cfg, params, kd_before)
    with progress.task(f"Recovery (KD, quantization-aware, {cfg.mode})", total=cfg.steps) as task:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            rows = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            mine = rows[list(dist.share(len(rows)))]  # under torchrun, this rank's rows (llmshrink.distributed)
            loss = kd_on(calib[mine], teach(mine), True) * (len(mine) / len(rows))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.all_reduce_grads(params)
            opt.step()
            loss = dist.all_reduce_sum(loss)
            sched.step()
            tokens += calib[rows].numel()
            history.append(RecoveryLog(step + 1, loss.item(), time.perf_counter() - t0))
            task.advance(1, info=f"kd {loss.item():.3f}")
            if stop.due(step + 1) and stop.check(step + 1, held_kd()):
                task.advance(cfg.steps - step - 1, info=f"stopped at step {step + 1}: held-out KD gained less "
                                                        f"than {cfg.min_gain:.0%} in {cfg.check_every} steps")
                break
    kd_after = stop.restore_best() if stop.stopped_at else held_kd()
    if not kd_after < kd_before:  # training made it worse on rows it never saw: ship what the quantizer made
        log.warning("recovery raised the held-out KD from %.4f to %.4f; shipping the unrecovered model",
                    kd_before, kd_after)
        return RecoveryResult(cm, history, kd_before, kd_before, tokens, time.perf_counter() - t_start,
                              reverted=True, checks=stop.checks, stopped_at=stop.stopped_at)
    if cfg.mode == "lora":
        student = model.merge_and_unload()
    result = _shipped(student, cm.lm_head)
    from llmshrink.compressor.calibrate import (
        STATIC_CALIB_ROWS,
        calibrate_activations,
        needs_calibration,
    )

    if needs_calibration(spec):  # the trained weights are what the scales must fit
        calibrate_activations(result, calib[:STATIC_CALIB_ROWS])
    return RecoveryResult(result, history, kd_before, kd_after, tokens, time.perf_counter() - t_start,
                          checks=stop.checks, stopped_at=stop.stopped_at)


class _EarlyStop:
    """Recovery's early stop (``RecoveryConfig.check_every``, ``min_gain``): keeps the trainable parameters'
    best state (on the host) and says when a check gained too little.

    Every rank measures the same held-out KD of the same model, so every rank stops at the same step."""

    def __init__(self, cfg: RecoveryConfig, params: list[torch.Tensor], kd_before: float) -> None:
        self.cfg, self.params = cfg, params
        self.last = self.best = kd_before
        self.best_state: list[torch.Tensor] | None = None  # None: the start is the best seen
        self.checks: list[tuple[int, float]] = []
        self.stopped_at: int | None = None

    def due(self, step: int) -> bool:
        every = self.cfg.check_every
        return bool(every) and step % every == 0 and step < self.cfg.steps

    def check(self, step: int, kd: float) -> bool:
        """Record the held-out KD after ``step``; True when training should stop."""
        self.checks.append((step, kd))
        if kd < self.best:
            self.best = kd
            self.best_state = [p.detach().to("cpu", copy=True) for p in self.params]
        gained = (self.last - kd) / self.last if self.last > 0 else 0.0
        self.last = kd
        if gained < self.cfg.min_gain:
            self.stopped_at = step
        return self.stopped_at is not None

    @torch.no_grad()
    def restore_best(self) -> float:
        """Put the best state seen back into the parameters; its held-out KD (the start's, when no check beat it:
        the caller then ships the quantizer's model)."""
        if self.best_state is not None:
            for p, b in zip(self.params, self.best_state, strict=True):
                p.copy_(b.to(p.device))
        return self.best
