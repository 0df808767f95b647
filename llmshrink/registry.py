"""A small generic registry: name -> object, with lazy entries and did-you-mean.

Registries are the single source of truth for named things (built-in models,
targets, exporters, quantization formats). An entry is either the object
itself or a ``"package.module:attr"`` string that is imported on first use, so
listing names never pays for heavy imports.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

from llmshrink.errors import UnknownNameError

T = TypeVar("T")


def suggest(name: str, known: list[str], n: int = 3) -> list[str]:
    """Return up to ``n`` names from ``known``, nearest to ``name`` first.

    Names that contain (or are contained in) ``name`` come first, so
    ``smollm`` finds ``smollm2-135m``; the rest are ranked by edit similarity.
    A typo therefore always gets the closest real names, never nothing.
    """
    q = name.lower()

    def rank(k: str) -> tuple[bool, float]:
        kl = k.lower()
        return (not (q in kl or kl in q), -difflib.SequenceMatcher(None, q, kl).ratio())

    return sorted(known, key=rank)[:n]


class Registry(Generic[T]):
    """An ordered mapping of names to objects of one kind.

    Args:
        kind: what the entries are, for error messages ("model", "target").
        base: if given, every resolved entry must be an instance (or, for
            classes, a subclass) of it.

    Order of registration is kept: ``names()`` lists entries in that order, so
    a registry decides what a listing shows first.
    """

    def __init__(self, kind: str, base: type | None = None) -> None:
        self.kind = kind
        self._base = base
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, obj: T | str, *, overwrite: bool = False) -> None:
        """Add ``obj`` (or a lazy ``"module:attr"`` reference) under ``name``."""
        if name in self._entries and not overwrite:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> T:
        """Return the entry named ``name``, importing it if it is lazy.

        Raises:
            UnknownNameError: no such name; the error carries suggestions.
        """
        if name not in self._entries:
            raise UnknownNameError(self.kind, name, self.names(), suggest(name, self.names()))
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._check(name, entry)
            self._entries[name] = entry
        return entry  # type: ignore[return-value]

    def _check(self, name: str, obj: object) -> None:
        if self._base is None:
            return
        ok = issubclass(obj, self._base) if isinstance(obj, type) else isinstance(obj, self._base)
        if not ok:
            raise TypeError(f"{self.kind} {name!r} is not a {self._base.__name__}")
