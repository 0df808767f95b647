"""Export: a spec or a materialized model → ONNX graph in a flavour → parity check → bundle.

:data:`FLAVOURS` is the registry of ONNX flavours (``ort``: contrib ops for
ONNX Runtime; ``trt``: standard opset-21 ops for TensorRT), each a cheap
spec check, a graph builder and a check of the built graph.
:func:`export` materializes a spec of a model and exports it;
:func:`export_compressed` exports a :class:`~llmshrink.compressor.model.CompressedModel`
(what ``compress`` recovered). Every export checks parity with the torch
model (:mod:`.parity`) and writes a bundle (:mod:`.bundle`) whose manifest
carries the target's predicted latency.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmshrink.compressor.calibration_text import (
    calibration_needs_model,
    calibration_tokens,
    export_calib_config,
)
from llmshrink.errors import LlmshrinkError, UsageError
from llmshrink.exporters.bundle import Manifest, write_bundle
from llmshrink.formats import LAYER_STREAMING
from llmshrink.host import release_freed_memory
from llmshrink.models.data import DEFAULT_CALIB_DATA
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


def streams_layers(choice: str, source, spec: SubnetSpec, calib_rows: int, seq_len: int,
                   progress: Progress = NULL_PROGRESS) -> bool:
    """Whether :func:`export` builds ``spec`` layer by layer from disk (:func:`.streamed.materialize_streamed`).

    ``on``: always (UsageError where it cannot: a hub id, or a directory without safetensors; built-in models
    and GGUF files are converted to one first). ``off``: never. ``auto``: when the
    whole-model path's peak by the plan's formula (:func:`~llmshrink.compressor.plan.gptq_bytes`, the loaded model
    plus the one being built) would not fit in the memory available now, and the checkpoint is safetensors. Both
    paths build the same model in about the same time (``benchmarks/gptq_streaming.py``); the whole one, which
    ``compress`` runs too, is kept where it fits.
    """
    from llmshrink.compressor.plan import FIT_FRACTION, ModelShape, gptq_bytes
    from llmshrink.host import available_memory_bytes
    from llmshrink.models import load_config
    from llmshrink.models.info import count_params
    from llmshrink.models.lazy import has_safetensors
    from llmshrink.models.load import local_dir

    if choice not in LAYER_STREAMING:
        raise UsageError(f"Unknown layer streaming choice {choice!r}.", f"Use one of: {', '.join(LAYER_STREAMING)}.")
    if choice == "off":
        return False
    if source.kind == "hub":  # read through transformers' cache, not a directory of ours
        if choice == "on":
            raise UsageError(f"Layer streaming reads a local checkpoint; {source.describe()} is a hub id.",
                             "Download it (`huggingface-cli download ID --local-dir DIR`) and pass --model DIR, "
                             "or use --layer-streaming off.")
        return False
    with progress.task("Checking the checkpoint"):
        on_disk = has_safetensors(local_dir(source, progress=progress))
    if choice == "on":
        if not on_disk:
            raise UsageError(f"{source.describe()} has no safetensors checkpoint to stream layers from.",
                             "Use --layer-streaming off (the whole model is loaded), or save the model with "
                             "save_pretrained(..., safe_serialization=True).")
        return True
    if not on_disk:
        return False
    config = load_config(source)
    whole = gptq_bytes(ModelShape(spec.base, count_params(config)), calib_rows, seq_len, 4)
    return whole > FIT_FRACTION * available_memory_bytes()


def export(model: str, spec: SubnetSpec | str | Path | None, out: str | Path, *, flavour: str | None = None,
           target: str | None = None, max_length: int = 2048, trust_remote_code: bool = False,
           calib_data: str = DEFAULT_CALIB_DATA, quantizer: str = "gptq", layer_streaming: str = "auto",
           progress: Progress = NULL_PROGRESS) -> Manifest:
    """Materialize ``spec`` of ``model``, export it, check parity, and write a bundle at ``out``.

    The spec is checked against the model's shape, the target's kernels (when
    a target is given) and the flavour's kernels before any weights are loaded.
    The flavour defaults to the target's (``ort`` without a target).
    ``quantizer``: ``gptq`` (default) or ``rtn`` for integer weights, recorded in the manifest.
    ``calib_data`` (as ``compress --calib-data``) is read when the spec needs text: GPTQ and
    static activation scales (``w8a8s``) use the sequences ``compress`` calibrates on.
    ``layer_streaming`` (see :func:`streams_layers`): build the model one decoder layer at a time from the
    safetensors checkpoint, never loading it whole; the same model either way.

    Raises:
        SpecError / UsageError: the spec does not fit the model or the flavour.
        ParityError: the exported graph does not reproduce the torch model.
    """

    from llmshrink.compressor.calibrate import needs_calibration
    from llmshrink.compressor.materialize import materialize, uses_gptq
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
    needs_text = needs_calibration(spec) or uses_gptq(spec, quantizer)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code, progress=progress)
    calib_config = export_calib_config(source, calib_data)
    if streams_layers(layer_streaming, source, spec, calib_config.n_quant, calib_config.search.seq_len, progress):
        from llmshrink.compressor.streamed import materialize_streamed
        from llmshrink.models.lazy import LazyModel

        calib = None
        if needs_text:
            # self-generated text not sampled yet needs the model whole, once; it is freed before the build
            sampler = load_model(source, trust_remote_code=trust_remote_code, progress=progress) \
                if calibration_needs_model(source, calib_data) else None
            calib = calibration_tokens(sampler, tokenizer, source, calib_data, progress)
            if sampler is not None:
                del sampler
                gc.collect()
                release_freed_memory()
        lazy = LazyModel(source, progress=progress)
        with progress.task("Materializing and quantizing the subnet, layer by layer from disk"):
            cm = materialize_streamed(lazy, spec, tokenizer, calib=calib, quantizer=quantizer, progress=progress)
    else:
        hf = load_model(source, trust_remote_code=trust_remote_code, progress=progress)
        calib = calibration_tokens(hf, tokenizer, source, calib_data, progress) if needs_text else None
        with progress.task("Materializing and quantizing the subnet"):
            cm = materialize(hf, spec, tokenizer, calib=calib, quantizer=quantizer, progress=progress)
        del hf
    return export_compressed(cm, tokenizer, out, flavour=flavour, target=profile, model_source=source.describe(),
                             model_fingerprint=fingerprint(source), max_length=max_length, quantizer=quantizer,
                             progress=progress)


def export_compressed(cm, tokenizer, out: str | Path, *, flavour: str, target=None, workload: Workload | None = None,
                      model_source: str = "", model_fingerprint: str = "", max_length: int = 2048,
                      notes: tuple[str, ...] = (), quantizer: str | None = None,
                      progress: Progress = NULL_PROGRESS) -> Manifest:
    """Export a materialized (possibly recovered) :class:`CompressedModel`: graph, parity check, bundle.

    ``target`` (a TargetProfile) and ``workload`` (default: the target's) set the
    manifest's predicted latency; ``quantizer`` (gptq or rtn) is recorded when the model has integer weights.

    Raises:
        ParityError: the exported graph does not reproduce the torch model.
    """
    import numpy as np

    from llmshrink.exporters.ort_session import OrtDecoder
    from llmshrink.exporters.parity import PARITY_TEXT, check_parity

    fl = FLAVOURS.get(flavour)()
    spec = cm.spec
    fl.check_spec(spec)
    cm = cm.to("cpu")  # a model trained on a GPU: the graph is written, and its parity checked, on the host
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
                  target=target.name if target else None, workload=workload, notes=tuple(notes),
                  quantizer=quantizer if any(m.quantized is not None for m in _linears(cm)) else None)
    if target is not None:
        pred = _prediction_fields(spec, target, workload)
        fields["notes"] = fields["notes"] + pred.pop("notes", ())
        fields.update(pred)
    with progress.task(f"Writing bundle {out}"):
        return write_bundle(out, graph, tokenizer, spec, fields)


def _linears(cm):
    from llmshrink.compressor.model import QuantLinear

    return [m for m in cm.modules() if isinstance(m, QuantLinear)]


def _prediction_fields(spec: SubnetSpec, profile, workload: Workload | None = None) -> dict:
    """Manifest fields for the target's predicted latency (none when the target has no table yet)."""
    from llmshrink.targets.predict import NoTableError, predict

    try:
        p = predict(spec, profile, workload)
    except NoTableError as e:
        return {"notes": (f"No predicted latency: {e.message}",)}
    return {"predicted_latency_ms": p.total_ms, "prediction_provenance": prediction_provenance(p)}
