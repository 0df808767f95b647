"""`llmshrink export`, `run` and `bench`: build, use and measure bundles."""

from __future__ import annotations

from pathlib import Path

import click

from llmshrink.cli.ui import err, kv_table, out, print_json, progress, warn
from llmshrink.formats import LAYER_STREAMING, QUANTIZERS
from llmshrink.models.data import DEFAULT_CALIB_DATA


@click.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help="Model to export (built-in name, directory, .gguf or hub id).")
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="SubnetSpec JSON (default: the unpruned fp32 model).")
@click.option("--target", default=None, help="Target name or YAML (see `llmshrink targets list`): checks the spec's formats against its kernels and picks the flavour.")
@click.option("--flavour", type=click.Choice(["ort", "trt"]), default=None,
              help="ort: ONNX Runtime contrib ops (CPU). trt: standard ONNX for TensorRT (fp16, w4g*, w8a8s formats), checked statically. Default: the target's, else ort.")
@click.option("--max-length", default=2048, show_default=True, type=click.IntRange(16), help="Longest prompt + generation the bundle supports.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Bundle directory to write (replaced if it exists).")
@click.option("--quantizer", type=click.Choice(QUANTIZERS), default="gptq", show_default=True,
              help="How integer weights are rounded: gptq (error-compensating, on calibration text) or rtn "
                   "(each weight to its nearest grid point; no text). Recorded in the manifest.")
@click.option("--calib-data", default=DEFAULT_CALIB_DATA, show_default=True,
              help="Text GPTQ and the static activation scales of w8a8s layers are calibrated on (as compress's "
                   "--calib-data: `wiki`, `self`, a .txt/.jsonl/.parquet file or a dataset id); unused by float specs.")
@click.option("--layer-streaming", type=click.Choice(LAYER_STREAMING), default="auto", show_default=True,
              help="Build the model one decoder layer at a time from its safetensors checkpoint, never loading it "
                   "whole (peak: the quantized model + one layer + the calibration states). auto: only where the "
                   "whole model's path would not fit in the memory available now. Same model, about the same time. "
                   "Needs a local checkpoint (a directory, a .gguf or a built-in name; not a hub id).")
@click.option("--trust-remote-code", is_flag=True, help="Allow code shipped with a hub model to run.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export(model_name: str, spec_path: Path | None, target: str | None, flavour: str | None, max_length: int,
           out_dir: Path, quantizer: str, calib_data: str, layer_streaming: str, trust_remote_code: bool,
           as_json: bool) -> None:
    """Build a bundle (ONNX model + tokenizer + spec + manifest) from a spec.

    The spec is validated against the model before any weights are loaded;
    the exported graph is checked against the torch model before the bundle
    is written.

    \b
    Examples:
      llmshrink export --out bundles/fp32
      llmshrink spec new --uniform int4 --out int4.json && llmshrink export --spec int4.json --out bundles/int4
      llmshrink spec new --uniform w4g64 --lm-head fp16 --out trt.json && llmshrink export --spec trt.json --target a100 --out bundles/a100
      llmshrink spec new --uniform w8a8s --lm-head fp16 --out w8.json && llmshrink export --spec w8.json --target a100 --out bundles/a100-int8
    """
    from llmshrink import api, serde

    with progress(not as_json) as p:
        manifest = api.export(model_name, spec_path, out_dir, flavour=flavour, target=target, max_length=max_length,
                              trust_remote_code=trust_remote_code, calib_data=calib_data, quantizer=quantizer,
                              layer_streaming=layer_streaming, progress=p)
    if as_json:
        print_json(serde.to_dict(manifest)["_data"])
        return
    par = manifest.parity
    out.print(kv_table({
        "bundle": out_dir, "flavour": manifest.flavour, "target": manifest.target or "-", "model": manifest.model_source,
        "spec": manifest.spec_fingerprint, "parameters": f"{manifest.num_params:,}",
        "precision": ", ".join(f"{k}×{v}" for k, v in manifest.precision.items()),
        "parity": f"{par['rule']}: max|d| {par['max_abs_diff']:.2g}, top-1 {par['top1_agreement']:.1%} ({par['tokens']} tokens)",
        "predicted latency": (f"{manifest.predicted_latency_ms:.2f} ms — {manifest.workload.describe()} "
                              f"({manifest.prediction_provenance})") if manifest.predicted_latency_ms else "-",
        "files": len(manifest.files),
    }, title="Exported"))
    if manifest.predicted_latency_ms and manifest.prediction_provenance.startswith("analytical"):
        warn("The predicted latency is ANALYTICAL (a roofline from datasheet numbers); build the engine on the "
             "device and run `llmshrink validate` there.")


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", required=True, help="The user message (or raw text with --no-chat).")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--chat/--no-chat", default=True, show_default=True, help="Wrap the prompt in the model's chat template.")
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=0.7, show_default=True, help="With --sample.")
@click.option("--top-p", default=0.9, show_default=True, help="With --sample.")
@click.option("--seed", default=0, show_default=True, help="With --sample.")
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads (default: all cores).")
def run(bundle: Path, prompt: str, max_new_tokens: int, chat: bool, sample: bool, temperature: float, top_p: float,
        seed: int, threads: int | None) -> None:
    """Generate text from a bundle, streaming it (file hashes are checked first).

    \b
    Example:
      llmshrink run bundles/int4 --prompt "What is the capital of France?"
    """
    import sys

    from llmshrink import api

    b = api.open_bundle(bundle, threads=threads)
    for piece in api.generate_text(b, prompt, max_new_tokens=max_new_tokens, chat=chat, do_sample=sample,
                                   temperature=temperature, top_p=top_p, seed=seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--workload", "workloads", multiple=True, default=("decode:ctx=256",), show_default=True,
              help="PHASE[:ctx=N,batch=B,new=M]; phases decode, prefill, e2e. Repeatable.")
@click.option("--runs", default=20, show_default=True, type=click.IntRange(1), help="Timed runs per workload (after warm-up).")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(0))
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--no-record", is_flag=True, help="Do not store the measurements in the bundle's manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench(bundle: Path, workloads: tuple[str, ...], runs: int, warmup: int, threads: int | None, no_record: bool,
          as_json: bool) -> None:
    """Measure a bundle's latency on this machine: median, floor and p90 per workload.

    Runs are timed in blocks; the floor is the fastest block median (the
    machine's uncontended speed, what latency tables and `validate` use).

    \b
    Examples:
      llmshrink bench bundles/int4 --workload decode:ctx=256 --workload prefill:ctx=128
      llmshrink bench bundles/int4 --workload e2e:ctx=133,new=64 --runs 5 --json
    """
    from rich.table import Table

    from llmshrink import api, serde
    from llmshrink.targets.workload import parse_workload

    parsed = [parse_workload(w) for w in workloads]
    with progress(not as_json) as p:
        results = api.bench(bundle, parsed, runs=runs, warmup=warmup, threads=threads, record=not no_record, progress=p)
    if as_json:
        print_json([serde.to_dict(r)["_data"] for r in results])
        return
    t = Table(title=f"{bundle} on {results[0].host}")
    for col in ("workload", "median ms", "floor ms", "p90 ms", "mean±std", "runs", "threads", "runtime"):
        t.add_column(col)
    for r in results:
        t.add_row(str(r.workload), f"{r.median_ms:.2f}", f"{r.floor_ms:.2f}" if r.floor_ms else "-", f"{r.p90_ms:.2f}",
                  f"{r.mean_ms:.2f} ± {r.std_ms:.2f}", str(r.runs), str(r.threads or "default"),
                  f"{r.runtime} {r.runtime_version}")
    out.print(t)
    if not no_record:
        err.print("recorded in manifest.json", style="dim")


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--max-batch", default=1, show_default=True, type=click.IntRange(1), help="Largest batch the engine accepts.")
@click.option("--workload", "workloads", multiple=True, help="After building, time these workloads (decode/prefill) on the GPU.")
@click.option("--runs", default=20, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def build(bundle: Path, max_batch: int, workloads: tuple[str, ...], runs: int, as_json: bool) -> None:
    """Build the TensorRT engine of a trt-flavour bundle on this machine (needs a GPU).

    Writes model.plan and timing.cache into the bundle, adds them to the
    manifest, and with --workload times the engine (CUDA events, median) and
    records the measurements. Without TensorRT or a CUDA device it exits
    with code 5 and says which is missing.

    \b
    Example:
      llmshrink build bundles/trt --workload decode:ctx=256 --workload prefill:ctx=128
    """
    from llmshrink import serde, storage
    from llmshrink.exporters import tensorrt
    from llmshrink.exporters.bundle import load_manifest, update_manifest, verify_bundle
    from llmshrink.targets.workload import parse_workload

    parsed = [parse_workload(w) for w in workloads]
    tensorrt.require_tensorrt()
    verify_bundle(bundle)
    result = tensorrt.build_engine(bundle, max_batch=max_batch)
    files = dict(load_manifest(bundle).files)
    for p in (result.engine_path, result.timing_cache_path):
        files[p.name] = storage.sha256_file(p)
    manifest = update_manifest(bundle, files=files)
    measured = [tensorrt.time_engine(bundle, w, runs=runs) for w in parsed]
    if measured:
        keep = [m for m in manifest.measured if m.runtime != "tensorrt" or m.workload not in parsed]
        update_manifest(bundle, measured=tuple(keep + measured))
    if as_json:
        print_json({"engine": str(result.engine_path), "seconds": result.seconds, "tensorrt": result.tensorrt_version,
                    "measured": [serde.to_dict(m)["_data"] for m in measured]})
        return
    out.print(f"built {result.engine_path} in {result.seconds:.0f} s (TensorRT {result.tensorrt_version})")
    for m in measured:
        out.print(m.summary())


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tolerance", default="10%", show_default=True,
              help="Largest |measured - predicted| / predicted that passes, e.g. 10% or 0.1.")
@click.option("--target", default=None, help="Predict now with this target's table instead of the manifest's prediction.")
@click.option("--workload", default=None, help="Workload to check (default: the manifest's).")
@click.option("--runs", default=50, show_default=True, type=click.IntRange(5), help="Timed runs (after a 1 s warm-up).")
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--reference", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Check the latency relative to this bundle instead (blocks of runs of both timed in turn, both predicted now "
                   "by the target's table): for shared machines whose speed drifts.")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1),
              help="With --reference: rounds of timing both bundles in turn (the ratio of the two floors is compared).")
@click.option("--no-record", is_flag=True, help="Do not write the measurement and verdict into the manifest.")
@click.option("--adapt", is_flag=True,
              help="Predict now with the target's table adapted to this CPU (when it was measured on another one: "
                   "~3 min, as `targets profile --quick`, kept for later runs). Uses --target, else the manifest's.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def validate(bundle: Path, tolerance: str, target: str | None, workload: str | None, runs: int, threads: int | None,
             reference: Path | None, rounds: int, no_record: bool, adapt: bool, as_json: bool) -> None:
    """Check a bundle's real latency against its prediction; exit 4 when outside the tolerance.

    Measures the manifest's workload on this machine (the bundle's files are
    hash-checked first) and compares the floor (fastest block median) with the
    predicted latency the manifest recorded at export. This is the command to
    run in CI on the device the bundle ships to.

    On a shared machine (a cloud VM, a CI runner) the same graph can time tens
    of percent apart from one hour to the next, so an absolute check fails on
    the neighbours. --reference checks the prediction relative to another
    bundle of the same target instead (say, the uniform int4 export): both are
    timed in turn, a block of runs of one beside a block of the other, and the
    measured ratio must match the predicted one.

    \b
    Examples:
      llmshrink validate bundles/int4
      llmshrink validate bundles/int4 --tolerance 5% --json
      llmshrink validate bundles/int4 --target cpu --workload prefill:ctx=128
      llmshrink validate runs/x/candidates/5.3ms --reference bundles/int4
    """
    from llmshrink import api, serde
    from llmshrink.errors import ValidationFailedError
    from llmshrink.targets.workload import parse_workload

    tol = parse_tolerance(tolerance)
    if adapt:
        from llmshrink.cli.targets import _adapt_here
        from llmshrink.exporters.bundle import load_manifest
        from llmshrink.targets.profile import load_target

        target = target or load_manifest(bundle).target
        _adapt_here(load_target(target), as_json)
    try:
        with progress(not as_json) as p:
            v = api.validate(bundle, tolerance_pct=tol, target=target,
                             workload=parse_workload(workload) if workload else None, runs=runs, threads=threads,
                             reference=reference, rounds=rounds, record=not no_record, progress=p)
    except ValidationFailedError as e:
        if as_json:
            print_json(serde.to_dict(e.validation)["_data"])
        raise
    if as_json:
        d = serde.to_dict(v)["_data"]
        print_json(d)
        return
    out.print(f"PASS  {v.summary()}", style="green", highlight=False)
    out.print(f"prediction: {v.prediction_provenance}", style="dim", highlight=False)


def parse_tolerance(text: str) -> float:
    """``10%`` or ``10`` -> 10.0; ``0.1`` (a fraction below 1) -> 10.0 (percent)."""
    from llmshrink.errors import UsageError

    t = text.strip()
    try:
        v = float(t.rstrip("%"))
    except ValueError:
        raise UsageError(f"--tolerance {text!r} is not a number.", "Write e.g. 10% or 0.1.") from None
    pct = v if t.endswith("%") or v >= 1 else v * 100
    if pct <= 0:
        raise UsageError(f"--tolerance {text!r} must be positive.")
    return pct
