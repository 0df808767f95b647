"""The verbs of llmshrink as library calls: compress, export, open a bundle, generate, bench, validate.

The CLI is a thin layer over these. They never print; long steps report to
a :class:`~llmshrink.progress.Progress`.

This module is a facade: each verb is implemented in the package it belongs
to, and nothing inside llmshrink imports this module (only the CLI and users
do), so imports run one way. Where they live:

* :func:`compress` — :mod:`llmshrink.compressor.compress` (budgets: :mod:`llmshrink.compressor.budget`);
* :func:`export`, :func:`export_compressed`, :data:`FLAVOURS`, :class:`ParityError` —
  :mod:`llmshrink.exporters.export`;
* :func:`open_bundle`, :func:`generate_text` — :mod:`llmshrink.exporters.bundle`;
* :func:`bench`, :func:`validate`, :class:`Validation` — :mod:`llmshrink.exporters.measure`;
* :func:`calibration_tokens` — :mod:`llmshrink.compressor.calibration_text`;
* :func:`load_spec`, :func:`precision_summary` — :mod:`llmshrink.spec`;
  :func:`prediction_provenance` — :mod:`llmshrink.targets.predict`.
"""

from llmshrink.compressor.calibration_text import calibration_tokens
from llmshrink.compressor.compress import compress
from llmshrink.exporters.bundle import OpenBundle, generate_text, open_bundle
from llmshrink.exporters.export import FLAVOURS, Flavour, ParityError, export, export_compressed
from llmshrink.exporters.measure import Validation, bench, validate
from llmshrink.spec import load_spec, precision_summary
from llmshrink.targets.predict import prediction_provenance

__all__ = [
    "FLAVOURS", "Flavour", "OpenBundle", "ParityError", "Validation",
    "bench", "calibration_tokens", "compress", "export", "export_compressed", "generate_text",
    "load_spec", "open_bundle", "precision_summary", "prediction_provenance", "validate",
]
