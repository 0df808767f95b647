"""The differentiable search: architecture logits (and optionally the Supernet's weights) under a budget.

Each step (DARTS-style, first order) makes an architecture update on a
batch from one half of the calibration sequences and, with
``weight_lr > 0``, first a weight update on a batch from the other half,
with separate optimizers (Adam for weights, SGD for architecture logits:
see below):

- weights: KD loss only (forward KL from the original model's logits);
- architecture: KD + ``λ_lat · max(0, E[latency]/budget − 1)``
  + ``λ_par · max(0, E[params]/params_budget − 1)``, ``E[latency]`` from the
  target's latency table through the same predictor ``validate`` uses.

Weights: by default (``weight_lr = 0``) the supernet keeps the pretrained
weights and the search learns architecture logits only. That is a choice:
what ships is the extracted subnet built from the *original* weights by the
quantizer (GPTQ) and then recovered, so a search that judges each subnet with
the weights the screening will see ranks subnets as the screening does, and
it costs one forward and backward per step instead of two. (With
``weight_lr > 0`` weights are trained as in the paper's weight entanglement;
the trained weights are still not shipped.)

The architecture step is a Lagrangian one: plain SGD (with momentum) keeps
the gradients' sizes, so each decision moves as much as its KD cost and its
latency saving say — at the fixed point the KD cost per millisecond saved is
the same λ for every decision. (Adam divides each logit's gradient by its
own scale: the latency term, the only one with a steady sign, then pushed
every decision toward its cheapest candidate at the same rate, and a
SmolLM2 search ended at hidden 320 with one head in many layers.) λ_lat is
a multiplier raised by dual ascent, ``λ ← λ · exp(η · (E[lat]/budget − 1))``
(``lambda_lr`` = η), until the budget is met, so no λ needs tuning per model.
Each logit's gradient is clipped to ``±arch_grad_clip`` before the step: the
straight-through estimate is first order, and one wild sample (a block with
massive activations, dropped) must not throw a decision to -100.

Quantization: the supernet fake-quantizes on the export's grid, rounding to
nearest, unless ``compress`` hands it the run's quantizer's models
(:meth:`Supernet.use_quantized`, GPTQ), which it does for the joint search.

With ``sampling="hard"`` (the default) the batch splits into ``samples``
groups, each run through its own subnet drawn from the tempered
distribution with straight-through Gumbel-softmax gradients
(:meth:`Supernet.sample`); several draws per step average out more of the
estimator's noise at the same token count. The penalties read the
expectation over that distribution; ``"soft"`` runs the expected network
(soft masks everywhere, optionally Gumbel-perturbed).

Start: given a ``start_from`` spec (``compress`` passes the budget's
mixed-precision baseline, else its most faithful one: a uniform format that
fits, else the importance heuristic, whose blocks follow the importance
order; :func:`.contenders.search_start`), every decision starts
at its choice, ``start_strength`` logits ahead (:meth:`Supernet.init_from_spec`),
so the search refines a model that already fits rather than a random one.
Otherwise every width starts at the pretrained one (``width_prior``,
:meth:`Supernet.init_width_logits`) and every block's keep logit at
``keep_prior`` plus its block's drop cost (:meth:`Supernet.init_keep_logits`).

The softmax temperature anneals geometrically from ``tau_start`` to
``tau_end``. Every ``settle_every`` steps from step ``settle_after`` on,
decisions whose normalized entropy *at temperature 1* is below
``entropy_threshold`` are frozen, and candidates below ``prune_floor`` there
are dropped (:meth:`Supernet.settle`). Judging at the annealed temperature
froze decisions the search never learnt (annealing alone sharpens every
distribution), from the first settles on.
The first ``warmup_steps`` update weights only.

A checkpoint (everything needed to continue bit for bit: supernet,
optimizers, step, generator state, log) is written atomically every
``checkpoint_every`` steps; :func:`run_search` with ``resume=True``
continues from it, so a killed search loses at most that many steps.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from llmshrink import distributed as dist
from llmshrink import serde, storage
from llmshrink.compressor.moves import MoveCheck, MoveState, check_moves, moves_away
from llmshrink.compressor.supernet import Supernet
from llmshrink.compressor.teacher import TeacherTargets
from llmshrink.errors import UsageError
from llmshrink.progress import NULL_PROGRESS, Progress

CHECKPOINT = "search.ckpt"
SAMPLINGS = ("hard", "soft")


@serde.serializable("SearchConfig")
@dataclass(frozen=True)
class SearchConfig:
    """Knobs of :func:`run_search` (defaults sized for a 2-core CPU and a ~135M model)."""

    steps: int = 100
    batch_size: int = 4
    seq_len: int = 128
    # architecture samples per step: the batch splits into this many groups (at most one per row), a subnet each
    samples: int = 4
    # 0: the supernet's weights stay the pretrained ones (see "Weights" in the module docstring)
    weight_lr: float = 0.0
    arch_optimizer: str = "sgd"  # "sgd" (Lagrangian: gradient sizes kept) or "adam"
    arch_lr: float = 0.5
    # each architecture logit's gradient is clipped to ±this: the straight-through estimate of dropping a block
    # is first order, and across a block with massive activations (SmolLM2's blocks 1-2) one sample's estimate
    # sent two keep logits to -100 in a step and the search never recovered (KD 0.4 -> 5)
    arch_grad_clip: float = 1.0
    lambda_lr: float = 0.3  # dual ascent on λ_lat (0: fixed λ)
    width_prior: float = 2.0  # initial logit of a width: width_prior * width / widest (see init_width_logits)
    tau_start: float = 1.0
    tau_end: float = 0.2
    sampling: str = "hard"  # "hard": one sampled subnet per forward (straight-through); "soft": expected network
    gumbel: bool = False  # soft sampling only: perturb the logits with Gumbel noise
    keep_prior: float = 1.5  # initial keep logit (p(keep) = 0.82) before block drop cost; see init_keep_logits
    lambda_latency: float = 4.0
    lambda_params: float = 4.0
    entropy_threshold: float = 0.2
    prune_floor: float = 0.02
    settle_every: int = 5
    settle_after: int = 30  # no decision settles (nor loses a candidate) before this many steps
    # how sure a search's start (a baseline of the budget, :meth:`Supernet.init_from_spec`) is: its logit lead
    start_strength: float = 3.0
    # rows of a fixed architecture batch on which a move away from the start is measured before it settles
    # (:mod:`.moves`); 0 lets decisions settle on the straight-through estimates alone
    verify_rows: int = 8
    warmup_steps: int = 0  # weight-only steps first (only meaningful with weight_lr > 0)
    kd_temperature: float = 1.0
    checkpoint_every: int = 20
    requant_every: int = 10  # steps between refreshes of the cached quantization residuals
    seed: int = 0

    def __post_init__(self) -> None:
        if self.checkpoint_every % self.requant_every:
            # a checkpoint is taken right after a refresh, so a resumed search quantizes like an unbroken one
            raise UsageError(f"checkpoint_every ({self.checkpoint_every}) must be a multiple of requant_every "
                             f"({self.requant_every}).")
        if self.arch_optimizer not in ("sgd", "adam"):
            raise UsageError(f"Unknown arch_optimizer {self.arch_optimizer!r}; choose sgd or adam.")
        if self.sampling not in SAMPLINGS:
            raise UsageError(f"Unknown sampling {self.sampling!r}; choose one of {', '.join(SAMPLINGS)}.")
        if self.samples < 1:
            raise UsageError(f"samples must be at least 1; got {self.samples}.")
        rows = math.ceil(self.batch_size / min(self.samples, self.batch_size))  # torch.chunk's rows per group
        if self.sampling == "hard" and math.ceil(self.batch_size / rows) != min(self.samples, self.batch_size):
            # a step splits its batch into the samples' groups (torch.chunk): 3 samples of a batch of 4 make 2
            raise UsageError(f"A batch of {self.batch_size} rows does not split into {self.samples} samples' groups.",
                             "Use a batch size that is a multiple of the samples (compress --search-samples "
                             "rounds it up).")

    def tau(self, step: int) -> float:
        if self.steps <= 1:
            return self.tau_end
        return self.tau_start * (self.tau_end / self.tau_start) ** (step / (self.steps - 1))


@serde.serializable("StepLog")
@dataclass(frozen=True)
class StepLog:
    """One step: losses, the expectations the penalties read, how settled the search is."""

    step: int
    kd: float
    latency_ms: float
    params: float
    penalty: float
    tau: float
    settled: int
    decisions: int
    seconds: float
    lambda_latency: float = 0.0  # the multiplier this step used


@dataclass
class SearchResult:
    supernet: Supernet
    history: list[StepLog] = field(default_factory=list)
    resumed_from: int | None = None
    moves: list[MoveCheck] = field(default_factory=list)  # moves away from the start, measured (:mod:`.moves`)


class _ForwardKL(torch.autograd.Function):
    """Per-token ``KL(p || softmax(s))`` for logits ``s`` ``[N, V]`` and teacher probabilities ``p`` (no gradient).

    ``Σ p log p − Σ p·s + logsumexp(s)``; the gradient ``softmax(s) − p`` is computed in place in one fused softmax
    and one subtraction (autograd's own graph of the same formula makes three more passes over ``[N, V]``).
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(s, p)
        return neg_entropy - (p * s).sum(-1) + torch.logsumexp(s, -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        s, p = ctx.saved_tensors
        return torch.softmax(s, -1).sub_(p).mul_(grad.unsqueeze(-1)), None, None


def search_config(steps: int | None = None, samples: int | None = None,
                  base: SearchConfig | None = None) -> SearchConfig:
    """``base`` (default: the default :class:`SearchConfig`) with ``compress --steps`` and ``--search-samples``
    applied: the batch grows to the next multiple of the samples (a sample's rows: at least one each)."""
    cfg = base or SearchConfig()
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    if samples is not None:
        cfg = replace(cfg, samples=samples, batch_size=-(-max(cfg.batch_size, samples) // samples) * samples)
    return cfg


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(teacher || student) per token, averaged over tokens and scaled by T² (Hinton et al.).

    ``student`` and ``teacher`` are logits (or log-probabilities) ``[..., V]``; the teacher gets no gradient.
    The same number as ``F.kl_div`` of both log-softmaxes in fewer passes over ``[tokens, V]``: 0.67x its time
    on SmolLM2's 49k vocabulary (``benchmarks/recovery_step.py``; a whole recovery step 0.98x).
    """
    t = temperature
    s = student.float().flatten(0, -2)
    q = teacher.detach().float().flatten(0, -2)
    if t != 1.0:
        s, q = s / t, q / t
    with torch.no_grad():
        p = torch.softmax(q, -1)
        neg_entropy = (p * q).sum(-1) - torch.logsumexp(q, -1)  # Σ p log p
    return _ForwardKL.apply(s, p, neg_entropy).mean() * t * t


def _checkpoint_bytes(net: Supernet, opt_w, opt_a, step: int, gen: torch.Generator, history: list[StepLog],
                      config: SearchConfig, moves: MoveState) -> bytes:
    buf = io.BytesIO()
    # frozen weights are rebuilt from the model: only what the search changes is saved
    weights = net.search_state() if config.weight_lr == 0 else net.state_dict()
    torch.save({"net": weights, "opt_w": opt_w.state_dict(), "opt_a": opt_a.state_dict(), "step": step,
                "gen": gen.get_state(), "history": [asdict(h) for h in history], "config": asdict(config),
                "start": moves.start, "moves": [asdict(m) for m in moves.checks]}, buf)
    return buf.getvalue()


def train_step(net: Supernet, teacher, ids_w: torch.Tensor, ids_a: torch.Tensor, opt_w, opt_a,
               cfg: SearchConfig, *, tau: float, generator: torch.Generator, table, workload, budget_ms: float,
               params_budget: float | None = None, update_arch: bool = True,
               targets: tuple[torch.Tensor, torch.Tensor] | None = None, lambda_latency: float | None = None):
    """One search step: a weight update (KD) on ``ids_w``, then an architecture update (KD + penalties)
    on ``ids_a``. ``targets`` are the teacher's logits (or log-probabilities) for the two batches when
    already known (:class:`~.teacher.TeacherTargets`); otherwise ``teacher`` computes them.
    Returns the architecture half's (kd, E[latency], E[params], penalty) tensors.

    ``net.recompute`` (hard sampling): each sample's backward runs right after its forward, and the blocks
    recompute their activations there: the step holds one sample's graph of one block at a time. The
    same gradients up to float order (which can flip a later hard draw: the search is that sensitive).

    Rows and targets may come from the host; they are moved to the supernet's device here."""
    dev = net.embed.device
    ids_w, ids_a = ids_w.to(dev), ids_a.to(dev)
    if targets is not None:
        targets = tuple(t.to(dev, non_blocking=True) for t in targets)
    if targets is None:
        with torch.no_grad():
            targets = (teacher(input_ids=ids_w, use_cache=False).logits,
                       teacher(input_ids=ids_a, use_cache=False).logits)

    def sampled_kd(ids: torch.Tensor, target: torch.Tensor, lean: bool | None) -> torch.Tensor:
        """Mean KD over ``cfg.samples`` groups of rows, each through its own draw (hard sampling: a subnet
        each; several draws per step average out more of the estimator's noise at the same token count).

        Under torchrun, this rank's share of it (:mod:`llmshrink.distributed`): its groups (soft sampling: its
        rows), weighted by their share of the rows, so that the ranks' gradients sum to the whole step's.
        Every rank draws every group's subnet, so the generators stay in step."""
        if cfg.sampling != "hard":
            mine = torch.tensor(list(dist.share(len(ids))), dtype=torch.long, device=dev)
            probs = net.probs(tau, cfg.gumbel, generator)
            return kd_loss(net(ids[mine], probs), target[mine], cfg.kd_temperature) * len(mine) / len(ids)
        groups = list(zip(ids.chunk(cfg.samples), target.chunk(cfg.samples), strict=True))  # at most a row each
        mine = set(dist.share(len(groups)))
        total = torch.zeros((), device=dev)
        for g, (i, t) in enumerate(groups):
            probs = net.sample(tau, generator)
            if g not in mine:
                continue
            if lean is None:
                total = total + kd_loss(net(i, probs), t, cfg.kd_temperature) * len(i)
                continue
            # lean: this draw's graph is gone before the next draw's forward (gradients accumulate)
            with torch.set_grad_enabled(lean):
                share = kd_loss(net(i, probs), t, cfg.kd_temperature) * (len(i) / len(ids))
            if lean:
                share.backward()
            total = total + share.detach()
            del share
        return total if lean is not None else total / len(ids)

    # lean (recompute): each sample's backward runs right after its forward instead of one backward of the
    # summed loss, so a step holds one sample's graph, not all of them (True: backward; False: no update)
    lean = True if net.recompute and cfg.sampling == "hard" else None
    if cfg.weight_lr > 0:
        opt_w.zero_grad(set_to_none=True)
        opt_a.zero_grad(set_to_none=True)
        loss_w = sampled_kd(ids_w, targets[0], lean)
        if lean is None:
            loss_w.backward()
        dist.all_reduce_grads(net.weight_parameters())
        opt_w.step()
    if lean is not None:
        opt_w.zero_grad(set_to_none=True)
        opt_a.zero_grad(set_to_none=True)
        lean = update_arch
    kd = sampled_kd(ids_a, targets[1], lean)
    # the penalties read the expectation over the distribution the samples come from
    pr = net.probs(tau)
    lat = net.expected_latency(table, workload, pr)
    params = net.expected_params(pr)
    lam = cfg.lambda_latency if lambda_latency is None else lambda_latency
    penalty = lam * torch.relu(lat / budget_ms - 1)
    if params_budget:
        penalty = penalty + cfg.lambda_params * torch.relu(params / params_budget - 1)
    if update_arch:
        # every rank computes the same penalty: each adds its 1/N, the all-reduce sums them back to one
        if lean is None:
            opt_w.zero_grad(set_to_none=True)
            opt_a.zero_grad(set_to_none=True)
            (kd + penalty.float() / dist.world_size()).backward()
        elif penalty.requires_grad:  # the KD's gradients are in already
            (penalty.float() / dist.world_size()).backward()
        dist.all_reduce_grads(net.arch_parameters())
        if cfg.arch_grad_clip:
            torch.nn.utils.clip_grad_value_(net.arch_parameters(), cfg.arch_grad_clip)
        opt_a.step()
    return dist.all_reduce_sum(kd), lat, params, penalty


def _next_lambda(cfg: SearchConfig, lam: float, step: int, latency_ms: float, budget_ms: float) -> float:
    """Dual ascent on the latency multiplier after ``step``: up while over budget, down while under."""
    if step < cfg.warmup_steps or not cfg.lambda_lr:
        return lam
    return min(max(lam * math.exp(cfg.lambda_lr * (latency_ms / budget_ms - 1)), 1e-3), 1e4)


def optimizers(net: Supernet, cfg: SearchConfig) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Separate optimizers: Adam for weights, ``cfg.arch_optimizer`` for architecture logits (see module
    docstring for why SGD)."""
    arch = (torch.optim.SGD(net.arch_parameters(), lr=cfg.arch_lr, momentum=0.9, foreach=True)
            if cfg.arch_optimizer == "sgd" else torch.optim.Adam(net.arch_parameters(), lr=cfg.arch_lr, foreach=True))
    return torch.optim.Adam(net.weight_parameters(), lr=cfg.weight_lr, foreach=True), arch


def run_search(net: Supernet, teacher, calib: torch.Tensor, *, table, workload, budget_ms: float,
               params_budget: float | None = None, config: SearchConfig = SearchConfig(),
               checkpoint_dir: str | Path | None = None, resume: bool = False, stop_after: int | None = None,
               targets: TeacherTargets | None = None, start_from=None, shard: bool = False,
               recompute: bool = False, progress: Progress = NULL_PROGRESS) -> SearchResult:
    """Search ``net`` (modified in place) against ``teacher`` (the original HF model) on ``calib`` ``[N, T]``.

    ``start_from``: a SubnetSpec a fresh search starts from (:meth:`Supernet.init_from_spec`, lead
    ``config.start_strength``), e.g. the best baseline of the budget; None starts from the pretrained widths
    and block drop costs (:meth:`Supernet.init_width_logits`, :meth:`Supernet.init_keep_logits`).

    ``targets``: the teacher's log-probabilities on ``calib[:, :seq_len]`` when the caller has them
    (several budgets and recovery share them); computed here otherwise.

    ``stop_after`` ends the search after that many steps (with a checkpoint):
    several budgets share one weight warm-up this way, each resuming from it.

    ``shard``: under torchrun, shard the supernet's weights over the ranks with FSDP (:meth:`Supernet.freeze_weights`)
    instead of holding them whole on each; the same steps either way (all-gathers are exact).

    ``recompute``: trade compute for memory (:func:`train_step`): a step's peak holds one sample's graph, and
    of it one block's effective weights and activations, plus every block's input. About one more forward a
    step; hard sampling only (soft sampling runs one forward a step: nothing to split). Neither ``shard`` nor
    ``recompute`` is a search setting here: a checkpoint resumes under either (``compress --resume`` still asks
    for the same command).

    Raises:
        UsageError: too few calibration sequences for two halves of one batch, ``resume`` without a
            checkpoint made with the same config, or ``shard`` with trained weights, one process, or
            samples the ranks cannot share evenly.
    """
    cfg = config
    if shard and cfg.weight_lr:
        raise UsageError("Only a search with frozen weights (weight_lr 0) is sharded: trained weights would need "
                         "their gradients reduce-scattered and their residuals remade on the shards.",
                         "Use weight_lr 0, or leave out sharding (data parallel).")
    if shard and cfg.sampling == "hard" and cfg.samples % dist.world_size():
        raise UsageError(f"A sharded search gives every rank the same number of the step's {cfg.samples} "
                         f"architecture samples; {dist.world_size()} processes cannot share them evenly.",
                         "Use a number of processes that divides the search's samples.")
    if dist.world_size() > min(cfg.samples, cfg.batch_size):
        raise UsageError(f"{dist.world_size()} processes share a search step of {min(cfg.samples, cfg.batch_size)} "
                         "architecture samples: some would have nothing to do.",
                         "Use at most that many processes, or raise the search's samples (compress "
                         "--search-samples N).")
    if calib.shape[0] < 2 * cfg.batch_size:
        raise UsageError(f"The search needs at least {2 * cfg.batch_size} calibration sequences "
                         f"(two halves of batch {cfg.batch_size}); got {calib.shape[0]}.")
    calib = calib[:, : cfg.seq_len]
    targets = TeacherTargets.reuse(targets, teacher, calib, batch_size=cfg.batch_size, progress=progress)
    halves = calib[0::2], calib[1::2]  # weights / architecture, disjoint
    half_targets = targets.take(slice(0, None, 2)), targets.take(slice(1, None, 2))
    if cfg.weight_lr == 0:  # the pretrained weights, fixed: no gradient is kept for them
        net.freeze_weights(shard=shard)
    net.recompute = recompute and cfg.sampling == "hard"
    opt_w, opt_a = optimizers(net, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[StepLog] = []
    start, resumed = 0, None
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise UsageError(f"Nothing to resume: no {CHECKPOINT} in {checkpoint_dir}.",
                             "Run without --resume to start the search.")
        state = torch.load(ckpt, weights_only=True, map_location="cpu")  # the generator's state is a CPU tensor
        if state["config"] != asdict(cfg):
            raise UsageError("The checkpoint was made with other search settings; --resume needs the same ones.")
        net.load_search_state(state["net"])
        opt_w.load_state_dict(state["opt_w"])
        opt_a.load_state_dict(state["opt_a"])
        gen.set_state(state["gen"])
        history = [StepLog(**h) for h in state["history"]]
        start = resumed = state["step"]
        moves = MoveState(state["start"], [MoveCheck(**m) for m in state["moves"]])
    else:
        if start_from is not None:
            net.init_from_spec(start_from, cfg.start_strength)
        else:
            net.init_width_logits(cfg.width_prior)
            if net.space.depth_search:
                net.init_keep_logits(cfg.keep_prior)
        moves = MoveState(net.choice_indices(), [])
    verify = (halves[1][:cfg.verify_rows].to(net.embed.device),
              half_targets[1][slice(0, cfg.verify_rows)].to(net.embed.device)) if cfg.verify_rows else None

    def check(step: int, rows) -> None:
        """Measure the moves among ``rows`` (:mod:`.moves`) at the search's current price of a millisecond."""
        if verify is not None:
            check_moves(net, moves, moves_away(net, moves, rows), *verify, table=table, workload=workload,
                        price_per_ms=lam / budget_ms, step=step, lead=cfg.start_strength,
                        loss=lambda s, t: kd_loss(s, t, cfg.kd_temperature))
    lam = cfg.lambda_latency
    if history and history[-1].lambda_latency:  # resumed: the multiplier after the last logged step
        lam = _next_lambda(cfg, history[-1].lambda_latency, start - 1, history[-1].latency_ms, budget_ms)
    net.refresh_quant()
    stop = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    with progress.task("Search" if stop == cfg.steps else "Search warm-up (shared by the budgets)",
                       total=stop) as task:
        task.advance(start)
        for step in range(start, stop):
            t0 = time.perf_counter()
            tau = cfg.tau(step)
            rows = [torch.randint(len(h), (cfg.batch_size,), generator=gen, device="cpu") for h in halves]
            kd, lat, params, penalty = train_step(
                net, teacher, halves[0][rows[0]], halves[1][rows[1]], opt_w, opt_a, cfg, tau=tau, generator=gen,
                table=table, workload=workload, budget_ms=budget_ms, params_budget=params_budget,
                update_arch=step >= cfg.warmup_steps, targets=(half_targets[0][rows[0]], half_targets[1][rows[1]]),
                lambda_latency=lam)
            used, lam = lam, _next_lambda(cfg, lam, step, lat.item(), budget_ms)
            if (step + 1) % cfg.requant_every == 0:
                net.refresh_quant()
            if (step + 1) % cfg.settle_every == 0 and step + 1 >= max(cfg.settle_after, cfg.warmup_steps):
                # judged at temperature 1, not the annealed one: annealing sharpens every distribution
                # alike, and a decision frozen because of it was never learnt (see module docstring);
                # a decision about to settle away from its start is measured first, and undone if it costs
                # more than it saves (:mod:`.moves`)
                check(step + 1, net.settling(cfg.entropy_threshold, 1.0))
                net.settle(cfg.entropy_threshold, cfg.prune_floor, 1.0, protect=moves.start)
            n_settled, n_total = net.settled()
            log = StepLog(step + 1, kd.item(), lat.item(), params.item(), penalty.item(), tau, n_settled, n_total,
                          time.perf_counter() - t0, used)
            history.append(log)
            task.advance(1, info=f"kd {log.kd:.3f} · E[lat] {log.latency_ms:.2f}/{budget_ms:.2f} ms · "
                                 f"settled {n_settled}/{n_total}")
            if step + 1 == cfg.steps:  # what is still away from its start and unmeasured is measured now
                check(step + 1, None)
            if ckpt is not None and dist.is_main() and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == stop):
                storage.atomic_write_bytes(ckpt, _checkpoint_bytes(net, opt_w, opt_a, step + 1, gen, history, cfg,
                                                                   moves))
    return SearchResult(net, history, resumed, list(moves.checks))

