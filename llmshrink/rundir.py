"""Run directories: the bundles one compression run produced, and what each one is.

A run directory holds bundles (each a directory with ``manifest.json``) and
optionally ``run.json`` (a :class:`RunRecord`) naming each bundle's role:

- ``original``: the unmodified model, exported — what quality is compared with;
- ``baseline``: a reference point (uniform int4, the sequential method, ...);
- ``candidate``: a point the search produced; ``selected`` the one shipped.

Without ``run.json`` (e.g. a folder of bundles made by hand with ``llmshrink
export``) the roles are inferred: an unpruned all-fp32 bundle is the
original, every other bundle a candidate. A bundle directory on its own is a
run of one candidate. ``report`` and ``compress`` read and write this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmshrink import serde, storage
from llmshrink.errors import UsageError
from llmshrink.exporters.bundle import MANIFEST, Manifest, load_manifest
from llmshrink.spec import SubnetSpec

RUN_FILE = "run.json"
ROLES = ("selected", "candidate", "baseline", "original")


@serde.serializable("RunEntry")
@dataclass(frozen=True)
class RunEntry:
    """One bundle of a run: its path relative to the run directory, role and display label."""

    path: str
    role: str = "candidate"
    label: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise UsageError(f"Unknown role {self.role!r} for {self.path}.", f"Use one of: {', '.join(ROLES)}.")


@serde.serializable("RunRecord")
@dataclass(frozen=True)
class RunRecord:
    """What a run was asked to do and which bundles it left (``run.json``)."""

    entries: tuple[RunEntry, ...]
    model: str = ""
    target: str | None = None
    strategy: str | None = None
    budgets_ms: tuple[float, ...] = ()
    created: str = ""
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunBundle:
    """A bundle of a run, loaded: its entry, absolute path, manifest and spec."""

    entry: RunEntry
    path: Path
    manifest: Manifest
    spec: SubnetSpec

    @property
    def label(self) -> str:
        return self.entry.label or (Path(self.entry.path).name if self.entry.path != "." else self.path.name)

    @property
    def size_bytes(self) -> int:
        """Bytes of the model files (graph and weights; not the tokenizer)."""
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file() and f.name.startswith("model."))


def is_original(spec: SubnetSpec) -> bool:
    """An unpruned spec with every weight in fp32: the model as loaded."""
    full = SubnetSpec.original(spec.base)
    return (spec.hidden_size == full.hidden_size and spec.lm_head == "fp32" and spec.embedding == "fp32"
            and all((ls.keep, ls.num_heads, ls.num_kv_heads, ls.head_dim, ls.intermediate_size)
                    == (fs.keep, fs.num_heads, fs.num_kv_heads, fs.head_dim, fs.intermediate_size)
                    and set(ls.precision.values()) == {"fp32"} for ls, fs in zip(spec.layers, full.layers, strict=True)))


def write_record(run_dir: str | Path, record: RunRecord) -> Path:
    path = Path(run_dir) / RUN_FILE
    storage.atomic_write_text(path, serde.dumps(record))
    return path


def _discover(run_dir: Path) -> list[RunEntry]:
    if (run_dir / MANIFEST).is_file():
        return [RunEntry(".", "selected")]
    found = sorted(p.parent for pattern in (f"*/{MANIFEST}", f"*/*/{MANIFEST}") for p in run_dir.glob(pattern))
    out = []
    for p in found:
        spec = SubnetSpec.from_json((p / "spec.json").read_text())
        out.append(RunEntry(p.relative_to(run_dir).as_posix(), "original" if is_original(spec) else "candidate"))
    return sorted(out, key=lambda e: (e.role != "original", e.path))


def load_run(run_dir: str | Path) -> tuple[RunRecord | None, list[RunBundle]]:
    """The run's record (None without ``run.json``) and its bundles, in record (else path) order.

    Raises:
        UsageError: the directory does not exist, or holds no bundle.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a directory.", "Give a run directory or a bundle directory.")
    record = serde.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).is_file() else None
    entries = list(record.entries) if record else _discover(run_dir)
    bundles = []
    for e in entries:
        path = (run_dir / e.path).resolve()
        if not (path / MANIFEST).is_file():
            raise UsageError(f"{RUN_FILE} lists {e.path}, but {path} holds no bundle ({MANIFEST} is missing).",
                             f"Re-export it, or remove it from {RUN_FILE}.")
        bundles.append(RunBundle(e, path, load_manifest(path), SubnetSpec.from_json((path / "spec.json").read_text())))
    if not bundles:
        raise UsageError(f"No bundle found in {run_dir} (no */{MANIFEST}).",
                         "Export one with `llmshrink export --out DIR/NAME`, or run `llmshrink compress`.")
    return record, bundles
