"""JSON round-trip for llmshrink's frozen dataclasses.

Each object is written as ``{"_type": NAME, "_version": N, "_data": {...}}``
(the torchao config convention). Only types registered here can be read
back, so a JSON file can never name an arbitrary class to build. Nested
dataclasses are plain JSON objects, decoded by the field annotations; lists
come back as tuples (our dataclasses are frozen and use tuples).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from llmshrink.errors import UsageError

_TYPES: dict[str, tuple[type, int]] = {}


def serializable(name: str, version: int = 1):
    """Class decorator: allow ``cls`` in serialized files under ``name`` at ``version``."""

    def deco(cls):
        if name in _TYPES and _TYPES[name][0] is not cls:
            raise ValueError(f"serde type {name!r} registered twice")
        _TYPES[name] = (cls, version)
        cls._serde_name = name
        return cls

    return deco


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def to_dict(obj: Any) -> dict:
    """Encode a registered dataclass instance as a tagged dict.

    Only the outer object is tagged; nested dataclasses are plain objects
    (their types come from the field annotations), so files stay readable.
    """
    name = getattr(type(obj), "_serde_name", None)
    if name is None:
        raise TypeError(f"{type(obj).__name__} is not registered with llmshrink.serde")
    return {"_type": name, "_version": _TYPES[name][1], "_data": _encode(obj)}


def _decode(value: Any, tp: Any, where: str) -> Any:
    """Decode ``value`` into type ``tp`` (dataclass, Optional, tuple, dict or a plain type)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _decode(value, inner[0], where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected an object for {tp.__name__}, found {type(value).__name__}.")
        return _build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise UsageError(f"{where}: expected a list, found {type(value).__name__}.")
        item = args[0] if args else Any
        return tuple(_decode(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected an object, found {type(value).__name__}.")
        item = args[1] if len(args) == 2 else Any
        return {k: _decode(v, item, f"{where}.{k}") for k, v in value.items()}
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise UsageError(f"{where}: unknown fields {', '.join(sorted(unknown))}.")
    try:
        return cls(**{k: _decode(v, hints[k], f"{where}.{k}") for k, v in data.items()})
    except TypeError as e:
        raise UsageError(f"{where} is incomplete or malformed: {e}") from e


def from_dict(d: dict, expect: type | None = None) -> Any:
    """Decode a tagged dict written by :func:`to_dict`.

    Raises:
        UsageError: unknown type, newer version than this llmshrink reads,
            wrong type, or fields that do not fit.
    """
    if not isinstance(d, dict) or "_type" not in d or "_data" not in d:
        raise UsageError("Not an llmshrink file: expected an object with _type, _version and _data.")
    name, version = d["_type"], d.get("_version", 1)
    if name not in _TYPES:
        raise UsageError(f"Unknown object type {name!r} in file.", f"Known: {', '.join(sorted(_TYPES))}.")
    cls, current = _TYPES[name]
    if version > current:
        raise UsageError(f"{name} version {version} is newer than this llmshrink reads ({current}).",
                         "Upgrade llmshrink.")
    if expect is not None and not issubclass(cls, expect):
        raise UsageError(f"Expected a {getattr(expect, '_serde_name', expect.__name__)}, found {name}.")
    return _build(cls, d["_data"], name)


def dumps(obj: Any) -> str:
    """Indented JSON of a registered dataclass instance."""
    return json.dumps(to_dict(obj), indent=2) + "\n"


def loads(text: str, expect: type | None = None) -> Any:
    """Inverse of :func:`dumps`."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"Not valid JSON: {e}.") from e
    return from_dict(d, expect)
