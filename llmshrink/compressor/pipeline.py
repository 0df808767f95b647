"""``compress``: importance → joint search → extraction and fit → screening against baselines → recovery →
export → measurement → report.

One run directory holds everything (see :mod:`llmshrink.rundir`)::

    RUN_DIR/compress.json           the request (CompressConfig) and each phase's outcome
    RUN_DIR/importance.npz          importance scores (reused by --resume and every budget)
    RUN_DIR/search-quant/<format>/  the unpruned model in each search format, by the run's quantizer: what the
                                    joint search fake-quantizes with (``Supernet.use_quantized``)
    RUN_DIR/search-<budget>/        search checkpoint, extracted and fitted spec, contenders/<name>/quantized
                                    (as screened), the winner's requantized/ and recovered/ model per budget
    RUN_DIR/candidates/<budget>/    the bundle for each budget (the contender that won its screening, recovered)
    RUN_DIR/candidates/<budget>-<contender>/  each other contender of the budget, as screened (no recovery); the
                                    winner's is only made to time it for the latency guard, then removed
    RUN_DIR/reference/<format>/     the original (fp32) and uniform int4, unpruned: what every report compares with
    RUN_DIR/run.json, report.md, pareto.png

Extraction (joint): the most probable subnet, brought under the budget by
the cheapest steps down if it lands above (``fit_to_budget``), then given
back what it leaves of the budget by the steps up the search's logits mind
least (``grow_to_budget``): searches overshoot, and unspent milliseconds are
quality thrown away.

Screening (:mod:`.contenders`): the searched subnet competes with the models the budget admits without
a search (uniform formats that fit, the importance heuristic), all quantized alike and scored on rows no
phase before read; the lowest KL from the original is recovered and ships, and the run says whether the
search won (``screen_verdict``). Screening quantizes on the search's rows (``n_calib``), so a uniform
contender in a search format is the search's own quantized model; the winner alone is quantized again on the
quantizer's rows (``n_quant``) before recovery. GPTQ's cost grows with its rows (375 s for the unpruned
SmolLM2-135M on 512 rows, ~130 s on 128, 2 Zen 4 cores), and a budget screens three to four contenders.

Latency guard (relative budgets measured here, :func:`_latency_guard`): the ranking is walked best first, each
contender's screened bundle timed in turn with the reference, until one measures within the budget's ratio plus
``latency_slack_pct``; that one ships. A refusal reprices the table for the rest of the run
(:func:`.contenders.reprice`) and the mixed-precision contender is made again on it (:func:`_repriced_mixed`).
A pick that measures well under the budget is grown into the time it left (:func:`_grown_into_slack`), screened
and timed like the rest.

A loose budget — one the unpruned model meets with every linear in the
space's most faithful search format (``budget.unpruned_fit``) — skips the
search: the unpruned model in the most faithful format that fits ships, the
original as is, a quantized one after the same recovery (``_ship_unpruned``).

Budgets are checked against the fastest subnet the space reaches before any
weights load (exit 3). A killed run continues with ``resume=True``: finished
phases are read back from their files, an interrupted search continues from
its last checkpoint. Where the target's hardware is absent (a GPU target on
this CPU machine), bundles carry the target's flavour and predicted latency,
and their manifests say the engine must be built on the device.

Under ``torchrun`` every rank runs this same program (:mod:`llmshrink.distributed`): the search and
recovery share their steps' samples and rows; every write to the run directory, export, measurement and
held-out score runs on rank 0 alone through ``dist.main_only`` (the others wait and receive its result), so
each rank takes the same branches. Values a ``main_only`` block reads lazily (the calibration text) are made
before it, on every rank: a collective reached on one rank only would hang the others.

``strategy="sequential"`` is the baseline the joint search is measured
against, through the same machinery, data, steps and budget: the
architecture is searched at full precision, its latency priced as if every
linear ran in the fastest candidate format (what it will be quantized to);
then a precision per linear is assigned by sensitivity
(:mod:`.sensitivity`) under the same table and budget; recovery is the same.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path

import numpy as np

from llmshrink import distributed as dist
from llmshrink import serde, storage
from llmshrink.compressor.calibration_text import calibration_splits
from llmshrink.compressor.config import CompressConfig
from llmshrink.compressor.contenders import SEARCH, Contender, ContenderOutcome
from llmshrink.compressor.plan import SearchMode
from llmshrink.errors import UsageError, ValidationFailedError
from llmshrink.progress import NULL_PROGRESS, Progress
from llmshrink.targets.workload import Workload

log = logging.getLogger("llmshrink")

RECORD = "compress.json"
RECOVERY_RECORD = "recovery.json"  # [KD before, KD after] beside the recovered model
SAME_AS = ": the same model as the "  # how a searched subnet that is a baseline says so (its ``why``)
MOVES = "moves.json"  # the search's moves away from its start, each measured (llmshrink.compressor.moves)
MEASURABLE_RUNTIMES = ("onnxruntime-cpu",)  # what this process can time on the machine it runs on


@serde.serializable("CandidateOutcome")
@dataclass(frozen=True)
class CandidateOutcome:
    """One budget's result."""

    label: str
    budget_ms: float
    bundle: str  # relative to the run directory
    spec_fingerprint: str
    predicted_ms: float
    expected_ms_at_end: float  # the search's E[latency] at its last step
    fit_moves: tuple[str, ...]
    kd_before_recovery: float | None
    kd_after_recovery: float | None
    measured_ms: float | None = None  # floor (see exporters.timing); None where the hardware is absent
    validation_passed: bool | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # why this candidate, when it was chosen without a search (a loose budget, a --spec)
    recovery_tokens: int | None = None  # training tokens recovery saw
    # every model this budget could ship (the searched subnet, the baselines), screened alike; the winner shipped
    contenders: tuple[ContenderOutcome, ...] = ()


@serde.serializable("CompressRecord")
@dataclass(frozen=True)
class CompressRecord:
    config: CompressConfig
    fastest_ms: float
    candidates: tuple[CandidateOutcome, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass
class CompressResult:
    run_dir: Path
    record: CompressRecord
    report: Path | None = None


def budget_label(ms: float) -> str:
    return f"{ms:g}ms"


def _check_out(out: Path, config: CompressConfig, resume: bool) -> CompressRecord | None:
    rec_path = out / RECORD
    if resume:
        if not rec_path.is_file():
            raise UsageError(f"Nothing to resume in {out} (no {RECORD}).", "Run without --resume to start.")
        rec = serde.loads(rec_path.read_text(), expect=CompressRecord)
        if rec.config != config:
            raise UsageError(f"{out} holds a run with other settings; --resume needs the same command.",
                             f"Its settings are in {rec_path}.")
        return rec
    if out.exists() and not out.is_dir():
        raise UsageError(f"The run directory {out} is a file.", "Give --out a directory path (new or empty).")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} already exists and is not empty.",
                         "Pass --resume to continue the run in it, or choose another --out.")
    dist.main_only(lambda: _probe_writable(out))
    return None


def _probe_writable(out: Path) -> None:
    try:  # before any weights load: a run that cannot be written must not start
        out.mkdir(parents=True, exist_ok=True)
        storage.atomic_write_text(out / ".writable", "")
        (out / ".writable").unlink()
    except OSError as e:
        raise UsageError(f"Cannot write the run directory {out}: {e.strerror or e}.",
                         "Choose a --out where you can create files (and with free space).") from None


def _save(out: Path, rec: CompressRecord) -> None:
    dist.main_only(lambda: storage.atomic_write_text(out / RECORD, serde.dumps(rec)))


BLOCK_MEASURE = "drop-kl"  # what importance.npz's "blocks" holds (see llmshrink.compressor.importance)


def _importance(hf, calib, out: Path, progress: Progress):
    from llmshrink.compressor.importance import Importance, measure_importance
    from llmshrink.spec import BaseShape

    path = out / "importance.npz"
    base = BaseShape.from_config(hf.config)
    if path.is_file():
        z = np.load(path)
        # a file without the marker holds ShortGPT's block influence (runs before block drop costs): re-measured
        if str(z.get("block_measure", "")) == BLOCK_MEASURE:
            return Importance(base, **{k: z[k] for k in ("heads", "v_dims", "rope_pairs", "mlp", "hidden", "blocks")},
                              tokens=int(z["tokens"]))
    batches = [calib[i:i + 4] for i in range(0, len(calib), 4)]
    imp = measure_importance(hf, batches, progress=progress, total=len(batches))
    tmp = out / "importance.tmp.npz"
    np.savez(tmp, heads=imp.heads, v_dims=imp.v_dims, rope_pairs=imp.rope_pairs, mlp=imp.mlp, hidden=imp.hidden,
             blocks=imp.blocks, tokens=imp.tokens, block_measure=BLOCK_MEASURE)
    tmp.replace(path)
    return imp


def _warm_start(net, hf, calib, out: Path, config: CompressConfig, table, workload, budget: float, targets,
                progress: Progress, recompute: bool = False) -> None:
    """The weight warm-up (no architecture updates, so no budget involved) all budgets start from: run once."""
    from llmshrink.compressor.search import CHECKPOINT, run_search

    warm = out / "warmup"
    if not (warm / CHECKPOINT).is_file():
        run_search(net, hf, calib, table=table, workload=workload, budget_ms=budget, params_budget=config.params_budget,
                   config=config.search, checkpoint_dir=warm, stop_after=config.search.warmup_steps, targets=targets,
                   recompute=recompute, progress=progress)


def held_out_key(calib_data: str, ids) -> str:
    """The manifest quality key of :func:`_record_held_out_ppl` (a ``ppl:`` key the report reads)."""
    name = "self-generated" if calib_data == "self" else Path(calib_data).name.replace(":", "_")
    return f"ppl:held-out {name} text:seqs{ids.shape[0]}x{ids.shape[1]}:tokens{ids.shape[0] * (ids.shape[1] - 1)}"


def _record_held_out_ppl(bundle: Path, ids, calib_data: str, progress: Progress) -> float:
    """Perplexity of the bundle (ONNX Runtime, as shipped) on the held-out sequences ``ids`` ``[N, T]``
    (never seen by the search or recovery), each scored on its own; written into the manifest's quality."""
    from llmshrink.evaluation import load_scorer
    from llmshrink.exporters.bundle import load_manifest, update_manifest

    scorer = load_scorer(str(bundle))
    nll, n = 0.0, 0
    with progress.task("Held-out perplexity", total=len(ids)) as task:
        for row in ids.numpy():
            lp = scorer.logprobs(row)
            nll -= float(lp[np.arange(len(row) - 1), row[1:]].sum())
            n += len(row) - 1
            task.advance(1)
    ppl = float(np.exp(nll / n))
    quality = dict(load_manifest(bundle).quality)
    quality[held_out_key(calib_data, ids)] = ppl
    update_manifest(bundle, quality=quality)
    return ppl


def device_note(target: str, table_kind: str, workload: Workload) -> str:
    """What a bundle built for absent hardware says: its latency is the table's, and how to measure it."""
    return (f"latency {table_kind}, not measured: {target} hardware is not present here, so latencies are predicted "
            f"from its {table_kind} table. On the device, with the bundle directory BUNDLE: `{device_commands('BUNDLE', workload)}` "
            "builds and times the TensorRT engine, then checks it against the prediction.")


def device_commands(bundle: str | Path, workload: Workload) -> str:
    """The commands that build, time and validate ``bundle``'s engine on its device."""
    batch = f" --max-batch {workload.batch}" if workload.batch > 1 else ""
    return f"llmshrink build {bundle}{batch} --workload {workload} && llmshrink validate {bundle}"


def _shortcuts(config: CompressConfig, space, target, workload, table) -> dict[float, object]:
    """Per loose budget, the unpruned model to ship without a search (see ``budget.unpruned_fit``)."""
    from llmshrink.compressor.budget import unpruned_fit

    fits = {b: unpruned_fit(space, target, workload, table, b, params_budget=config.params_budget,
                            formats=_shippable_formats(config, space, target), accepts=_buildable(target))
            for b in config.budgets_ms}
    return {b: f for b, f in fits.items() if f is not None}


def _shippable_formats(config: CompressConfig, space, target) -> tuple[str, ...]:
    """The formats a run may ship without a search: a --space file that names formats limits them; else any
    of the target's kernels."""
    return tuple(dict.fromkeys(space.formats + space.lm_head_formats)) if config.space else tuple(target.formats)


def _buildable(target):
    """Whether the target's export flavour builds a spec (its kernels and patterns)."""
    from llmshrink.exporters.export import FLAVOURS

    flavour = FLAVOURS.get(target.flavour)()

    def buildable(spec) -> bool:
        try:
            flavour.check_spec(spec)
        except UsageError:
            return False
        return True

    return buildable


class _Inputs:
    """What the phases read, loaded once and only when a phase first asks: a loose budget's run
    (:func:`_shortcuts`) needs the model, never the calibration text, importance or teacher."""

    def __init__(self, config: CompressConfig, source, out: Path, progress: Progress) -> None:
        self.config, self.source, self.out, self.progress = config, source, out, progress
        self.targets = None  # the teacher's log-probabilities on calib, set when a search or recovery runs
        self.sensitivity = None  # per-linear quantization sensitivity, measured when a budget builds its contenders

    def teacher_targets(self, secs: dict[str, float]):
        """The teacher's log-probabilities on the calibration rows, computed once (its seconds go to ``secs``)
        and shared by every search and recovery of the run."""
        if self.targets is None:
            from llmshrink.compressor.teacher import TeacherTargets

            t0 = time.perf_counter()
            search = self.config.search
            self.targets = TeacherTargets(self.hf, self.search_calib[:, :search.seq_len],
                                          batch_size=search.batch_size, progress=self.progress)
            secs["teacher"] = time.perf_counter() - t0
        return self.targets

    @cached_property
    def hf(self):
        """The original model on the run's device (:func:`llmshrink.device.place_model`): the teacher, and what
        every phase slices its weights from."""
        from llmshrink.device import place_model, resolve_device
        from llmshrink.models import load_model

        return place_model(load_model(self.source, progress=self.progress).eval(), resolve_device(self.config.device))

    @cached_property
    def tok(self):
        from llmshrink.models import load_tokenizer

        return load_tokenizer(self.source, progress=self.progress)

    @cached_property
    def fingerprint(self) -> str:
        from llmshrink.models.load import fingerprint

        return fingerprint(self.source)

    @cached_property
    def splits(self):
        with self.progress.task("Calibration text"):
            return calibration_splits(self.config, self.hf, self.tok, self.fingerprint, self.progress)

    @property
    def search_calib(self):
        """The rows the search and importance calibrate on (recovery trains on all of ``splits.calib``)."""
        return self.splits.calib[:self.config.n_calib]

    @property
    def quant_calib(self):
        """The rows the quantizer calibrates on: those ``export`` of the same spec uses."""
        return self.splits.calib[:self.config.n_quant]

    @property
    def screen_rows(self):
        """The rows the contenders of a budget are scored on: after the quantizer's, read by nothing before."""
        n = self.config.n_quant
        return self.splits.calib[n:n + self.config.n_screen]

    @cached_property
    def importance(self):
        calib = self.search_calib  # every rank makes the calibration text here, outside main_only
        return dist.main_only(lambda: _importance(self.hf, calib, self.out, self.progress))


def compress(config: CompressConfig, out: str | Path, *, resume: bool = False,
             progress: Progress = NULL_PROGRESS, notes: tuple[str, ...] = ()) -> CompressResult:
    """Run the whole pipeline for every budget (see module docstring).

    ``notes`` (e.g. how a relative budget resolved) go into the run record and report. A loose budget
    (``budget.unpruned_fit``) ships the unpruned model in the most faithful format that fits, without
    a search; its outcome's ``reason`` says why.

    Raises:
        InfeasibleBudgetError: a budget is below the fastest subnet of the space (before any weights load).
        UsageError: bad input, or ``out`` holds another run (or nothing to resume).
    """
    from llmshrink.compressor.budget import check_budget
    from llmshrink.compressor.plan import check_fits, search_mode_here
    from llmshrink.compressor.space import default_space, load_space
    from llmshrink.device import resolve_device
    from llmshrink.evaluation.report import write_report
    from llmshrink.models import load_config, resolve_model
    from llmshrink.rundir import RunEntry, RunRecord, write_record
    from llmshrink.spec import BaseShape
    from llmshrink.targets.predict import table_for
    from llmshrink.targets.profile import load_target
    from llmshrink.targets.table import host_mismatch

    out = Path(out)
    if (not config.budgets_ms and not config.spec) or any(b <= 0 for b in config.budgets_ms):
        raise UsageError("Give at least one positive latency budget (e.g. --latency 30ms), or a plan (--spec).")
    target = load_target(config.target)
    table = table_for(target)
    workload = config.workload or target.default_workload
    source = resolve_model(config.model)
    hf_config = load_config(source, progress=progress)
    base = BaseShape.from_config(hf_config)
    fmts = target.search_formats or target.formats
    space = (load_space(config.space, base, target.formats, search_formats=fmts) if config.space
             else default_space(base, target.formats, search_formats=fmts))
    if config.spec:
        plan, fastest = _load_plan(config, base, target, workload, table)
        shortcuts = {}
    else:
        plan = None
        fastest = min(check_budget(space, target, workload, table, b) for b in config.budgets_ms)
        shortcuts = _shortcuts(config, space, target, workload, table)
    # before any weights load; under torchrun rank 0 judges (free memory read at one moment decides for all)
    dev = resolve_device(config.device)
    dist.main_only(lambda: check_fits(config, hf_config, dev, space, dist.world_size()))
    mode = dist.main_only(lambda: search_mode_here(config, hf_config, dev, space, dist.world_size()))
    if config.calib_data != "self":
        from llmshrink.models.data import parse_data_spec

        data = parse_data_spec(config.calib_data)  # a missing or unreadable file fails before the run starts
        if data.kind == "builtin":  # as does a corpus the package index cannot serve (fetched once, then cached)
            from llmshrink.models.corpora import BUILTIN_CORPORA, ensure_corpus

            dist.main_only(lambda: ensure_corpus(BUILTIN_CORPORA.get(data.ref), progress=progress))
    previous = _check_out(out, config, resume)  # and makes ``out``, checked writable
    measurable = target.runtime in MEASURABLE_RUNTIMES
    notes += () if measurable else (device_note(target.name, table.kind, workload),)
    if measurable and (why := host_mismatch(table)):
        notes += (why,)  # bundles will likely miss their budgets here; say so where the results are read
    if mode.sharded:
        notes += (f"search: the supernet's weights sharded over {dist.world_size()} processes with FSDP "
                  f"(--shard {config.shard})",)
    if mode.recompute:
        notes += (f"search: blocks recomputed in per-sample backwards to fit (--recompute {config.recompute})",)
    rec = previous or CompressRecord(config, fastest, notes=notes)
    _save(out, rec)

    inputs = _Inputs(config, source, out, progress)
    ctx = _Context(config, out, target, table, workload, space, base, source, measurable, notes, inputs, mode)
    done = {c.label: c for c in rec.candidates}
    outcomes = []
    for budget in sorted(config.budgets_ms) if plan is None else [min(config.budgets_ms, default=fastest)]:
        label = budget_label(budget) if plan is None else "spec"
        if label in done and (out / done[label].bundle / "manifest.json").is_file():
            outcomes.append(done[label])
            continue
        if plan is not None:
            outcome = _ship_plan(ctx, plan, fastest, budget)
        elif budget in shortcuts:
            outcome = _ship_unpruned(ctx, budget, shortcuts[budget])
        else:
            outcome = _search_and_ship(ctx, budget, searched=len(set(config.budgets_ms) - set(shortcuts)))
        outcomes.append(outcome)
        rec = replace(rec, candidates=tuple([c for c in rec.candidates if c.label != label] + [outcome]))
        _save(out, rec)
    best = max(outcomes, key=lambda c: c.budget_ms)
    entries = [RunEntry(c.bundle, "selected" if c is best else "candidate", c.label) for c in outcomes]
    entries += [RunEntry(k.bundle, "candidate" if k.name == SEARCH else "baseline", f"{c.label} {k.name}")
                for c in outcomes for k in c.contenders if not k.shipped and k.bundle]
    # The original and uniform int4 beside every screened budget; and beside a budget validated relative to the
    # uniform export (which is built for that anyway), so a loose budget's report says what it is measured against.
    references = any(c.contenders for c in outcomes) or config.reference
    if references:  # every rank makes the calibration text it needs outside main_only (see distributed.main_only)
        inputs.splits  # noqa: B018
    verdicts = tuple(screen_verdict(c) for c in outcomes if c.contenders)

    def finish() -> Path:
        run_entries = entries + (_reference_points(ctx) if references else [])
        write_record(out, RunRecord(tuple(run_entries), model=source.describe(), target=target.name,
                                    strategy=config.strategy,
                                    budgets_ms=tuple(sorted(config.budgets_ms or (fastest,))),
                                    created=time.strftime("%Y-%m-%dT%H:%M:%S"), notes=rec.notes + verdicts))
        return write_report(out)[1]

    md = dist.main_only(finish)
    return CompressResult(out, rec, md)


def screen_verdict(c: CandidateOutcome) -> str:
    """One sentence on a budget's screening: which contender won, against what (the report's notes)."""
    ranked = sorted(c.contenders, key=lambda k: k.screen_kd)
    won = next(k for k in c.contenders if k.shipped)
    others = ", ".join(f"{k.name} {k.screen_kd:.4f}" for k in ranked if not k.shipped)
    head = ("the search won" if won.name == SEARCH else "the search won, grown into the time it left"
            if won.name in (SEARCH + GROWN, SEARCH + REAIMED) else f"the search did not win, {won.name} did")
    if won.name == SEARCH and SAME_AS in won.why:  # it came back to a baseline: the win is that baseline's
        head += f", with the same model as the {won.why.split(SAME_AS, 1)[1]}"
    over = "".join(f"; {k.name} did not ship: {k.over_latency}" for k in ranked if k.over_latency)
    return (f"{c.label}: {head} (KL from the original after the quantizer, before recovery: {won.name} "
            f"{won.screen_kd:.4f}; {others}){over}; {won.name} ships, recovered, the others as screened")


def _reference_points(ctx: _Context) -> list:
    """The original and the uniform int4 model (the run's reference format, else the target's w4g32a8 or
    w4g32), unpruned and without recovery, exported and scored like the contenders: the points every report
    compares with. Made once per run, under ``reference/``."""
    from llmshrink.rundir import RunEntry
    from llmshrink.spec import SubnetSpec

    fmts = [f for f in (ctx.config.reference, "w4g32a8", "w4g32") if f and f in ctx.target.formats]
    entries = [RunEntry(str(_reference_point(ctx, SubnetSpec.original(ctx.base))), "original", "original")]
    if fmts:
        entries.append(RunEntry(str(_reference_point(ctx, SubnetSpec.uniform(ctx.base, fmts[0]))), "baseline",
                                f"uniform {fmts[0]} (unpruned, {ctx.config.quantizer}, no recovery)"))
    return entries


def _reference_point(ctx: _Context, spec) -> Path:
    """``reference/<format>``: ``spec`` (unpruned, uniform) exported with the run's quantizer on its rows (n_quant;
    n_calib when the search or a screening already quantized it there), measured (absolute) where the target is
    here, and scored on the held-out rows."""
    from llmshrink.compressor.materialize import materialize
    from llmshrink.compressor.model import CompressedModel

    inputs = ctx.inputs
    bundle = Path("reference") / spec.lm_head
    if not (ctx.out / bundle / "manifest.json").is_file():
        if (ctx.out / bundle).exists():
            shutil.rmtree(ctx.out / bundle)  # an export killed half-way; it is remade whole
        spec = replace(spec, model=ctx.source.describe())
        # a budget's winner quantized on the quantizer's rows, else the search's or a screened model (the search's
        # rows, n_calib): this very model is not quantized again
        made = [*ctx.out.glob("search-*/requantized"), *ctx.out.glob("search-*/contenders/*/requantized"),
                *ctx.out.glob("search-quant/*"), *ctx.out.glob("search-*/contenders/*/quantized")]
        screened = [d for d in made
                    if (d / "spec.json").is_file() and _fingerprint(d / "spec.json") == spec.fingerprint()]
        if screened:
            cm = CompressedModel.load(screened[0])
        else:
            with inputs.progress.task(f"Reference point: uniform {spec.lm_head}"):
                cm = materialize(inputs.hf, spec, inputs.tok, calib=inputs.quant_calib,
                                 quantizer=ctx.config.quantizer, progress=inputs.progress)
        _export_and_check(replace(ctx, config=replace(ctx.config, reference=None)), cm, spec.lm_head, {}, bundle)
        _record_held_out_ppl(ctx.out / bundle, inputs.splits.eval, ctx.config.calib_data, inputs.progress)
    return bundle


def _fingerprint(spec_json: Path) -> str:
    from llmshrink.spec import SubnetSpec

    return SubnetSpec.from_json(spec_json.read_text()).fingerprint()


@dataclass
class _Context:
    """What every budget's phases share within one run."""

    config: CompressConfig
    out: Path
    target: object
    table: object
    workload: Workload
    space: object
    base: object
    source: object
    measurable: bool
    notes: tuple[str, ...]
    inputs: _Inputs
    search_mode: SearchMode = SearchMode()  # how the search holds its supernet (plan.search_mode_here)


def _export_and_check(ctx: _Context, cm, label: str, secs: dict[str, float], bundle: Path | None = None):
    """Export ``cm`` as the bundle of ``label`` (at ``bundle``, default ``candidates/<label>``), then measure
    it where the target is this machine.

    Returns (bundle path relative to the run, manifest, measured ms or None, validation verdict or None).
    """
    from llmshrink.exporters.export import export_compressed
    from llmshrink.exporters.measure import validate
    from llmshrink.spec import SubnetSpec

    config, out, inputs = ctx.config, ctx.out, ctx.inputs
    t0 = time.perf_counter()
    bundle = bundle or Path("candidates") / label
    m = export_compressed(cm, inputs.tok, out / bundle, flavour=ctx.target.flavour, target=ctx.target,
                          workload=ctx.workload, model_source=ctx.source.describe(),
                          model_fingerprint=inputs.fingerprint, max_length=config.max_length, notes=ctx.notes,
                          quantizer=config.quantizer, progress=inputs.progress)
    secs["export"] = time.perf_counter() - t0
    measured = passed = None
    if ctx.measurable:
        t0 = time.perf_counter()
        try:
            ref = (out / _reference_point(ctx, SubnetSpec.uniform(ctx.base, config.reference))
                   if config.reference else None)
            v = validate(out / bundle, tolerance_pct=config.tolerance_pct, reference=ref,
                         target=config.target if ref else None, progress=inputs.progress)
            measured, passed = v.measured_ms, v.passed
        except ValidationFailedError as e:  # recorded in the manifest and the outcome; the run goes on
            measured, passed = e.validation.measured_ms, False
        secs["measure"] = time.perf_counter() - t0
    return bundle, m, measured, passed


def _load_plan(config: CompressConfig, base, target, workload, table):
    """The ``--spec`` plan, checked against the model, the target's kernels and the budgets; and its prediction.

    Raises:
        SpecError: the plan is for another model, or breaks a rule.
        UsageError: a format the target cannot run, or the plan is predicted over a budget.
    """
    from llmshrink.exporters.export import FLAVOURS
    from llmshrink.spec import SpecError, load_spec
    from llmshrink.targets.predict import predict

    plan = load_spec(config.spec)
    if plan.base != base:
        raise SpecError("base-matches-model", f"the plan {config.spec} is for {plan.base}, the model is {base}.",
                        "Make the plan from this model (`llmshrink spec new --model ...`).")
    plan.validate(allowed_formats=set(target.formats))
    FLAVOURS.get(target.flavour)().check_spec(plan)
    ms = predict(plan, target, workload, table=table).total_ms
    if over := [b for b in config.budgets_ms if ms > b]:
        raise UsageError(f"The plan {Path(config.spec).name} is predicted at {ms:.2f} ms on {target.name}, over the "
                         f"budget of {min(over):g} ms.",
                         "Raise --latency, or leave it out: with --spec a budget is only a check.")
    return plan, ms


def _ship_unpruned(ctx: _Context, budget: float, fit) -> CandidateOutcome:
    """A loose budget: the unpruned model in ``fit.spec``'s format, without a search. A float format is the
    original itself, exported as is; a quantized one gets the same recovery as a searched subnet (and is
    scored on the held-out rows): only the search is skipped."""
    from llmshrink.compressor.materialize import materialize
    from llmshrink.formats import parse_format

    log.info("%s: %s", budget_label(budget), fit.reason)
    inputs, secs, label = ctx.inputs, {}, budget_label(budget)
    spec = replace(fit.spec, model=ctx.source.describe(), notes={"budget_ms": f"{budget:g}"})
    t0 = time.perf_counter()
    original = all(parse_format(f).is_float for f in spec.formats_used())
    if original:
        with inputs.progress.task(f"The original model in {spec.lm_head}"):
            cm = materialize(inputs.hf, spec, inputs.tok)
        secs["materialize"] = time.perf_counter() - t0
        return _ship(ctx, label, budget, cm, fit.predicted_ms, (), (None, None, None), secs, reason=fit.reason,
                     score=False)  # the original's quality is the original's: no calibration text made to score it
    kd = _recovered(ctx, spec, ctx.out / f"unpruned-{label}", secs)
    return _ship(ctx, label, budget, kd[0], fit.predicted_ms, (), kd[1:], secs, reason=fit.reason)


def _ship(ctx: _Context, label: str, budget: float, cm, predicted_ms: float, moves: tuple[str, ...], kd: tuple,
          secs: dict[str, float], *, reason: str = "", expected_ms: float | None = None,
          score: bool = True, contenders: tuple[ContenderOutcome, ...] = ()) -> CandidateOutcome:
    """Export and check ``cm`` as ``label``'s bundle, score it on the held-out rows, and say what happened."""
    held = ctx.inputs.splits.eval if score else None

    def export_and_score():  # under torchrun, on rank 0 alone (the others wait: nothing runs beside a measurement)
        bundle, m, measured, passed = _export_and_check(ctx, cm, label, secs)
        if score:
            t0 = time.perf_counter()
            _record_held_out_ppl(ctx.out / bundle, held, ctx.config.calib_data, ctx.inputs.progress)
            secs["quality"] = time.perf_counter() - t0
        return bundle, m, measured, passed, secs

    bundle, m, measured, passed, secs = dist.main_only(export_and_score)
    contenders = tuple(replace(c, bundle=str(bundle), measured_ms=measured) if c.shipped else c for c in contenders)
    kd_before, kd_after, tokens = kd
    return CandidateOutcome(label, budget, str(bundle), m.spec_fingerprint, predicted_ms,
                            predicted_ms if expected_ms is None else expected_ms, moves, kd_before, kd_after,
                            measured, passed, secs, reason=reason, recovery_tokens=tokens, contenders=contenders)


def _ship_plan(ctx: _Context, spec, predicted_ms: float, budget: float) -> CandidateOutcome:
    """``compress --spec``: the given plan recovered and exported, with no search."""
    secs: dict[str, float] = {}
    label = "spec"
    spec = replace(spec, model=ctx.source.describe())
    kd = _recovered(ctx, spec, ctx.out / label, secs)
    return _ship(ctx, label, budget, kd[0], predicted_ms, (), kd[1:], secs,
                 reason=f"the plan {Path(ctx.config.spec).name}, recovered without a search")


def _recovered(ctx: _Context, spec, sdir: Path, secs: dict[str, float], start=None):
    """``spec`` recovered from the original (quantization-aware KD), kept in ``sdir/recovered`` so that a resumed run
    never repeats a finished recovery; from ``start`` when the quantizer already ran (a screened contender).
    Returns (model, held-out KD before, KD after, training tokens)."""
    from llmshrink.compressor.model import CompressedModel
    from llmshrink.compressor.recover import recover

    config, inputs = ctx.config, ctx.inputs
    calib, seq = inputs.splits.calib, config.search.seq_len
    # the search's targets, when one ran and recovery trains on its rows alone: read instead of running the teacher
    targets = inputs.targets if len(calib) == config.n_calib else None
    t0 = time.perf_counter()
    rdir = sdir / "recovered"
    if (rdir / RECOVERY_RECORD).is_file() and (rdir / "spec.json").is_file():
        cm = CompressedModel.load(rdir)
        kd_before, kd_after, tokens = (json.loads((rdir / RECOVERY_RECORD).read_text()) + [None])[:3]
    else:
        shared = targets if targets is not None and config.recovery.seq_len == seq else None  # else on the fly
        rr = recover(inputs.hf, spec, calib, config=config.recovery, tokenizer=inputs.tok, targets=shared,
                     held_out=inputs.splits.eval, quantizer=config.quantizer, quant_calib=inputs.quant_calib,
                     start=start() if start else None, progress=inputs.progress)
        cm, kd_before, kd_after, tokens = rr.model, rr.kd_before, rr.kd_after, rr.tokens

        def save() -> None:
            cm.save(rdir)
            storage.atomic_write_text(rdir / RECOVERY_RECORD, json.dumps([kd_before, kd_after, tokens]))

        dist.main_only(save)  # every rank trained the same model (llmshrink.distributed); rank 0 keeps it
    secs["recovery"] = time.perf_counter() - t0
    return cm, kd_before, kd_after, tokens


def _search_and_ship(ctx: _Context, budget: float, searched: int) -> CandidateOutcome:
    """One budget through search, extraction and fit, recovery, export, measurement and held-out scoring.

    ``searched``: how many of the run's budgets are searched (several share one weight warm-up)."""
    from llmshrink.compressor.budget import fastest_format
    from llmshrink.compressor.search import run_search
    from llmshrink.compressor.supernet import Supernet
    from llmshrink.spec import LINEARS
    from llmshrink.targets.predict import predict

    config, out, inputs = ctx.config, ctx.out, ctx.inputs
    space, target, workload, table = ctx.space, ctx.target, ctx.workload, ctx.table
    hf, progress = inputs.hf, inputs.progress
    calib, imp = inputs.search_calib, inputs.importance
    label = budget_label(budget)
    secs: dict[str, float] = {}
    targets = inputs.teacher_targets(secs)
    t0 = time.perf_counter()
    if config.strategy == "joint":
        net = Supernet(hf, space, imp)
    else:  # full precision, each linear's latency priced in the format it will be quantized to
        fastest = fastest_format(space, target, workload, table)
        net = Supernet(hf, replace(space, formats=("fp32",), lm_head_formats=("fp32",)), imp,
                       latency_formats={n: space.fit_format(fastest, n) for n in (*LINEARS, "lm_head")})
    if config.strategy == "joint" and config.quantizer != "rtn":
        net.use_quantized(_search_quantized(ctx))
    sdir = out / f"search-{label}"
    if searched > 1 and config.search.warmup_steps and not (sdir / "search.ckpt").is_file():
        _warm_start(net, hf, calib, out, config, table, workload, budget, targets, progress,
                    ctx.search_mode.recompute)
        dist.main_only(lambda: storage.atomic_write_bytes(sdir / "search.ckpt",
                                                          (out / "warmup" / "search.ckpt").read_bytes()))
    ckpt_exists = (sdir / "search.ckpt").is_file()
    baselines = _baselines(ctx, budget)
    # the joint search starts at the budget's most faithful baseline and leaves it where its samples say so
    start = _search_start(ctx, budget, baselines) if config.strategy == "joint" else None
    result = run_search(net, hf, calib, table=table, workload=workload, budget_ms=budget,
                        params_budget=config.params_budget, config=config.search, checkpoint_dir=sdir,
                        resume=ckpt_exists, targets=targets, start_from=start, shard=ctx.search_mode.sharded,
                        recompute=ctx.search_mode.recompute, progress=progress)
    secs["search"] = time.perf_counter() - t0
    dist.main_only(lambda: storage.atomic_write_text(
        sdir / MOVES, json.dumps([serde.to_dict(m) for m in result.moves], indent=1)))
    t0 = time.perf_counter()
    spec = replace(net.argmax_spec(model=ctx.source.describe()), notes={"budget_ms": f"{budget:g}"})
    dist.main_only(lambda: storage.atomic_write_text(sdir / "argmax_spec.json", spec.to_json()))
    with progress.task(f"Fitting the subnet to {label}"):
        if config.strategy == "joint":
            spec, moves = fit_searched(spec, net, imp, space, target, workload, table, budget)
        else:
            from llmshrink.compressor.sensitivity import measure_sensitivity

            batches = [calib[i:i + 4] for i in range(0, min(len(calib), 32), 4)]
            spec, moves = fit_sequential(spec, net, imp, space, target, workload, table, budget, partial(
                measure_sensitivity, hf, formats=space.formats, head_formats=space.lm_head_formats,
                batches=batches))
    # every rank takes rank 0's subnet: the fit read identical architecture parameters, but a sensitivity or
    # score computed on each device need not round alike everywhere
    def keep_fitted():
        storage.atomic_write_text(sdir / "spec.json", spec.to_json())
        return spec, moves

    spec, moves = dist.main_only(keep_fitted)
    del net
    secs["fit"] = time.perf_counter() - t0
    searched = Contender(SEARCH, spec, predict(spec, target, workload, table=table).total_ms,
                         f"the {config.strategy} search's subnet, fitted to the budget")
    same = [c for c in baselines if c.spec.fingerprint() == spec.fingerprint()]
    if same:  # the search came back to a baseline: screened once, under the search's name, and said so
        searched = replace(searched, why=f"{searched.why}{SAME_AS}{same[0].name} baseline")
    pool = [searched] + [c for c in baselines if c not in same]
    expected = result.history[-1].latency_ms if result.history else float("nan")
    if len(pool) == 1:  # nothing to compare with: no screening
        cm, *kd = _recovered(ctx, spec, sdir, secs)
        return _ship(ctx, label, budget, cm, searched.predicted_ms, tuple(mv.what for mv in moves), tuple(kd), secs,
                     expected_ms=expected)
    return _screen_and_ship(ctx, budget, pool, sdir, tuple(mv.what for mv in moves), expected, secs)


def fit_searched(spec, net, imp, space, target, workload, table, budget: float, *, kinds=None, searched_as=None):
    """The joint search's most probable subnet ``spec`` brought to ``budget``: (spec, moves taken).

    How many blocks to keep is the search's; which ones is the importance order's (measured drop costs,
    :func:`.importance.block_drop_kl`): the search's keep logits learn from straight-through estimates,
    first order in a block's mask, and on SmolLM2-135M they preferred dropping block 11 (drop cost KL 2.4,
    the 4th most costly) while keeping the ten cheapest. Then the fit steps down and the grow step spends
    what is left (:func:`.budget.fit_to_budget`, :func:`.budget.grow_to_budget`), by the search's preference
    with the importance as tie-break, and depth steps in the importance order only.

    ``kinds``: the move kinds the fit may take (default all); ``searched_as``: how a spec reads in ``net``'s
    space when it differs from ``space`` (the sequential search's fp32 supernet, :func:`fit_sequential`)."""
    from llmshrink.compressor.budget import MOVE_KINDS, fit_to_budget, grow_to_budget

    kinds = kinds or MOVE_KINDS
    view = searched_as or (lambda s: s)
    order = imp.block_order()
    spec = imp.apply(spec)
    spec, moves = fit_to_budget(spec, space, target, workload, table, budget, preference=lambda s: net.log_prob(view(s)),
                                fallback=imp.preference, block_order=order, kinds=kinds)
    spec, grown = grow_to_budget(spec, space, target, workload, table, budget,
                                 preference=lambda s: net.log_prob(view(s), alive_only=False), fallback=imp.preference,
                                 block_order=order, kinds=kinds)
    return spec, moves + grown


def fit_sequential(spec, net, imp, space, target, workload, table, budget: float, sensitivity):
    """NAS-then-quantize's extraction: the full-precision search's most probable subnet ``spec`` made into the
    subnet it ships: (spec, moves taken, architecture moves first).

    First the architecture alone, as its search priced it (every linear in the space's fastest format, what it
    will be quantized to at most): brought to the budget and grown to it by width and depth moves, exactly as
    :func:`fit_searched` fits the joint search's subnet. Then formats, by ``sensitivity(spec)`` (a
    :class:`.sensitivity.Sensitivity` of that architecture) with precision moves only
    (:func:`.sensitivity.assign_precision`), which the fastest format guarantees can meet the budget.

    Why two steps: a search's most probable subnet overshoots (at 0.85x uniform int4 on SmolLM2-135M the
    sequential argmax kept all 30 blocks), and precision assigned first, from each linear's least sensitive
    format, could then only reach the budget by dropping blocks the sensitivity proxy cannot price (a dropped
    block's error terms vanish from its sum): that run kept 18 blocks in 8-bit, screening KL 6.06 against
    1.02 for the importance heuristic. NAS-then-quantize fixes the architecture before quantizing."""
    from llmshrink.compressor.budget import fastest_format
    from llmshrink.compressor.sensitivity import assign_precision

    priced = space.in_format(spec, fastest_format(space, target, workload, table))
    arch, arch_moves = fit_searched(priced, net, imp, space, target, workload, table, budget,
                                    kinds=("width", "depth"), searched_as=lambda s: s.with_precision("fp32"))
    spec, prec_moves = assign_precision(arch, sensitivity(arch), space, target, workload, table, budget)
    return spec, arch_moves + prec_moves


def _search_start(ctx: _Context, budget: float, baselines: list[Contender]):
    """Where the joint search starts: the baseline :func:`.contenders.search_start` picks (mixed precision, else
    the most faithful the space can express); else (the baselines use target formats that are no search
    format, e.g. w4g32a8z) the most faithful uniform search format that fits; else None (the pretrained
    widths, :func:`.search.run_search`)."""
    from llmshrink.compressor.budget import uniform_fits
    from llmshrink.compressor.contenders import search_start

    if (c := search_start(baselines, ctx.space.expresses)) is not None:
        return c.spec
    fits = uniform_fits(ctx.space, ctx.target, ctx.workload, ctx.table, budget, params_budget=ctx.config.params_budget,
                        formats=ctx.space.formats, accepts=_buildable(ctx.target))
    return next((f.spec for f in fits if ctx.space.expresses(f.spec)), None)


def _search_quantized(ctx: _Context) -> dict:
    """The unpruned model in each integer search format, quantized by the run's quantizer on the search's rows
    (``RUN_DIR/search-quant/<format>``, shared by every budget and kept for --resume): what the joint search
    fake-quantizes with (:meth:`.Supernet.use_quantized`), so it prices formats by the error that ships. Returned
    as :class:`~.model.SavedModel` s: the search reads them a layer at a time, not each model whole on every rank."""
    from llmshrink.compressor.materialize import materialize
    from llmshrink.compressor.model import SavedModel
    from llmshrink.formats import parse_format

    config, inputs, space = ctx.config, ctx.inputs, ctx.space
    models = {}
    calib = None
    for fmt in dict.fromkeys((*space.formats, *space.lm_head_formats)):
        if parse_format(fmt).is_float:
            continue
        qdir = ctx.out / "search-quant" / fmt
        if not (qdir / "spec.json").is_file():
            calib = inputs.search_calib if calib is None else calib

            def quantize(fmt=fmt, qdir=qdir, calib=calib) -> None:
                with inputs.progress.task(f"Quantizing the unpruned model in {fmt} for the search "
                                          f"({config.quantizer})"):
                    materialize(inputs.hf, space.largest(fmt), inputs.tok, calib=calib, quantizer=config.quantizer,
                                progress=inputs.progress).save(qdir)

            dist.main_only(quantize)  # under torchrun rank 0 quantizes; every rank reads what it saved
        models[fmt] = SavedModel(qdir)
    return models


def _search_quantized_dirs(ctx: _Context) -> dict[str, Path]:
    """The search's quantized unpruned models already in the run directory, by spec fingerprint."""
    return {_fingerprint(j): j.parent for j in sorted((ctx.out / "search-quant").glob("*/spec.json"))}


def _requantized(ctx: _Context, spec, qdir: Path):
    """A loader of ``spec`` quantized by the run's quantizer on ``n_quant`` rows, kept in ``qdir`` (``--resume``)."""
    from llmshrink.compressor.materialize import materialize
    from llmshrink.compressor.model import CompressedModel

    inputs, config = ctx.inputs, ctx.config

    def load():
        if (qdir / "spec.json").is_file():
            return CompressedModel.load(qdir)
        with inputs.progress.task(f"Quantizing the winner ({config.quantizer}, {len(inputs.quant_calib)} rows)"):
            cm = materialize(inputs.hf, spec, inputs.tok, calib=inputs.quant_calib, quantizer=config.quantizer,
                             progress=inputs.progress)
        dist.main_only(lambda: cm.save(qdir))
        return cm

    return load


def _baselines(ctx: _Context, budget: float) -> list[Contender]:
    """The contenders of ``budget`` that need no search (:func:`.contenders.baselines`), built from what the run
    may ship: a --space file's formats, else the target's, that the flavour builds."""
    from llmshrink.compressor.contenders import baselines

    return baselines(ctx.space, ctx.target, ctx.workload, ctx.table, budget, ctx.inputs.importance,
                     params_budget=ctx.config.params_budget, formats=_shippable_formats(ctx.config, ctx.space,
                                                                                        ctx.target),
                     accepts=_buildable(ctx.target), sensitivity=_sensitivity(ctx))


SENSITIVITY = "sensitivity.json"


def _sensitivity(ctx: _Context):
    """The unpruned model's per-linear quantization sensitivity in every search format (:mod:`.sensitivity`),
    measured once per run on the first 32 search rows and kept in the run directory (``--resume``); the
    mixed-precision contender of every budget reads it."""
    from llmshrink.compressor.sensitivity import Sensitivity, measure_sensitivity
    from llmshrink.formats import fidelity_key

    inputs, space = ctx.inputs, ctx.space
    if inputs.sensitivity is not None:
        return inputs.sensitivity
    path = ctx.out / SENSITIVITY
    calib = inputs.search_calib

    def measure() -> Sensitivity:
        if path.is_file():
            return Sensitivity({(i, n, f): v for i, n, f, v in json.loads(path.read_text())})
        full = inputs.importance.apply(space.largest(min(space.formats, key=fidelity_key)), choose_blocks=False)
        with inputs.progress.task("Quantization sensitivity of every linear"):
            sens = measure_sensitivity(inputs.hf, full, space.formats, space.lm_head_formats,
                                       [calib[i:i + 4] for i in range(0, min(len(calib), 32), 4)])
        storage.atomic_write_text(path, json.dumps([[i, n, f, v] for (i, n, f), v in sens.scores.items()]))
        return sens

    inputs.sensitivity = dist.main_only(measure)
    return inputs.sensitivity


def measured_ratio(bundle: Path) -> float | None:
    """The bundle's last measured latency ratio to a reference timed in turn (its manifest's validation), if any."""
    from llmshrink.exporters.bundle import load_manifest

    return load_manifest(bundle).validation.get("measured_ratio")


def latency_bound(ctx: _Context, budget: float) -> float | None:
    """The highest ratio to the run's reference, timed in turn, that a bundle of ``budget`` may measure: the
    budget's own ratio to the reference's prediction, plus ``latency_slack_pct``. None when bundles are not
    timed in turn here (an absolute budget, a target not measured on this machine, or the guard off)."""
    from llmshrink.spec import SubnetSpec
    from llmshrink.targets.predict import predict

    config = ctx.config
    if not (ctx.measurable and config.reference and config.latency_slack_pct is not None):
        return None
    ref_ms = predict(SubnetSpec.uniform(ctx.base, config.reference), ctx.target, ctx.workload,
                     table=ctx.table).total_ms
    return budget / ref_ms * (1 + config.latency_slack_pct / 100)


@dataclass(frozen=True)
class GuardVerdict:
    """What the latency guard decided for one budget (:func:`_latency_guard`)."""

    pick: int  # index in the screening's ranking of the contender that ships
    over: dict[str, str]  # name -> why it did not ship, for each contender measured over the bound
    within: bool = True  # the pick measured within the bound (else it is the fastest of those measured)


def _latency_guard(ctx: _Context, budget: float, ranked: list, timed) -> GuardVerdict:
    """Which of the screening's ``ranked`` contenders ships: the first whose screened bundle (``timed(c)`` ->
    (bundle, ms, ratio to the reference)) measures within :func:`latency_bound`, timed in the ranking's order
    and only until one does. With no bound, the first. When none measures within, the one that measured
    fastest (``within=False``).

    Why: the table prices subnets, the machine runs them. On a fresh Zen 4 with a self-adapted table, the 1.0x
    int4 budget admitted 188 of 210 linears in w8g64a8 (predicted 1.000x the uniform int4 export), and the
    run's own in-turn check measured the shipped bundle at 1.067x; it shipped anyway.
    """
    bound = latency_bound(ctx, budget)
    if bound is None:
        return GuardVerdict(0, {})
    over: dict[str, str] = {}
    ratios = []
    for i, (c, _) in enumerate(ranked):
        ratio = timed(c)[2]
        if ratio is None or ratio <= bound:  # nothing to judge by (no measurement) is no reason to refuse
            return GuardVerdict(i, over)
        ratios.append(ratio)
        over[c.name] = (f"measured {ratio:.3f}x the uniform {ctx.config.reference} export timed in turn, over "
                        f"this budget's {bound:.3f}x (its {bound / (1 + ctx.config.latency_slack_pct / 100):.3f}x "
                        f"plus {ctx.config.latency_slack_pct:g} %)")
    fastest = min(range(len(ratios)), key=ratios.__getitem__)
    log.warning("%s: no contender measured within %.3fx the reference; the fastest measured (%s, %.3fx) ships",
                budget_label(budget), bound, ranked[fastest][0].name, ratios[fastest])
    over.pop(ranked[fastest][0].name)
    return GuardVerdict(fastest, over, within=False)


REPRICED = " (re-priced)"  # the suffix of a contender made again on a table corrected by the latency guard


def _repriced_mixed(ctx: _Context, budget: float, ranked: list, exported: dict) -> Contender | None:
    """After the latency guard refused the screening's first contender: the mixed-precision contender made again
    on the table that contender's in-turn measurement corrected (:func:`.contenders.reprice`), named
    ``mixed precision (re-priced)``; None when the correction changes nothing, or the budget has no mixed one.

    The mixed contender, because it is the one made from the table's prices of formats alone; a searched
    subnet is not searched again.
    """
    from llmshrink.compressor.contenders import MIXED, reprice
    from llmshrink.spec import SubnetSpec
    from llmshrink.targets.predict import predict

    first = ranked[0][0]
    if first.name.endswith(REPRICED) or exported.get(first.name, (None,) * 3)[2] is None:
        return None
    rp = reprice(ctx.table, ctx.target, ctx.workload, first.spec, SubnetSpec.uniform(ctx.base, ctx.config.reference),
                 exported[first.name][2])
    if rp is None:
        return None
    made = [c for c in _baselines(replace(ctx, table=rp.table), budget) if c.name == MIXED]
    if not made or any(c.spec.fingerprint() == made[0].spec.fingerprint() for c, _ in ranked):
        return None
    spec = made[0].spec
    ms = predict(spec, ctx.target, ctx.workload, table=ctx.table).total_ms
    log.info("%s: %s; mixed precision made again on that price", budget_label(budget), rp.note)
    return Contender(MIXED + REPRICED, spec, ms, f"{made[0].why} on the corrected table ({rp.note})")


GROWN = " (grown)"  # the suffix of a contender grown into the latency its in-turn measurement left unspent


def _grown_into_slack(ctx: _Context, budget: float, c: Contender, ratio: float | None) -> Contender | None:
    """``c`` (the latency guard's pick) grown into what it left of ``budget`` when timed in turn: None when it
    measured within ``latency_slack_pct`` of the budget's ratio to the reference, was not measured, is not below
    the reference (predicted and measured), was grown already, or has no step up that fits.

    The table's prediction of ``c`` is taken to be off in its savings against the reference: ``c`` saves ``k``
    times what the table predicts, ``k = (1 - measured) / (1 - predicted)`` (ratios to the reference), and the
    growth aims at the prediction that, so corrected, is the budget's ratio: ``1 - (1 - budget) / k``. Savings,
    not the whole time, because growing brings a subnet back toward the reference, which the table and the
    measurement share. Steps up as the fit's grow step takes them (:func:`.budget.grow_to_budget`), by the
    importance preference (ties, such as formats, by the run's quantization sensitivity), blocks in the
    importance order. The guard then times the grown subnet like any
    contender: over the bound, it does not ship.

    Why: the table of a 2-core Xeon (6/167/1, adapted from an AMD one) predicted the 0.85x int4 budget's pick,
    4 of 30 blocks dropped and five MLPs narrowed, at 0.850x the uniform int4 export; timed in turn it ran at
    0.772x (the sequential run's at 0.767x). A tenth of the reference's time was left on the table, and quality
    with it (WikiText-2 perplexity 49 against 33.7 for the unpruned int4).
    """
    from llmshrink.spec import SubnetSpec
    from llmshrink.targets.predict import predict

    bound = latency_bound(ctx, budget)
    # only a subnet of the search space grows (the importance and sensitivity price its formats): a uniform
    # baseline in another of the target's formats is left as it is
    if ratio is None or bound is None or _is_grown(c.name) or not ctx.space.expresses(c.spec):
        return None
    slack = ctx.config.latency_slack_pct / 100
    ref_ms = predict(SubnetSpec.uniform(ctx.base, ctx.config.reference), ctx.target, ctx.workload,
                     table=ctx.table).total_ms
    aim, predicted = bound / (1 + slack), c.predicted_ms / ref_ms
    if ratio >= aim * (1 - slack) or predicted >= 1 or ratio >= 1:
        return None
    k = (1 - ratio) / (1 - predicted)
    target_ms = ref_ms * (1 - (1 - aim) / k)
    if (up := _grow(ctx, c, target_ms)) is None:
        return None
    spec, steps, ms = up
    log.info("%s: %s measured %.3fx the reference against the budget's %.3fx; grown by %d steps to %.3fx predicted",
             budget_label(budget), c.name, ratio, aim, len(steps), ms / ref_ms)
    return Contender(c.name + GROWN, spec, ms,
                     f"{c.why}, grown by {len(steps)} steps into the time it left: it measured {ratio:.3f}x the "
                     f"reference timed in turn against the budget's {aim:.3f}x (predicted {predicted:.3f}x: its "
                     f"savings measured x{k:.2f} the table's), so grown to {ms / ref_ms:.3f}x predicted")


def _grown_once(ctx: _Context, budget: float, ranked: list, c: Contender, ratio: float | None,
                sdir: Path) -> Contender | None:
    """:func:`_grown_into_slack`, made once per budget and kept in ``sdir`` (a resumed run re-times the pick and
    could grow it differently; what was screened and timed under the grown name must stay that subnet); None
    also when it is a contender already ranked."""
    from llmshrink.spec import SubnetSpec

    path = sdir / "grown.json"
    if path.is_file():
        d = json.loads(path.read_text())
        grown = Contender(d["name"], SubnetSpec.from_json(d["spec"]), d["predicted_ms"], d["why"])
    else:
        grown = _grown_into_slack(ctx, budget, c, ratio)
        if grown is None:
            return None
        dist.main_only(lambda: storage.atomic_write_text(path, json.dumps(
            {"name": grown.name, "spec": grown.spec.to_json(), "predicted_ms": grown.predicted_ms,
             "why": grown.why}, indent=1)))
    if any(grown.spec.fingerprint() == k.spec.fingerprint() for k, _ in ranked):
        return None
    return grown


def _grow(ctx: _Context, c: Contender, target_ms: float):
    """``c``'s spec grown up to ``target_ms`` predicted, as the fit's grow step grows (:func:`.budget.grow_to_budget`:
    blocks back in the importance order, widths by importance; among steps importance values alike, such as
    8-bit linears, the run's quantization sensitivity goes first): (spec, steps, predicted ms), or None when no
    step fits or the growth passes ``--params-budget``."""
    from llmshrink.compressor.budget import grow_to_budget, num_weights
    from llmshrink.targets.predict import predict

    imp = ctx.inputs.importance
    sens = getattr(ctx.inputs, "sensitivity", None)
    spec, steps = grow_to_budget(c.spec, ctx.space, ctx.target, ctx.workload, ctx.table, target_ms,
                                 preference=imp.preference, fallback=sens.preference if sens else None,
                                 block_order=imp.block_order())
    if not steps or spec.fingerprint() == c.spec.fingerprint():
        return None
    if ctx.config.params_budget and num_weights(spec) > ctx.config.params_budget:
        return None  # grown past the user's parameter cap
    return spec, steps, predict(spec, ctx.target, ctx.workload, table=ctx.table).total_ms


REAIMED = " (grown again)"  # the suffix of a pick grown again, aimed by its own and its growth's measurements


def _is_grown(name: str) -> bool:
    return name.endswith((GROWN, REAIMED))


def _reaimed(ctx: _Context, budget: float, c: Contender, ratio: float | None, grown: Contender,
             grown_ratio: float | None) -> Contender | None:
    """``c`` (the pick :func:`_grown_into_slack` grew) grown again, when its growth ``grown`` measured over the
    budget's bound, or still short of its aim: aimed at the prediction the two in-turn measurements put at the
    budget's ratio (the line through (predicted, measured) of ``c`` and of ``grown``), at most the reference's.
    None when ``grown`` landed within the slack, either was not measured, the measurements do not rise with
    the prediction (noise larger than the step), or no other subnet fits the new aim.

    Why: the first growth trusts one measurement of ``c``. At 0.7x int4 on a 2-core Xeon (6/167/1) the
    sequential run's importance pick measured 0.60x, its growth to 0.79x predicted measured 0.738x against the
    0.735x bound, so it was refused and the pick shipped: 0.544x the int4 export in the benchmark's timing,
    WikiText-2 120 where the grown subnet had screened at KL 1.35 against 1.78.
    """
    from llmshrink.spec import SubnetSpec
    from llmshrink.targets.predict import predict

    bound = latency_bound(ctx, budget)
    if ratio is None or grown_ratio is None or bound is None:
        return None
    slack = ctx.config.latency_slack_pct / 100
    aim = bound / (1 + slack)
    if aim * (1 - slack) <= grown_ratio <= bound:
        return None
    ref_ms = predict(SubnetSpec.uniform(ctx.base, ctx.config.reference), ctx.target, ctx.workload,
                     table=ctx.table).total_ms
    p0, p1 = c.predicted_ms / ref_ms, grown.predicted_ms / ref_ms
    if p1 <= p0 or grown_ratio <= ratio:
        return None
    target = min(1.0, p0 + (aim - ratio) * (p1 - p0) / (grown_ratio - ratio))
    if (up := _grow(ctx, c, target * ref_ms)) is None or up[0].fingerprint() == grown.spec.fingerprint():
        return None
    spec, steps, ms = up
    log.info("%s: %s measured %.3fx at %.3fx predicted, its growth %.3fx at %.3fx; grown again by %d steps to "
             "%.3fx predicted", budget_label(budget), c.name, ratio, p0, grown_ratio, p1, len(steps), ms / ref_ms)
    return Contender(c.name + REAIMED, spec, ms,
                     f"{c.why}, grown by {len(steps)} steps: it measured {ratio:.3f}x the reference timed in turn at "
                     f"{p0:.3f}x predicted, and its first growth {grown_ratio:.3f}x at {p1:.3f}x, so grown to "
                     f"{ms / ref_ms:.3f}x predicted, where the line through the two meets the budget's "
                     f"{aim:.3f}x")


def _reaimed_once(ctx: _Context, budget: float, ranked: list, c: Contender, ratio: float | None,
                  grown: Contender, grown_ratio: float | None, sdir: Path) -> Contender | None:
    """:func:`_reaimed`, made once per budget and kept in ``sdir`` (as :func:`_grown_once`)."""
    from llmshrink.spec import SubnetSpec

    path = sdir / "reaimed.json"
    if path.is_file():  # decided before (a resumed run re-times its bundles and could decide otherwise)
        d = json.loads(path.read_text())
        if d.get("none"):
            return None
        again = Contender(d["name"], SubnetSpec.from_json(d["spec"]), d["predicted_ms"], d["why"])
    else:
        again = _reaimed(ctx, budget, c, ratio, grown, grown_ratio)
        record = {"none": True} if again is None else {
            "name": again.name, "spec": again.spec.to_json(), "predicted_ms": again.predicted_ms, "why": again.why}
        dist.main_only(lambda: storage.atomic_write_text(path, json.dumps(record, indent=1)))
        if again is None:
            return None
    if any(again.spec.fingerprint() == k.spec.fingerprint() for k, _ in ranked):
        return None
    return again


def _screen_and_ship(ctx: _Context, budget: float, pool: list[Contender], sdir: Path, moves: tuple[str, ...],
                     expected_ms: float, secs: dict[str, float]) -> CandidateOutcome:
    """Screen ``pool`` alike (the quantizer, then KL on the screening rows; :mod:`.contenders`), recover and ship
    the winner as the budget's bundle, and export each other contender as screened, beside it."""
    from llmshrink.compressor.contenders import screen, screen_kd
    from llmshrink.compressor.materialize import materialize
    from llmshrink.compressor.model import CompressedModel

    config, inputs, label = ctx.config, ctx.inputs, budget_label(budget)
    t0 = time.perf_counter()
    share, screen_rows, held = inputs.search_calib, inputs.screen_rows, inputs.splits.eval
    # The search's unpruned models in each search format (:func:`_search_quantized`) were quantized on these same
    # rows: a uniform contender that is one of them is read, not quantized again.
    reused = _search_quantized_dirs(ctx)

    def quantized(c: Contender) -> Path:
        return reused.get(c.spec.fingerprint(), sdir / "contenders" / c.slug / "quantized")

    def build(c: Contender):
        if (quantized(c) / "spec.json").is_file():
            return CompressedModel.load(quantized(c))
        with inputs.progress.task(f"Quantizing {c.name} for screening ({config.quantizer}, {len(share)} rows)"):
            cm = materialize(inputs.hf, c.spec, inputs.tok, calib=share, quantizer=config.quantizer,
                             progress=inputs.progress)
        cm.save(quantized(c))
        return cm

    record = sdir / "screen.json"
    done = json.loads(record.read_text()) if record.is_file() else {}

    def keep(name: str, kd: float) -> None:
        done[name] = kd
        storage.atomic_write_text(record, json.dumps(done, indent=1))

    # Under torchrun rank 0 quantizes, saves and scores the contenders; the others receive the ranking.
    ranked = dist.main_only(lambda: screen(pool, build, partial(screen_kd, teacher=inputs.hf, rows=screen_rows),
                                           progress=inputs.progress, done=done, on_scored=keep))
    secs["screen"] = time.perf_counter() - t0

    def screened_bundle(c: Contender) -> tuple[Path, float | None, float | None]:
        """Contender ``c`` exported as screened (quantizer only), measured and scored, for the report and the
        latency guard: (bundle, measured ms, measured ratio to the reference timed in turn)."""
        from llmshrink.exporters.bundle import load_manifest

        bundle = Path("candidates") / f"{label}-{c.slug}"
        if not (ctx.out / bundle / "manifest.json").is_file():
            _export_and_check(ctx, CompressedModel.load(quantized(c)), label, {}, bundle)
            _record_held_out_ppl(ctx.out / bundle, held, config.calib_data, inputs.progress)
        m = load_manifest(ctx.out / bundle)
        return bundle, (m.measured[-1].reference_ms if m.measured else None), measured_ratio(ctx.out / bundle)

    exported = {}  # contender name -> screened_bundle(c), each made once

    def timed(c: Contender) -> tuple[Path, float | None, float | None]:
        if c.name not in exported:
            exported[c.name] = dist.main_only(partial(screened_bundle, c))
        return exported[c.name]

    def screened_too(ranked: list, c: Contender) -> list:
        """``ranked`` with one more contender, screened like the rest."""
        return sorted([*ranked, *dist.main_only(lambda: screen(
            [c], build, partial(screen_kd, teacher=inputs.hf, rows=screen_rows), progress=inputs.progress,
            done=done, on_scored=keep))], key=lambda ck: ck[1])

    t0 = time.perf_counter()
    guard = _latency_guard(ctx, budget, ranked, timed)
    if guard.over and (again := _repriced_mixed(ctx, budget, ranked, exported)) is not None:
        # one more contender, made on the table the refused one's measurement corrected
        ranked = screened_too(ranked, again)
        guard = _latency_guard(ctx, budget, ranked, timed)
    if latency_bound(ctx, budget) is not None and guard.within and not guard.over and (grown := _grown_once(
            ctx, budget, ranked, first_pick := ranked[guard.pick][0], timed(first_pick)[2], sdir)) is not None:
        # the pick left time unspent: the same subnet grown into it, screened like the rest, timed by the guard
        # (not after a refusal: the table's prices are then known to be off the other way)
        ranked = screened_too(ranked, grown)
        guard = _latency_guard(ctx, budget, ranked, timed)
        # the growth screened better than the pick and measured over the bound (refused) or still short of it
        # (shipping): once more, aimed by both measurements. Not when it screened worse: the guard never timed
        # it, and a subnet between the two would be growing what already lost on quality
        if ((grown.name in guard.over or ranked[guard.pick][0] is grown) and (again := _reaimed_once(
                ctx, budget, ranked, first_pick, timed(first_pick)[2], grown, timed(grown)[2], sdir)) is not None):
            ranked = screened_too(ranked, again)
            guard = _latency_guard(ctx, budget, ranked, timed)
    pick, over = guard.pick, guard.over
    if exported:
        secs["latency_guard"] = time.perf_counter() - t0
    winner, best_kd = ranked[pick]
    outcomes = []
    for c, kd in ranked:
        if c is winner:
            continue
        bundle, measured, ratio = timed(c)
        outcomes.append(ContenderOutcome(c.name, c.spec.fingerprint(), c.predicted_ms, kd, why=c.why,
                                         bundle=str(bundle), measured_ms=measured, measured_ratio=ratio,
                                         over_latency=over.get(c.name, "")))
    if winner.name in exported:  # timed as screened for the guard only: the recovered model is what ships
        dist.main_only(lambda: shutil.rmtree(ctx.out / exported[winner.name][0], ignore_errors=True))
    ship = ContenderOutcome(winner.name, winner.spec.fingerprint(), winner.predicted_ms, best_kd, why=winner.why,
                            shipped=True, measured_ratio=exported.get(winner.name, (None,) * 3)[2])
    rdir = sdir if winner.name == SEARCH else sdir / "contenders" / winner.slug
    # the winner is quantized again on the quantizer's own rows (n_quant, what ``export`` of its spec uses), and
    # recovery starts from that
    cm, *kd = _recovered(ctx, replace(winner.spec, model=ctx.source.describe(), notes={"budget_ms": f"{budget:g}"}),
                         rdir, secs, start=_requantized(ctx, winner.spec, rdir / "requantized"))
    searched = next(kd_ for c, kd_ in ranked if c.name == SEARCH)
    first = ranked[0][0]
    if pick:
        within = "within" if guard.within else "the fastest measured: none was within"
        reason = (f"{first.name} screened best (KL {ranked[0][1]:.4f}) but {over[first.name]}; {winner.name} "
                  f"screened at KL {best_kd:.4f} and measured {ship.measured_ratio:.3f}x ({within}), so it ships, "
                  f"recovered; {winner.why}")
    elif winner.name == SEARCH:
        reason = ""
    elif _is_grown(winner.name):
        reason = ("" if winner.name in (SEARCH + GROWN, SEARCH + REAIMED) else "the search did not win: ") + (
            f"{winner.name} screened at KL {best_kd:.4f} and measured {ship.measured_ratio:.3f}x (within), so it "
            f"ships, recovered; {winner.why}")
    else:
        reason = (f"the search did not win: {winner.name} screened at KL {best_kd:.4f} against the searched subnet's "
                  f"{searched:.4f} (the run's quantizer, no recovery, {len(inputs.screen_rows)} rows no phase "
                  f"read), so it ships, recovered; {winner.why}")
    return _ship(ctx, label, budget, cm, winner.predicted_ms, moves if winner.name in (SEARCH, SEARCH + GROWN, SEARCH + REAIMED) else (),
                 tuple(kd),
                 secs, reason=reason, expected_ms=expected_ms if winner.name == SEARCH else None,
                 contenders=(ship, *outcomes))
