"""``compress`` as one library call: keyword arguments in, a finished run directory out.

This is the Python face of ``llmshrink compress`` (re-exported as
:func:`llmshrink.compress` and :func:`llmshrink.api.compress`): it parses the
workload, resolves the budgets (:func:`.budget.resolve_budgets`), builds a
:class:`~.config.CompressConfig` and runs :func:`.pipeline.compress`. The
pipeline and its torch imports load when it is called, not when it is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from llmshrink.compressor.budget import resolve_budgets
from llmshrink.models.data import DEFAULT_CALIB_DATA
from llmshrink.progress import NULL_PROGRESS, Progress
from llmshrink.targets.workload import Workload, parse_workload

if TYPE_CHECKING:
    from llmshrink.compressor.recover import RecoveryConfig


def compress(model: str = "smollm2-135m", *, target: str, latency_ms: float | str | Sequence[float | str] | None = None,
             out: str | Path, params_budget: float | None = None, workload: Workload | str | None = None,
             strategy: str = "joint", space: str | Path | None = None, steps: int | None = None,
             recovery_steps: int | None = None, calib_data: str = DEFAULT_CALIB_DATA, tolerance_pct: float = 10.0,
             seed: int = 0, quantizer: str = "gptq", spec: str | Path | None = None,
             recovery: RecoveryConfig | None = None, resume: bool = False, adapt_table: bool = True,
             device: str = "auto", shard: str = "auto", recompute: str = "auto", search_samples: int | None = None,
             progress: Progress = NULL_PROGRESS):
    """Compress ``model`` for ``target`` under ``latency_ms`` (one budget or several) into run directory ``out``.

    A budget is milliseconds (``30`` or ``"30ms"``) or relative to a uniform
    export of the model (``"0.7xint4"``: 70 % of what the target's table
    predicts for it; the run's notes say what it resolved to). With ``spec`` (a SubnetSpec JSON),
    that plan is recovered and exported without a search; ``latency_ms`` is then optional, a check.
    ``quantizer``: ``gptq`` (default) or ``rtn``; ``recovery`` overrides the whole RecoveryConfig.
    ``device``: where the torch phases run (``auto``, ``cpu``, ``cuda``, ``cuda:N``; :mod:`llmshrink.device`).
    ``shard``: under torchrun, whether the search's supernet is sharded over the ranks with FSDP (``fsdp``), kept
    whole on each (``none``: data parallel), or sharded where it would not fit whole (``auto``).
    ``recompute``: whether the search recomputes its blocks in per-sample backwards (``on``), never (``off``),
    or only where it would not fit otherwise (``auto``; slower by about a forward a step).
    ``search_samples``: architecture samples a search step draws (default the SearchConfig's 4; the step's batch
    grows to a multiple of them); torchrun processes share them, so N processes need at least N.
    ``adapt_table``: when the target's table (by name) was measured on another CPU, adapt it to this one first
    (:func:`llmshrink.targets.adapt.table_for_this_cpu`, about 3 minutes, kept for later runs); the run's notes say so.
    The Python face of ``llmshrink compress`` (see :mod:`llmshrink.compressor.pipeline`). Under ``torchrun``
    every process runs it: the search and recovery are data-parallel, rank 0 alone writes and measures
    (:mod:`llmshrink.distributed`), and every rank returns the same result.
    Returns a :class:`~llmshrink.compressor.pipeline.CompressResult`: ``.record.candidates``
    holds per budget the bundle path, predicted and measured latency and validation verdict;
    ``.report`` the report.md path.

    Raises:
        InfeasibleBudgetError: a budget is below the fastest subnet of the space (exit code 3).
        MissingHardwareError: ``device`` names CUDA and there is none (exit code 5).
        InsufficientMemoryError: a phase would not fit in the device's memory (exit code 7; nothing loaded).
        UsageError: bad input, or ``out`` holds another run.
    """
    from llmshrink import distributed as dist
    from llmshrink.compressor.config import CompressConfig
    from llmshrink.compressor.pipeline import compress as run
    from llmshrink.compressor.search import search_config
    from llmshrink.device import resolve_device

    dist.init_from_env()  # under torchrun: join the others (data-parallel search and recovery, rank 0 writes)
    wl = parse_workload(workload) if isinstance(workload, str) else workload
    dev = resolve_device(device)  # a GPU asked for and absent fails here, before anything is measured or loaded
    # recorded in the run (and compared by --resume) as the same string on every rank: under torchrun each rank
    # takes its own GPU (distributed.init_from_env made it the current one), which plain "cuda" names
    run_device = "cuda" if dev.kind == "cuda" and dist.world_size() > 1 else dev.torch_device
    from llmshrink.errors import UsageError

    if latency_ms is None and spec is None:
        raise UsageError("Give a latency budget (--latency) or a plan (--spec).")
    if shard == "fsdp" and dist.world_size() == 1:
        raise UsageError("--shard fsdp shards the search over torchrun processes, and this is one process.",
                         "Start it with torchrun --nproc-per-node N -m llmshrink compress ... (N > 1), or leave "
                         "--shard at auto.")
    adapted = _adapted_note(model, target, adapt_table, progress)
    budgets, notes, reference = (resolve_budgets(latency_ms, model, target, wl, progress) if latency_ms is not None
                                 else ((), (), None))
    if recovery is None:
        from llmshrink.compressor.recover import RecoveryConfig

        recovery = RecoveryConfig() if recovery_steps is None else RecoveryConfig(steps=recovery_steps)
    cfg = CompressConfig(
        model=model, target=target, budgets_ms=budgets, params_budget=params_budget, workload=wl,
        space=str(Path(space).resolve()) if space else None, calib_data=calib_data,
        search=search_config(steps, search_samples),
        recovery=recovery, tolerance_pct=tolerance_pct, seed=seed, strategy=strategy, reference=reference,
        quantizer=quantizer, spec=str(Path(spec).resolve()) if spec else None, device=run_device,
        shard=shard, recompute=recompute)
    notes = adapted + tuple(notes) + (torch_device_note(dev, dist.world_size()),)
    return run(cfg, out, resume=resume, progress=progress, notes=notes)


def _adapted_note(model: str, target: str, adapt: bool, progress: Progress) -> tuple[str, ...]:
    """Adapt the target's table to this CPU when it came from another one; the note that says so (or nothing).

    The model is resolved first: a typo in it fails at once, not after minutes of measuring."""
    from llmshrink.models import load_config, resolve_model
    from llmshrink.targets.adapt import table_for_this_cpu
    from llmshrink.targets.profile import load_target

    tgt = load_target(target)
    if not adapt:
        return ()
    load_config(resolve_model(model), progress=progress)
    from llmshrink import distributed as dist

    # timed on rank 0 alone, the other processes waiting (under torchrun they would share the cores it times)
    local = dist.main_only(lambda: table_for_this_cpu(tgt, progress=progress))
    return (local.note,) if local.adapted else ()


def torch_device_note(dev, processes: int = 1) -> str:
    """Where the torch phases ran and in what precision: a line of the run's notes."""
    from llmshrink.compressor.recover import RecoveryConfig, use_bf16

    where = f"{processes} x {dev.name}" if processes > 1 else dev.name
    return (f"torch phases on {dev.kind} ({where}): original weights in {dev.dtype}, search and GPTQ in fp32, "
            f"recovery forward autocast to bf16 {'on' if use_bf16(RecoveryConfig().bf16, dev.torch_device) else 'off'}")
