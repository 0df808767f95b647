"""The error tree of llmshrink.

Every error the library raises on purpose is a :class:`LlmshrinkError`. Each
carries a message that says what was wrong, an optional ``hint`` that says
what to do, and the process exit code the CLI uses for it:

====  ===========================================================
code  meaning
====  ===========================================================
1     other failure (integrity check, conversion, I/O)
2     usage: bad name, bad path, bad option value
3     infeasible budget: the search space cannot reach it
4     validation: measured latency outside tolerance
5     missing hardware or runtime (no CUDA device, no TensorRT, an extra not installed)
6     a remote resource is unreachable (offline, hub down)
7     not enough memory: the plan says a phase cannot fit on the devices present (nothing was loaded)
130   interrupted (Ctrl-C); finished work is kept
====  ===========================================================
"""

from __future__ import annotations


class LlmshrinkError(Exception):
    """Base class: a failure llmshrink understands and can explain.

    Args:
        message: what was wrong, in one or two sentences.
        hint: what the user can do about it (shown after the message).
    """

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class UsageError(LlmshrinkError):
    """The input was wrong: an unknown name, a missing file, a bad value."""

    exit_code = 2


class UnknownNameError(UsageError):
    """A name that no registry holds; carries the nearest known names."""

    def __init__(self, kind: str, name: str, known: list[str], suggestions: list[str]) -> None:
        self.kind, self.name, self.known, self.suggestions = kind, name, known, suggestions
        message = f"Unknown {kind} {name!r}."
        if suggestions:
            hint = f"Nearest known {kind} names: " + ", ".join(suggestions) + "."
        else:
            hint = f"No {kind}s are registered."
        super().__init__(message, hint)


class UnsupportedModelError(UsageError):
    """The model loads, but its architecture is not one llmshrink can compress."""


class IntegrityError(LlmshrinkError):
    """A file's checksum differs from the one it must have."""


class InfeasibleBudgetError(LlmshrinkError):
    """The requested budget is below what the search space can reach."""

    exit_code = 3


class ValidationFailedError(LlmshrinkError):
    """The measured latency is outside the tolerance around the prediction."""

    exit_code = 4


class MissingHardwareError(LlmshrinkError):
    """The hardware or runtime the command needs is absent (CUDA, TensorRT)."""

    exit_code = 5


class MissingExtraError(MissingHardwareError):
    """An optional package the command needs is not installed (lm-eval, tensorrt, datasets, pyarrow)."""


class RemoteUnavailableError(LlmshrinkError):
    """A remote resource (model hub, package index) cannot be reached."""

    exit_code = 6


class InsufficientMemoryError(LlmshrinkError):
    """A phase of the run needs more memory than the devices present have (found before any weights load)."""

    exit_code = 7


class Interrupted(LlmshrinkError):
    """The user stopped the command (Ctrl-C); what was finished is kept, and the hint says how to go on."""

    exit_code = 130
