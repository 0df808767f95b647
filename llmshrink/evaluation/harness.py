"""Run lm-evaluation-harness tasks on a model or a bundle through the ``llmshrink`` lm-eval model.

``paper`` names the paper's seven tasks (BoolQ, PIQA, HellaSwag, WinoGrande,
ARC-Easy, ARC-Challenge, MMLU; lm-eval fetches them from the hub);
``paper-local`` the offline copies that ``../shared/evaldata/render.py DIR``
writes (all but PIQA), used with ``--include-path DIR``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmshrink import serde
from llmshrink.errors import MissingExtraError, UsageError
from llmshrink.progress import Progress

TASK_SETS = {
    "paper": ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "mmlu"),
    "paper-local": ("boolq_local", "hellaswag_local", "winogrande_local", "arc_easy_local", "arc_challenge_local",
                    "mmlu_local"),
}


@serde.serializable("TaskResult")
@dataclass(frozen=True)
class TaskResult:
    """One task's headline metrics (lm-eval's ``acc``/``acc_norm`` and their standard errors)."""

    task: str
    metrics: dict[str, float] = field(default_factory=dict)
    samples: int | None = None
    limit: int | None = None

    def quality_keys(self) -> dict[str, float]:
        """The metrics under the manifest's names (``llmshrink eval`` records them so)."""
        return {task_key(self.task, k, self.limit): v for k, v in self.metrics.items()}


def task_key(task: str, metric: str, limit: int | None) -> str:
    """Manifest quality key of a task metric: ``{task}:{metric}[:limit{N}]``."""
    return f"{task}:{metric}" + (f":limit{limit}" if limit else "")


def expand_tasks(text: str) -> list[str]:
    out: list[str] = []
    for name in filter(None, (t.strip() for t in text.split(","))):
        out += TASK_SETS.get(name, (name,))
    return list(dict.fromkeys(out))


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise MissingExtraError("Task evaluation needs lm-evaluation-harness (lm-eval), which is not installed.",
                         "Install the eval extra: pip install 'llmshrink[eval]'") from None
    return lm_eval


def run_tasks(target: str, tasks: list[str], *, include_path: str | None = None, limit: int | None = None,
              spec: str | None = None, threads: int | None = None, max_length: int | None = None,
              seed: int = 1234, batch_size: int = 8, progress: Progress | None = None) -> list[TaskResult]:
    """Evaluate ``tasks`` on ``target`` (bundle directory or model) with lm-eval; headline metrics per task."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from llmshrink.evaluation.lm_eval_adapter import LlmshrinkLM

    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        hint = ("Render the offline tasks with `python ../shared/evaldata/render.py DIR` and pass --include-path DIR."
                if any(t.endswith("_local") for t in unknown) else "See `lm_eval --tasks list`.")
        raise UsageError(f"Unknown lm-eval task(s): {', '.join(unknown)}.", hint)
    lm = LlmshrinkLM(target, spec=spec, threads=threads, max_length=max_length, batch_size=batch_size,
                     progress=progress)
    res = simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, random_seed=seed,
                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                          log_samples=False)
    out = []
    for task, metrics in sorted(res["results"].items()):
        keep = {k.split(",")[0]: float(v) for k, v in metrics.items()
                if isinstance(v, (int, float)) and k.split(",")[0] in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")}
        n = res.get("n-samples", {}).get(task, {}).get("effective")
        out.append(TaskResult(task, keep, n, limit))
    return out
