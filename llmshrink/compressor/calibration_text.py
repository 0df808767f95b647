"""Calibration text: the sequences a run calibrates and holds out on, shared by ``compress``, ``export`` and eval.

``compress`` draws its calibration and held-out splits from ``--calib-data``
with the run's seed and search length (:func:`calibration_splits`);
``export`` and the torch scorer quantize (GPTQ) and calibrate static
activation scales (``w8a8s``) on the same split (:func:`calibration_tokens`),
so a spec exported alone sees the text ``compress`` would have used. Importing this module stays light: torch
arrives with the models and configs, inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmshrink.progress import NULL_PROGRESS, Progress

if TYPE_CHECKING:
    from llmshrink.compressor.config import CompressConfig

HELD_OUT_ROWS = 8  # sequences after the calibration rows, never trained or calibrated on (recovery's KD before/after)


def calibration_splits(config: CompressConfig, hf, tokenizer, model_fingerprint: str,
                       progress: Progress = NULL_PROGRESS, *, whole_run: bool = True):
    """The calibration and held-out sequences of ``config`` (``--calib-data``, seed, search length), cached.

    ``calib`` holds :func:`n_rows` sequences: the first ``config.n_calib`` calibrate the search and importance,
    the first ``config.n_quant`` the quantizer, the ``config.n_screen`` after those score the contenders
    (:mod:`.contenders`); recovery trains on them all. Rows are prefixes of one seeded sample (self-generated
    in seeded batches, or one permutation of a file's chunks), so the first rows do not depend on how many
    follow: ``export`` (``whole_run=False``) quantizes on the very rows ``compress`` quantized on, without
    sampling the rest.
    """
    from llmshrink.models.data import token_splits

    seq, n = config.search.seq_len, n_rows(config, whole_run)
    return token_splits(config.calib_data, tokenizer, model=hf, seq_len=seq, n_calib=n, n_eval=HELD_OUT_ROWS,
                        seed=config.seed, progress=progress, cache_path=_self_cache(config, model_fingerprint,
                                                                                     whole_run))


def _self_cache(config: CompressConfig, model_fingerprint: str, whole_run: bool):
    from llmshrink.models.data import self_cache_path

    return self_cache_path(model_fingerprint, seq_len=config.search.seq_len,
                           n=n_rows(config, whole_run) + HELD_OUT_ROWS, seed=config.seed)


def export_calib_config(source, calib_data: str) -> CompressConfig:
    """The config whose quantizer rows (``n_quant`` of ``search.seq_len`` tokens) ``export`` calibrates on."""
    from llmshrink.compressor.config import CompressConfig

    return CompressConfig(model=source.describe(), target="cpu", budgets_ms=(1.0,), calib_data=calib_data)


def calibration_needs_model(source, calib_data: str) -> bool:
    """Whether :func:`calibration_tokens` needs the model loaded: self-generated text not sampled yet."""
    from llmshrink.models.data import parse_data_spec
    from llmshrink.models.load import fingerprint

    if parse_data_spec(calib_data).kind != "self":
        return False
    return not _self_cache(export_calib_config(source, calib_data), fingerprint(source), whole_run=False).is_file()


def n_rows(config: CompressConfig, whole_run: bool = True) -> int:
    """How many calibration sequences a run of ``config`` reads: the most that the search and the quantizer
    read, and with ``whole_run`` (``compress``; not ``export``) the screening rows after the quantizer's and
    the rows recovery trains on (when it trains)."""
    recovery = config.recovery
    if not whole_run:
        return max(config.n_calib, config.n_quant)
    return max(config.n_calib, config.n_quant + config.n_screen, recovery.rows if recovery.steps > 0 else 0)


def compress_shape() -> tuple[int, int, int]:
    """``(seq_len, calibration rows, held-out rows)`` a default ``compress`` reads (what ``data show`` shows)."""
    from llmshrink.compressor.config import CompressConfig

    config = CompressConfig(model="", target="cpu", budgets_ms=(1.0,))
    return config.search.seq_len, n_rows(config), HELD_OUT_ROWS


def calibration_tokens(hf, tokenizer, source, calib_data: str, progress: Progress):
    """The sequences ``compress`` quantizes on (same split, seed and cache): GPTQ reads them all,
    static activation scales the first :data:`~llmshrink.compressor.calibrate.STATIC_CALIB_ROWS`.

    ``hf`` may be None unless :func:`calibration_needs_model` (self-generated text not cached yet)."""
    from llmshrink.models.load import fingerprint

    config = export_calib_config(source, calib_data)
    with progress.task("Calibration text"):
        splits = calibration_splits(config, hf, tokenizer, fingerprint(source), progress, whole_run=False)
        return splits.calib[:config.n_quant]
