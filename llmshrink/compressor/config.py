"""``CompressConfig``: what ``compress`` is asked to do (everything that changes the result).

It lives apart from :mod:`.pipeline` because more than the pipeline reads it:
``export`` and the torch scorer derive the calibration text of a run from
its defaults (:mod:`.calibration_text`), and they sit below the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmshrink import serde
from llmshrink.compressor.recover import RecoveryConfig
from llmshrink.compressor.search import SearchConfig
from llmshrink.errors import UsageError
from llmshrink.models.data import DEFAULT_CALIB_DATA
from llmshrink.targets.workload import Workload

STRATEGIES = ("joint", "sequential")
SHARD_MODES = ("auto", "fsdp", "none")  # CompressConfig.shard (plan.search_mode)
RECOMPUTE_MODES = ("auto", "on", "off")  # CompressConfig.recompute (plan.search_mode)


@serde.serializable("CompressConfig")
@dataclass(frozen=True)
class CompressConfig:
    """What ``compress`` was asked to do (everything that changes the result)."""

    model: str
    target: str
    budgets_ms: tuple[float, ...]
    params_budget: float | None = None
    workload: Workload | None = None
    space: str | None = None  # a --space YAML
    calib_data: str = DEFAULT_CALIB_DATA
    n_calib: int = 128  # calibration sequences for importance, the search and its teacher targets
    # ... and for the quantizer (GPTQ's Hessians): the first n_quant (SmolLM2-135M uniform w4g32a8, WikiText-2
    # perplexity: 34.08 on 128 self-generated rows, 33.83 on 512; 215 s on 2 cores). Recovery trains on
    # ``recovery.rows``. All are prefixes of one seeded sample (``calibration_text``).
    n_quant: int = 512
    # ... and the contenders of a budget (searched subnet, baselines) are scored on the n_screen rows after
    # the quantizer's, which nothing before the choice reads (``contenders``)
    n_screen: int = 64
    search: SearchConfig = field(default_factory=SearchConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    tolerance_pct: float = 10.0
    max_length: int = 2048
    seed: int = 0
    strategy: str = "joint"  # or "sequential": architecture at full precision, then a precision assignment
    # A uniform format (e.g. w4g32a8) to validate against: where the target is measurable here, bundles are
    # checked relative to the unpruned model exported in it, timed in turn (set by a relative budget, 0.7xint4).
    reference: str | None = None
    # With a reference, the latency guard: before the winner of a budget's screening is recovered, its screened
    # bundle is timed in turn with the reference, and a contender measured over the budget's ratio to the
    # reference by more than this share does not ship; the next in the ranking that measures within does
    # (``pipeline._latency_guard``). None turns the guard off.
    latency_slack_pct: float | None = 5.0
    quantizer: str = "gptq"  # how integer weights are rounded (llmshrink.formats.QUANTIZERS)
    # A fixed plan (a SubnetSpec JSON, absolute path): recovered and exported without a search
    # (``compress --spec``); budgets, if any, must not be below its prediction.
    spec: str | None = None
    # where the torch phases run (a resolved ``--device``: "cpu" or "cuda:N"; see llmshrink.device)
    device: str = "cpu"
    # under torchrun: shard the search's supernet with FSDP (plan.search_mode): auto (where it would not fit
    # whole), fsdp, none (data parallel: every rank holds it whole)
    shard: str = "auto"
    # the search recomputes its blocks in per-sample backwards (plan.search_mode): auto (where it would not fit
    # otherwise), on, off
    recompute: str = "auto"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UsageError(f"Unknown strategy {self.strategy!r}.", f"Use one of: {', '.join(STRATEGIES)}.")
        from llmshrink.device import parse_device
        from llmshrink.formats import QUANTIZERS

        if parse_device(self.device)[0] == "auto":  # a malformed name is a usage error
            raise UsageError("CompressConfig.device is a resolved device (cpu, cuda, cuda:N), not auto.")
        if self.shard not in SHARD_MODES:
            raise UsageError(f"Unknown shard mode {self.shard!r}.", f"Use one of: {', '.join(SHARD_MODES)}.")
        if self.recompute not in RECOMPUTE_MODES:
            raise UsageError(f"Unknown recompute mode {self.recompute!r}.",
                             f"Use one of: {', '.join(RECOMPUTE_MODES)}.")
        if self.quantizer not in QUANTIZERS:
            raise UsageError(f"Unknown quantizer {self.quantizer!r}.", f"Use one of: {', '.join(QUANTIZERS)}.")
