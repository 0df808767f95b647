"""Turn what the user typed (``--model M``) into a :class:`ModelSource`.

Precedence, first match wins:

1. a local HF directory (has ``config.json``),
2. a local ``.gguf`` file,
3. a built-in name (``smollm2-135m``),
4. a hub id of the form ``owner/name``.

A bare name that is not built in is an error with suggestions, never a hub
lookup: ``gpt2`` is ambiguous, ``openai-community/gpt2`` is not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmshrink.errors import UnknownNameError, UsageError
from llmshrink.models.builtin import BUILTIN_MODELS, BuiltinModel
from llmshrink.registry import suggest

SourceKind = Literal["local_dir", "gguf", "builtin", "hub"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    Attributes:
        kind: one of ``local_dir``, ``gguf``, ``builtin``, ``hub``.
        ref: absolute path (local kinds), built-in name, or hub id.
        revision: hub revision, if any.
    """

    kind: SourceKind
    ref: str
    revision: str | None = None

    @property
    def builtin(self) -> BuiltinModel | None:
        return BUILTIN_MODELS.get(self.ref) if self.kind == "builtin" else None

    def describe(self) -> str:
        """Human form, e.g. ``builtin:smollm2-135m`` or ``hub:owner/name@rev``."""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.kind}:{self.ref}{rev}"


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.endswith(".gguf") or "\\" in text


def resolve_model(name: str) -> ModelSource:
    """Resolve a user-supplied model reference.

    Args:
        name: a directory, a ``.gguf`` path, a built-in name, or ``owner/name``
            (optionally ``owner/name@revision``).

    Raises:
        UsageError: a path that does not exist or holds no model.
        UnknownNameError: a bare name that is not built in (with suggestions).
    """
    if not name or not name.strip():
        raise UsageError("No model given.", f"Pass a built-in name ({', '.join(BUILTIN_MODELS)}), a directory, a .gguf file or an owner/name hub id.")
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("local_dir", str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0].resolve()))
        raise UsageError(
            f"Directory {path} holds no model: no config.json" + (f" and {len(ggufs)} .gguf files" if ggufs else "") + ".",
            "Point --model at an HF model directory (config.json + weights) or at one .gguf file.",
        )
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("gguf", str(path.resolve()))
        raise UsageError(f"{path} is a file but not a .gguf model.", "Pass a .gguf file or a model directory.")
    if name in BUILTIN_MODELS:
        return ModelSource("builtin", name)
    if _looks_like_path(name):
        raise UsageError(f"No such file or directory: {name}.",
                         f"Pass a built-in name ({', '.join(BUILTIN_MODELS)}), an HF model directory, a .gguf file "
                         "or an owner/name hub id.")
    repo, _, revision = name.partition("@")
    if _HUB_ID.match(repo):
        return ModelSource("hub", repo, revision or None)
    known = BUILTIN_MODELS.names()
    err = UnknownNameError("model", name, known, suggest(name, known))
    err.hint += " A model can also be a local HF directory, a .gguf file, or an owner/name hub id."
    raise err
