"""The verbs of llmshrink as library calls: export, open a bundle, generate, bench, validate.

The CLI is a thin layer over these. They never print; long steps report to
a :class:`~llmshrink.progress.Progress`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmshrink import serde
from llmshrink.compressor.calibration_text import calibration_tokens
from llmshrink.errors import LlmshrinkError, UsageError
from llmshrink.exporters.bundle import (
    MODEL_FILE,
    Manifest,
    load_manifest,
    now_iso,
    update_manifest,
    verify_bundle,
    write_bundle,
)
from llmshrink.exporters.timing import DEFAULT_RUNS, DEFAULT_WARMUP, LatencyMeasurement
from llmshrink.progress import NULL_PROGRESS, Progress
from llmshrink.registry import Registry
from llmshrink.spec import BaseShape, SpecError, SubnetSpec, load_spec, precision_summary
from llmshrink.targets.predict import prediction_provenance
from llmshrink.targets.workload import Workload


class ParityError(LlmshrinkError):
    """The exported graph does not reproduce the torch model."""


@dataclass(frozen=True)
class Flavour:
    """An ONNX flavour: a cheap spec check, a graph builder, and a check of the built graph."""

    name: str
    check_spec: Callable[[SubnetSpec], None]
    build: Callable[..., object]
    description: str
    check_graph: Callable[[object], None] = lambda graph: None
    fp16_activations: bool = False


def _ort_flavour() -> Flavour:
    from llmshrink.exporters.onnx_ort import build_ort_graph, check_spec

    return Flavour("ort", check_spec, build_ort_graph, "ONNX Runtime contrib ops (MatMulNBits, GQA)")


def _trt_flavour() -> Flavour:
    from llmshrink.exporters.onnx_trt import build_trt_graph, check_spec
    from llmshrink.exporters.trt_compat import assert_compatible

    return Flavour("trt", check_spec, build_trt_graph, "standard opset-21 ONNX for TensorRT (fp16, W4A16)",
                   check_graph=assert_compatible, fp16_activations=True)


FLAVOURS: Registry[Callable[[], Flavour]] = Registry("flavour")
FLAVOURS.register("ort", _ort_flavour)
FLAVOURS.register("trt", _trt_flavour)


def export(model: str, spec: SubnetSpec | str | Path | None, out: str | Path, *, flavour: str | None = None,
           target: str | None = None, max_length: int = 2048, trust_remote_code: bool = False,
           calib_data: str = "self", progress: Progress = NULL_PROGRESS) -> Manifest:
    """Materialize ``spec`` of ``model``, export it, check parity, and write a bundle at ``out``.

    The spec is checked against the model's shape, the target's kernels (when
    a target is given) and the flavour's kernels before any weights are loaded.
    The flavour defaults to the target's (``ort`` without a target).
    ``calib_data`` (as ``compress --calib-data``) is read only when the spec has
    static activation scales (``w8a8s``): they are calibrated on its first
    :data:`EXPORT_CALIB_ROWS` sequences, the same sequences ``compress`` calibrates on.

    Raises:
        SpecError / UsageError: the spec does not fit the model or the flavour.
        ParityError: the exported graph does not reproduce the torch model.
    """

    from llmshrink.compressor.calibrate import needs_calibration
    from llmshrink.compressor.materialize import materialize
    from llmshrink.models import load_config, load_model, load_tokenizer, resolve_model
    from llmshrink.models.load import fingerprint

    profile = None
    if target is not None:
        from llmshrink.targets.profile import load_target

        profile = load_target(target)
        if flavour is not None and flavour != profile.flavour:
            raise UsageError(f"Target {profile.name} runs the {profile.flavour} flavour, not {flavour}.",
                             "Drop --flavour, or pick a target whose runtime matches it.")
    flavour = flavour or (profile.flavour if profile else "ort")
    fl = FLAVOURS.get(flavour)()
    source = resolve_model(model)
    base = BaseShape.from_config(load_config(source, trust_remote_code=trust_remote_code, progress=progress))
    spec = SubnetSpec.original(base, model=source.describe()) if spec is None else load_spec(spec)
    if spec.base != base:
        raise SpecError("base-matches-model", f"the spec is for {spec.base}, the model is {base}.",
                        "Make the spec from this model (`llmshrink spec new --model ...`).")
    if profile is not None:
        spec.validate(allowed_formats=set(profile.formats))
    fl.check_spec(spec)
    hf = load_model(source, trust_remote_code=trust_remote_code, progress=progress)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code, progress=progress)
    calib = calibration_tokens(hf, tokenizer, source, calib_data, progress) if needs_calibration(spec) else None
    with progress.task("Materializing and quantizing the subnet"):
        cm = materialize(hf, spec, tokenizer, calib=calib)
    return export_compressed(cm, tokenizer, out, flavour=flavour, target=profile, model_source=source.describe(),
                             model_fingerprint=fingerprint(source), max_length=max_length, progress=progress)


def export_compressed(cm, tokenizer, out: str | Path, *, flavour: str, target=None, workload: Workload | None = None,
                      model_source: str = "", model_fingerprint: str = "", max_length: int = 2048,
                      notes: tuple[str, ...] = (), progress: Progress = NULL_PROGRESS) -> Manifest:
    """Export a materialized (possibly recovered) :class:`CompressedModel`: graph, parity check, bundle.

    ``target`` (a TargetProfile) and ``workload`` (default: the target's) set the
    manifest's predicted latency.

    Raises:
        ParityError: the exported graph does not reproduce the torch model.
    """
    import numpy as np

    from llmshrink.exporters.ort_session import OrtDecoder
    from llmshrink.exporters.parity import PARITY_TEXT, check_parity

    fl = FLAVOURS.get(flavour)()
    spec = cm.spec
    fl.check_spec(spec)
    with progress.task(f"Building the {flavour} ONNX graph"):
        graph = fl.build(cm, max_length=max_length)
        fl.check_graph(graph)
    with progress.task("Checking parity with the torch model"):
        decoder = OrtDecoder(graph.SerializeToString())
        ids = np.array(tokenizer(PARITY_TEXT, add_special_tokens=False)["input_ids"][:64], dtype=np.int64)
        report = check_parity(cm, decoder, ids, fp16_activations=fl.fp16_activations)
    if not report.passed:
        raise ParityError(f"The exported graph does not match the torch model ({report.rule}): max |d| "
                          f"{report.max_abs_diff:.3g}, top-1 agreement {report.top1_agreement:.1%} (in the top 5: "
                          f"{report.top1_in_top5:.1%}) over {report.tokens} tokens.",
                          "This is a bug in llmshrink; please report it with the spec.")
    workload = workload or (target.default_workload if target else None)
    fields = dict(flavour=flavour, model_source=model_source, model_fingerprint=model_fingerprint,
                  spec_fingerprint=spec.fingerprint(), max_length=max_length, precision=precision_summary(spec),
                  num_params=cm.num_params, parity=report.as_dict(),
                  target=target.name if target else None, workload=workload, notes=tuple(notes))
    if target is not None:
        pred = _prediction_fields(spec, target, workload)
        fields["notes"] = fields["notes"] + pred.pop("notes", ())
        fields.update(pred)
    with progress.task(f"Writing bundle {out}"):
        return write_bundle(out, graph, tokenizer, spec, fields)


def _prediction_fields(spec: SubnetSpec, profile, workload: Workload | None = None) -> dict:
    """Manifest fields for the target's predicted latency (none when the target has no table yet)."""
    from llmshrink.targets.predict import NoTableError, predict

    try:
        p = predict(spec, profile, workload)
    except NoTableError as e:
        return {"notes": (f"No predicted latency: {e.message}",)}
    return {"predicted_latency_ms": p.total_ms, "prediction_provenance": prediction_provenance(p)}


@dataclass
class OpenBundle:
    """A verified bundle ready to run."""

    path: Path
    manifest: Manifest
    spec: SubnetSpec
    tokenizer: object
    decoder: object

    @property
    def stop_ids(self) -> tuple[int, ...]:
        eos = self.tokenizer.eos_token_id
        return (eos,) if eos is not None else ()


def open_bundle(path: str | Path, *, threads: int | None = None, verify: bool = True) -> OpenBundle:
    """Verify a bundle's hashes and open an ONNX Runtime session on it.

    Raises:
        IntegrityError: a file differs from the manifest.
        UsageError: not a bundle.
    """
    from transformers import AutoTokenizer

    from llmshrink.exporters.ort_session import OrtDecoder

    path = Path(path)
    manifest = verify_bundle(path) if verify else load_manifest(path)
    spec = SubnetSpec.from_json((path / "spec.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(path)
    return OpenBundle(path, manifest, spec, tokenizer, OrtDecoder(path / MODEL_FILE, threads=threads))


def generate_text(bundle: OpenBundle, prompt: str, *, max_new_tokens: int = 128, chat: bool = True,
                  do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  seed: int = 0) -> Iterator[str]:
    """Stream the bundle's continuation of ``prompt`` as text pieces.

    With ``chat`` (default) and a tokenizer that has a chat template, the
    prompt is one user turn and generation starts the assistant turn.
    """
    tok = bundle.tokenizer
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
    else:
        ids = tok(prompt)["input_ids"]
    if len(ids) + max_new_tokens > bundle.manifest.max_length:
        raise UsageError(f"Prompt ({len(ids)} tokens) + {max_new_tokens} new tokens exceed the bundle's "
                         f"max_length {bundle.manifest.max_length}.", "Shorten the prompt or ask for fewer tokens.")
    new: list[int] = []
    shown = ""
    for t in bundle.decoder.generate(ids, max_new_tokens, max_length=len(ids) + max_new_tokens,
                                     stop_ids=bundle.stop_ids, do_sample=do_sample,
                                     temperature=temperature, top_p=top_p, seed=seed):
        if t in bundle.stop_ids:
            break
        new.append(t)
        text = tok.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(shown):]
            shown = text


def bench(path: str | Path, workloads: Sequence[Workload], *, runs: int = DEFAULT_RUNS,
          warmup: int = DEFAULT_WARMUP, threads: int | None = None, record: bool = True,
          progress: Progress = NULL_PROGRESS) -> list[LatencyMeasurement]:
    """Measure ``workloads`` on a bundle; with ``record``, keep them in its manifest.

    A recorded measurement replaces an earlier one of the same workload and thread count.
    """
    from llmshrink.exporters.timing import time_decoder

    b = open_bundle(path, threads=threads)
    for w in workloads:
        if w.context + w.new_tokens + 1 > b.manifest.max_length:
            raise UsageError(f"Workload {w} needs {w.context + w.new_tokens + 1} positions; the bundle has "
                             f"max_length {b.manifest.max_length}.")
    results = []
    for w in workloads:
        with progress.task(f"Timing {w}", total=runs):
            results.append(time_decoder(b.decoder, w, vocab_size=b.spec.base.vocab_size, runs=runs, warmup=warmup))
    if record:
        keep = [m for m in b.manifest.measured
                if not any(m.workload == r.workload and m.threads == r.threads for r in results)]
        update_manifest(path, measured=tuple(keep + results))
    return results


@serde.serializable("Validation")
@dataclass(frozen=True)
class Validation:
    """The verdict of :func:`validate`: prediction vs measurement on this machine.

    Absolute (no reference): ``error_pct`` is the measured floor against the predicted latency.
    Relative (``reference`` set): the bundle and the reference were timed in turn, block of runs
    by block of runs, for several rounds, and ``error_pct`` is the measured ratio bundle/reference
    (median over rounds of each round's median block-pair ratio) against the predicted ratio;
    ``measured`` is then the bundle's measurement from the median round.
    """

    bundle: str
    workload: Workload
    predicted_ms: float
    prediction_provenance: str
    measured: LatencyMeasurement
    error_pct: float  # (measured floor - predicted) / predicted; relative: (measured ratio - predicted) / predicted
    tolerance_pct: float
    passed: bool
    repredicted_ms: float | None = None  # the target's current table on the bundle's spec
    reference: str | None = None
    reference_predicted_ms: float | None = None
    predicted_ratio: float | None = None  # predicted_ms / reference_predicted_ms
    measured_ratio: float | None = None  # median over rounds of the median block-pair ratio bundle/reference
    rounds: int | None = None

    @property
    def measured_ms(self) -> float:
        """What is compared: the floor (fastest block median; see exporters.timing), else the median."""
        return self.measured.reference_ms

    def summary(self) -> str:
        verdict = "within" if self.passed else "OUTSIDE"
        if self.reference is not None:
            return (f"latency relative to {self.reference}: predicted {self.predicted_ratio:.3f}× "
                    f"({self.predicted_ms:.2f} / {self.reference_predicted_ms:.2f} ms), measured "
                    f"{self.measured_ratio:.3f}× (median of {self.rounds} rounds timed in turn; this bundle "
                    f"{self.measured_ms:.2f} ms floor) ({self.error_pct:+.1f}%, {verdict} ±{self.tolerance_pct:g}%) — "
                    f"{self.workload.describe()}")
        return (f"predicted {self.predicted_ms:.2f} ms, measured {self.measured_ms:.2f} ms "
                f"(floor; median {self.measured.median_ms:.2f}) ({self.error_pct:+.1f}%, {verdict} "
                f"±{self.tolerance_pct:g}%) — {self.workload.describe()}")


@dataclass(frozen=True)
class _Prediction:
    workload: Workload
    predicted_ms: float
    provenance: str
    repredicted_ms: float | None


def _bundle_prediction(b: OpenBundle, path: str | Path, target: str | None, workload: Workload | None) -> _Prediction:
    """What ``validate`` compares bundle ``b`` with: its manifest's prediction, or one made now with
    ``target``'s table (also when ``workload`` is not the manifest's)."""
    from llmshrink.errors import UnknownNameError
    from llmshrink.targets.predict import NoTableError, predict
    from llmshrink.targets.profile import load_target

    m = b.manifest
    if target is None and m.predicted_latency_ms is None:
        raise UsageError(f"Bundle {path} has no predicted latency (exported without a target, or the target had "
                         "no table).", "Pass --target NAME (e.g. cpu) to predict it now, or re-export with --target.")
    workload = workload or m.workload
    profile = None
    try:  # the manifest names the target; a user target's YAML may not travel with the bundle
        profile = load_target(target or m.target) if (target or m.target) else None
    except (UnknownNameError, UsageError):
        if target is not None:
            raise
    workload = workload or (profile.default_workload if profile else None)
    repredicted = None
    if profile is not None:
        try:
            repredicted = predict(b.spec, profile, workload)
        except NoTableError:
            if target is not None:
                raise
    if target is None and workload == m.workload:
        predicted, provenance = float(m.predicted_latency_ms), m.prediction_provenance or "manifest"
    elif repredicted is not None:
        predicted, provenance = repredicted.total_ms, prediction_provenance(repredicted)
    else:
        raise UsageError(f"The manifest of {path} predicts {m.workload}, not {workload}, and its target {m.target!r} "
                         "cannot be loaded here to predict again.", "Pass --target with the target's name or YAML.")
    if workload.context + workload.new_tokens + 1 > m.max_length:
        raise UsageError(f"Workload {workload} needs more positions than the max_length {m.max_length} of {path}.")
    return _Prediction(workload, predicted, provenance, repredicted.total_ms if repredicted is not None else None)


def _loadable_target(m, path: str | Path) -> str:
    """The target a bundle's manifest names, checked to load here (a relative check predicts with it)."""
    from llmshrink.errors import UnknownNameError
    from llmshrink.targets.profile import load_target

    if m.target is None:
        raise UsageError(f"Bundle {path} names no target, and a check against a reference needs one table "
                         "to predict both bundles.", "Pass --target NAME (e.g. cpu).")
    try:  # a user target's YAML may not travel with the bundle
        load_target(m.target)
    except (UnknownNameError, UsageError) as e:
        raise UsageError(f"A check against a reference predicts both bundles with the target's table, and "
                         f"the target {m.target!r} that {path} names cannot be loaded here ({e}).",
                         "Pass --target with the target's name or YAML.") from None
    return m.target


def validate(path: str | Path, *, tolerance_pct: float = 10.0, target: str | None = None,
             workload: Workload | None = None, runs: int = 50, threads: int | None = None,
             reference: str | Path | None = None, rounds: int = 5,
             record: bool = True, progress: Progress = NULL_PROGRESS) -> Validation:
    """Measure a bundle for its manifest's workload and compare with the manifest's prediction.

    With ``target`` (or when the manifest has no prediction) the prediction
    is made now from the bundle's spec and that target's table. With
    ``record``, the measurement and the verdict are written into the manifest.
    The measured figure is the floor (the fastest of the block medians): on a
    shared machine neighbours lift medians by up to 30 % in spells of seconds,
    and tables are measured the same way (see ``exporters.timing``).
    The error is relative to the prediction: users budget by the predicted
    number, so "10 %" means the bundle is at most 10 % off what was promised.

    With ``reference`` (another bundle of the same target, e.g. the uniform
    int4 export), the check is relative: both bundles are timed in turn,
    block of runs by block of runs (:func:`~llmshrink.exporters.timing.time_in_turn`),
    for ``rounds`` rounds, and the measured ratio bundle/reference (median
    over rounds of each round's median block-pair ratio) is compared with the
    predicted ratio. On a shared machine whose
    speed drifts by tens of percent within the hour (ours does), an absolute
    check fails on the neighbours, not on the prediction; the ratio of two
    graphs timed seconds apart does not move with them. It checks the table's
    *relative* accuracy only: the absolute figures are reported, not judged.

    Raises:
        UsageError: the bundle (or reference) has no target/prediction and none was given.
        ValidationFailedError (exit 4): the measurement is outside the tolerance.
    """
    import statistics

    from llmshrink.errors import ValidationFailedError
    from llmshrink.exporters.timing import time_decoder, time_in_turn

    if reference is not None and rounds < 1:
        raise UsageError(f"rounds must be at least 1, not {rounds}.")
    b = open_bundle(path, threads=threads)
    m = b.manifest
    if reference is not None and target is None:
        # Both predictions from one table, made now: a ratio of numbers from two tables means nothing.
        target = _loadable_target(m, path)
    pred = _bundle_prediction(b, path, target, workload)
    workload, predicted = pred.workload, pred.predicted_ms
    if reference is None:
        with progress.task(f"Timing {workload}", total=None):
            measured = time_decoder(b.decoder, workload, vocab_size=b.spec.base.vocab_size, runs=runs)
        err = (measured.reference_ms - predicted) / predicted * 100
        v = Validation(bundle=str(path), workload=workload, predicted_ms=predicted,
                       prediction_provenance=pred.provenance, measured=measured, error_pct=err,
                       tolerance_pct=tolerance_pct, passed=abs(err) <= tolerance_pct,
                       repredicted_ms=pred.repredicted_ms)
    else:
        rb = open_bundle(reference, threads=threads)
        rpred = _bundle_prediction(rb, reference, target, workload)
        mine: list = []
        ratios: list[float] = []
        with progress.task(f"Timing {workload}, in turn with {reference}", total=rounds) as task:
            for _ in range(rounds):
                p = time_in_turn(b.decoder, rb.decoder, workload, runs=runs,
                                 vocab_sizes=(b.spec.base.vocab_size, rb.spec.base.vocab_size))
                mine.append(p.first)
                ratios.append(p.ratio)
                task.advance()
        got, want = statistics.median(ratios), predicted / rpred.predicted_ms
        measured = mine[sorted(range(rounds), key=ratios.__getitem__)[(rounds - 1) // 2]]  # the median round's
        err = (got - want) / want * 100
        v = Validation(bundle=str(path), workload=workload, predicted_ms=predicted,
                       prediction_provenance=pred.provenance, measured=measured, error_pct=err,
                       tolerance_pct=tolerance_pct, passed=abs(err) <= tolerance_pct,
                       repredicted_ms=pred.repredicted_ms, reference=str(reference),
                       reference_predicted_ms=rpred.predicted_ms, predicted_ratio=want, measured_ratio=got,
                       rounds=rounds)
    if record:
        keep = [x for x in m.measured if not (x.workload == measured.workload and x.threads == measured.threads)]
        verdict = {k: v for k, v in serde.to_dict(v)["_data"].items() if k != "measured"}
        verdict["date"] = now_iso()
        update_manifest(path, measured=tuple(keep + [measured]), validation=verdict)
    if not v.passed:
        hint = f"Prediction source: {pred.provenance}."
        if v.repredicted_ms is not None and abs(v.repredicted_ms - predicted) > tolerance_pct / 100 * predicted:
            hint += (f" The target's table predicts {v.repredicted_ms:.2f} ms for this spec now: the manifest's "
                     "prediction does not come from it (edited, or made with another table).")
        elif reference is None:
            hint += (" If the machine is busy, re-run; if the table is stale, re-profile the target; on a shared "
                     "machine, check against a reference bundle timed in turn (--reference).")
        else:
            hint += " The table ranks these two graphs wrongly on this machine: re-profile the target here."
        err = ValidationFailedError(f"Latency check failed: {v.summary()}.", hint)
        err.validation = v
        raise err
    return v



def compress(model: str = "smollm2-135m", *, target: str, latency_ms: float | str | Sequence[float | str],
             out: str | Path, params_budget: float | None = None, workload: Workload | str | None = None,
             strategy: str = "joint", space: str | Path | None = None, steps: int | None = None,
             recovery_steps: int | None = None, calib_data: str = "self", tolerance_pct: float = 10.0,
             seed: int = 0, resume: bool = False, progress: Progress = NULL_PROGRESS):
    """Compress ``model`` for ``target`` under ``latency_ms`` (one budget or several) into run directory ``out``.

    A budget is milliseconds (``30`` or ``"30ms"``) or relative to a uniform
    export of the model (``"0.7xint4"``: 70 % of what the target's table
    predicts for it; the run's notes say what it resolved to).
    The Python face of ``llmshrink compress`` (see :mod:`llmshrink.compressor.pipeline`).
    Returns a :class:`~llmshrink.compressor.pipeline.CompressResult`: ``.record.candidates``
    holds per budget the bundle path, predicted and measured latency and validation verdict;
    ``.report`` the report.md path.

    Raises:
        InfeasibleBudgetError: a budget is below the fastest subnet of the space (exit code 3).
        UsageError: bad input, or ``out`` holds another run.
    """
    from llmshrink.compressor.config import CompressConfig
    from llmshrink.compressor.pipeline import compress as run
    from llmshrink.compressor.recover import RecoveryConfig
    from llmshrink.compressor.search import SearchConfig
    from llmshrink.targets.workload import parse_workload

    wl = parse_workload(workload) if isinstance(workload, str) else workload
    budgets, notes, reference = _resolve_budgets(latency_ms, model, target, wl, progress)
    cfg = CompressConfig(
        model=model, target=target, budgets_ms=budgets, params_budget=params_budget, workload=wl,
        space=str(Path(space).resolve()) if space else None, calib_data=calib_data,
        search=SearchConfig() if steps is None else SearchConfig(steps=steps),
        recovery=RecoveryConfig() if recovery_steps is None else RecoveryConfig(steps=recovery_steps),
        tolerance_pct=tolerance_pct, seed=seed, strategy=strategy, reference=reference)
    return run(cfg, out, resume=resume, progress=progress, notes=notes)


def _resolve_budgets(latency, model: str, target: str, workload: Workload | None,
                     progress: Progress) -> tuple[tuple[float, ...], tuple[str, ...], str | None]:
    """Budgets in ms, a note per relative one saying what it resolved to, and the format validated against.

    The first relative budget's format (its canonical name) becomes the run's reference: bundles are
    validated relative to the unpruned model exported in it (see ``CompressConfig.reference``).
    """
    from llmshrink.compressor.budget import Budget, parse_budgets
    from llmshrink.formats import parse_format

    items = [latency] if isinstance(latency, (int, float, str)) else list(latency)
    terms = [t for x in items for t in (parse_budgets(x) if isinstance(x, str) else (Budget(float(x)),))]
    if not any(t.relative_to for t in terms):
        return tuple(dict.fromkeys(t.value for t in terms)), (), None
    from llmshrink.models import load_config, resolve_model
    from llmshrink.spec import BaseShape
    from llmshrink.targets.predict import table_for
    from llmshrink.targets.profile import load_target

    tgt = load_target(target)
    table = table_for(tgt)
    base = BaseShape.from_config(load_config(resolve_model(model), progress=progress))
    resolved = [t.resolve(base, tgt, workload or tgt.default_workload, table) for t in terms]
    reference = parse_format(next(t.relative_to for t in terms if t.relative_to)).name
    return tuple(dict.fromkeys(ms for ms, _ in resolved)), tuple(n for _, n in resolved if n), reference
