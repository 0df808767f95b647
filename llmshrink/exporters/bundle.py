"""Bundles: what llmshrink ships. A directory a device can run with nothing else.

::

    DIR/
      model.onnx            (+ model.onnx.data when the model is over ~2 GB)
      tokenizer.json, tokenizer_config.json, chat_template.jinja, ...
      spec.json             the SubnetSpec the model was built from
      manifest.json         what, from what, for which target and workload;
                            predicted and measured latency; sha256 of every file

The manifest is written last, so a bundle without one is incomplete. Every
file except the manifest is hashed into it; :func:`verify_bundle` checks
them before a bundle is run: :func:`open_bundle` verifies and opens an ONNX
Runtime session, :func:`generate_text` streams text from it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from llmshrink import serde, storage
from llmshrink.errors import IntegrityError, UsageError
from llmshrink.exporters.timing import LatencyMeasurement
from llmshrink.spec import SubnetSpec
from llmshrink.targets.workload import Workload
from llmshrink.version import __version__

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA = "model.onnx.data"
# protobuf's hard limit is 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@serde.serializable("Manifest")
@dataclass(frozen=True)
class Manifest:
    """Provenance, latency and integrity record of a bundle (see module docstring)."""

    flavour: str
    model_source: str
    model_fingerprint: str
    spec_fingerprint: str
    max_length: int
    precision: dict[str, int]
    num_params: int
    files: dict[str, str]
    tool_versions: dict[str, str]
    created: str
    target: str | None = None
    workload: Workload | None = None
    predicted_latency_ms: float | None = None
    prediction_provenance: str | None = None
    measured: tuple[LatencyMeasurement, ...] = ()
    parity: dict[str, float] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    validation: dict[str, object] = field(default_factory=dict)  # the last `llmshrink validate` verdict
    quantizer: str | None = None  # how integer weights were rounded: gptq or rtn (None: before it was recorded)


def tool_versions() -> dict[str, str]:
    """Versions of the libraries that shaped a bundle."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"llmshrink": __version__}
    for dist in ("torch", "transformers", "onnx", "onnxruntime"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write_bundle(directory: str | Path, model, tokenizer, spec, manifest_fields: dict) -> Manifest:
    """Write a complete bundle atomically and return its manifest.

    Args:
        directory: the bundle directory (replaced if it exists).
        model: an ``onnx.ModelProto``.
        tokenizer: the HF tokenizer to ship.
        spec: the :class:`~llmshrink.spec.SubnetSpec`.
        manifest_fields: Manifest fields other than ``files``, ``tool_versions``, ``created``.
    """
    import onnx

    directory = Path(directory)
    with storage.atomic_directory(directory) as tmp:
        if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
            onnx.save_model(model, str(tmp / MODEL_FILE), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=EXTERNAL_DATA, size_threshold=1024)
        else:
            storage.atomic_write_bytes(tmp / MODEL_FILE, model.SerializeToString())
        tokenizer.save_pretrained(tmp)
        storage.atomic_write_text(tmp / "spec.json", spec.to_json())
        files = {p.relative_to(tmp).as_posix(): storage.sha256_file(p)
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = Manifest(files=files, tool_versions=tool_versions(), created=now_iso(), **manifest_fields)
        storage.atomic_write_text(tmp / MANIFEST, serde.dumps(manifest))
    return manifest


def load_manifest(directory: str | Path) -> Manifest:
    """Read ``manifest.json`` of a bundle.

    Raises:
        UsageError: not a bundle directory.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UsageError(f"{directory} is not an llmshrink bundle (no {MANIFEST}).",
                         "Make one with `llmshrink export` or `llmshrink compress`.")
    return serde.loads(path.read_text(), expect=Manifest)


def verify_bundle(directory: str | Path) -> Manifest:
    """Check every file's sha256 against the manifest; return the manifest.

    Raises:
        IntegrityError: a file is missing or differs (all such files are named).
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    bad = []
    for rel, digest in manifest.files.items():
        p = directory / rel
        if not p.is_file():
            bad.append(f"{rel} (missing)")
        elif storage.sha256_file(p) != digest:
            bad.append(f"{rel} (changed)")
    if bad:
        raise IntegrityError(f"Bundle {directory} does not match its manifest: {', '.join(bad)}.",
                             "Rebuild the bundle, or copy it again from its source.")
    return manifest


def update_manifest(directory: str | Path, **changes) -> Manifest:
    """Rewrite the manifest with ``changes`` (files and their hashes are untouched)."""
    manifest = replace(load_manifest(directory), **changes)
    storage.atomic_write_text(Path(directory) / MANIFEST, serde.dumps(manifest))
    return manifest


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


def open_bundle(path: str | Path, *, threads: int | None = None, verify: bool = True,
                session: bool = True) -> OpenBundle:
    """Verify a bundle's hashes and open an ONNX Runtime session on it (``session=False``: no session,
    ``decoder`` is None — for a TensorRT bundle timed through its engine).

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
    return OpenBundle(path, manifest, spec, tokenizer,
                      OrtDecoder(path / MODEL_FILE, threads=threads) if session else None)


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
