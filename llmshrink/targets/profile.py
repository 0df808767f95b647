"""TargetProfile: a deployment target — device, runtime, the kernels it has, its default workload.

Built-in profiles are YAML files in ``targets/builtin/`` (package data),
registered in the order ``targets list`` shows them (a100 first). A user
target is a YAML file of the same form, passed as ``--target path/to/board.yaml``.

A profile's ``formats`` are the precision formats the search may choose:
only what the target's runtime really runs *and* what llmshrink's exporter
for that runtime can build. ``planned`` lists kernels the hardware has that
llmshrink cannot emit yet, so nobody mistakes them for supported. Every
datasheet number sits in ``datasheet`` with its ``sources``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from llmshrink import serde
from llmshrink.errors import UnknownNameError, UsageError
from llmshrink.formats import parse_format
from llmshrink.registry import suggest
from llmshrink.targets.workload import Workload, parse_workload

RUNTIMES = {"onnxruntime-cpu": "ort", "onnxruntime-cuda": "ort", "tensorrt": "trt"}
BUILTIN_ORDER = ("a100", "h100", "l4", "jetson-orin", "cpu")


@serde.serializable("TargetProfile")
@dataclass(frozen=True)
class TargetProfile:
    """One deployment target (see module docstring)."""

    name: str
    description: str
    device: str
    runtime: str
    formats: tuple[str, ...]
    default_workload: Workload
    memory_bytes: int | None = None
    datasheet: dict[str, float] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    planned: tuple[str, ...] = ()
    table: str | None = None
    notes: tuple[str, ...] = ()
    roofline: dict[str, float] = field(default_factory=dict)  # analytical-table assumptions (see targets.analytical)
    checks: tuple[dict, ...] = ()  # published measurements the analytical table is checked against
    search_formats: tuple[str, ...] = ()  # the precision candidates a search uses by default (empty: all formats)
    # the uniform models a quick table adaptation times (empty: the search formats): the formats whose whole-model
    # price matters most, the search's and the uniform baselines `compress` builds near its usual budgets
    quick_anchors: tuple[str, ...] = ()

    @property
    def adaptation_anchors(self) -> tuple[str, ...]:
        """The formats :func:`~llmshrink.targets.adapt.quick_adapt` times as uniform models on this target."""
        return self.quick_anchors or self.search_formats

    @property
    def flavour(self) -> str:
        """The ONNX flavour exported for this target's runtime."""
        return RUNTIMES[self.runtime]


def _from_yaml(text: str, where: str) -> TargetProfile:
    import yaml

    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"{where} is not valid YAML: {e}") from e
    if not isinstance(d, dict):
        raise UsageError(f"{where} must be a YAML mapping of target fields.")
    required = ("name", "description", "device", "runtime", "formats", "default_workload")
    missing = [k for k in required if k not in d]
    if missing:
        raise UsageError(f"{where} is missing {', '.join(missing)}.", f"A target file needs: {', '.join(required)}.")
    if d["runtime"] not in RUNTIMES:
        raise UsageError(f"{where}: runtime {d['runtime']!r} is not one of {', '.join(RUNTIMES)}.")
    for f in d["formats"]:
        if parse_format(str(f)).name != f:
            raise UsageError(f"{where}: format {f!r} is not written canonically ({parse_format(str(f)).name}).")
    for key in ("search_formats", "quick_anchors"):
        stray = [f for f in d.get(key) or () if f not in d["formats"]]
        if stray:
            raise UsageError(f"{where}: {key} {stray} are not among its formats.")
    known = {f.name for f in TargetProfile.__dataclass_fields__.values()}
    unknown = set(d) - known
    if unknown:
        raise UsageError(f"{where}: unknown fields {', '.join(sorted(unknown))}.",
                         f"A target file may set: {', '.join(sorted(known))}.")
    return TargetProfile(
        name=str(d["name"]), description=str(d["description"]), device=str(d["device"]), runtime=d["runtime"],
        formats=tuple(d["formats"]), default_workload=parse_workload(str(d["default_workload"])),
        memory_bytes=d.get("memory_bytes"), datasheet={k: float(v) for k, v in (d.get("datasheet") or {}).items()},
        sources=tuple(d.get("sources") or ()), planned=tuple(d.get("planned") or ()), table=d.get("table"),
        notes=tuple(d.get("notes") or ()),
        roofline={k: float(v) for k, v in (d.get("roofline") or {}).items()},
        checks=tuple(d.get("checks") or ()),
        search_formats=tuple(d.get("search_formats") or ()),
        quick_anchors=tuple(d.get("quick_anchors") or ()),
    )


def builtin_names() -> list[str]:
    return list(BUILTIN_ORDER)


def load_target(name_or_path: str) -> TargetProfile:
    """A built-in target by name, or a user target from a YAML file.

    Raises:
        UnknownNameError: not a built-in name and not an existing file.
        UsageError: the file is not a valid target.
    """
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UsageError(f"No such target file: {path}.")
        prof = _from_yaml(path.read_text(), str(path))
        if prof.table and Path(prof.table).suffix in (".json", ".gz") and not Path(prof.table).expanduser().is_absolute():
            # a table file named in a target file sits beside it (wherever the command runs from)
            prof = replace(prof, table=str(path.resolve().parent / prof.table))
        return prof
    if name_or_path in BUILTIN_ORDER:
        text = resources.files("llmshrink.targets").joinpath(f"builtin/{name_or_path}.yaml").read_text()
        return _from_yaml(text, f"built-in target {name_or_path}")
    raise UnknownNameError("target", name_or_path, builtin_names(), suggest(name_or_path, builtin_names()))
