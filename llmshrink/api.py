"""The verbs of llmshrink as library calls: export, open a bundle, generate, bench, validate.

The CLI is a thin layer over these. They never print; long steps report to
a :class:`~llmshrink.progress.Progress`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llmshrink.compressor.calibration_text import EXPORT_CALIB_ROWS, calibration_tokens
from llmshrink.exporters.bundle import OpenBundle, generate_text, open_bundle
from llmshrink.exporters.export import FLAVOURS, Flavour, ParityError, export, export_compressed
from llmshrink.exporters.measure import Validation, bench, validate
from llmshrink.progress import NULL_PROGRESS, Progress
from llmshrink.spec import load_spec, precision_summary
from llmshrink.targets.predict import prediction_provenance
from llmshrink.targets.workload import Workload

__all__ = [
    "EXPORT_CALIB_ROWS", "FLAVOURS", "Flavour", "OpenBundle", "ParityError", "Validation",
    "bench", "calibration_tokens", "compress", "export", "export_compressed", "generate_text",
    "load_spec", "open_bundle", "precision_summary", "prediction_provenance", "validate",
]


def compress(model: str = "smollm2-135m", *, target: str, latency_ms: float | str | Sequence[float | str],
             out: str | Path, params_budget: float | None = None, workload: Workload | str | None = None,
             strategy: str = "joint", space: str | Path | None = None, steps: int | None = None,
             recovery_steps: int | None = None, calib_data: str = "self", tolerance_pct: float = 10.0,
             seed: int = 0, resume: bool = False, progress: Progress = NULL_PROGRESS):
    """Compress ``model`` for ``target`` under ``latency_ms`` (one budget or several) into run directory ``out``.

    A budget is milliseconds (``30`` or ``"30ms"``) or relative to a uniform
    export of the model (``"0.7xint4"``: 70 % of what the target's table
    predicts for it; the run's notes say what it resolved to).
    The Python face of ``llmshrink compress`` (see :mod:`llmshrink.compressor.pipeline`).
    Returns a :class:`~llmshrink.compressor.pipeline.CompressResult`: ``.record.candidates``
    holds per budget the bundle path, predicted and measured latency and validation verdict;
    ``.report`` the report.md path.

    Raises:
        InfeasibleBudgetError: a budget is below the fastest subnet of the space (exit code 3).
        UsageError: bad input, or ``out`` holds another run.
    """
    from llmshrink.compressor.config import CompressConfig
    from llmshrink.compressor.pipeline import compress as run
    from llmshrink.compressor.recover import RecoveryConfig
    from llmshrink.compressor.search import SearchConfig
    from llmshrink.targets.workload import parse_workload

    wl = parse_workload(workload) if isinstance(workload, str) else workload
    budgets, notes, reference = _resolve_budgets(latency_ms, model, target, wl, progress)
    cfg = CompressConfig(
        model=model, target=target, budgets_ms=budgets, params_budget=params_budget, workload=wl,
        space=str(Path(space).resolve()) if space else None, calib_data=calib_data,
        search=SearchConfig() if steps is None else SearchConfig(steps=steps),
        recovery=RecoveryConfig() if recovery_steps is None else RecoveryConfig(steps=recovery_steps),
        tolerance_pct=tolerance_pct, seed=seed, strategy=strategy, reference=reference)
    return run(cfg, out, resume=resume, progress=progress, notes=notes)


def _resolve_budgets(latency, model: str, target: str, workload: Workload | None,
                     progress: Progress) -> tuple[tuple[float, ...], tuple[str, ...], str | None]:
    """Budgets in ms, a note per relative one saying what it resolved to, and the format validated against.

    The first relative budget's format (its canonical name) becomes the run's reference: bundles are
    validated relative to the unpruned model exported in it (see ``CompressConfig.reference``).
    """
    from llmshrink.compressor.budget import Budget, parse_budgets
    from llmshrink.formats import parse_format

    items = [latency] if isinstance(latency, (int, float, str)) else list(latency)
    terms = [t for x in items for t in (parse_budgets(x) if isinstance(x, str) else (Budget(float(x)),))]
    if not any(t.relative_to for t in terms):
        return tuple(dict.fromkeys(t.value for t in terms)), (), None
    from llmshrink.models import load_config, resolve_model
    from llmshrink.spec import BaseShape
    from llmshrink.targets.predict import table_for
    from llmshrink.targets.profile import load_target

    tgt = load_target(target)
    table = table_for(tgt)
    base = BaseShape.from_config(load_config(resolve_model(model), progress=progress))
    resolved = [t.resolve(base, tgt, workload or tgt.default_workload, table) for t in terms]
    reference = parse_format(next(t.relative_to for t in terms if t.relative_to)).name
    return tuple(dict.fromkeys(ms for ms, _ in resolved)), tuple(n for _, n in resolved if n), reference
