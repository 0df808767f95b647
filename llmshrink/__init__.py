"""llmshrink: compress a pretrained LLM for one deployment target.

Public API (importing this package does not import torch):

* :mod:`llmshrink.models` — resolve, load and describe models; calibration text.
* :mod:`llmshrink.errors` — the error tree and exit codes.
* :func:`compress` — the whole job (:func:`llmshrink.api.compress`); :mod:`llmshrink.api`
  has the other verbs (export, validate, bench, ...).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmshrink")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

from llmshrink.errors import LlmshrinkError  # noqa: E402


def compress(*args, **kwargs):
    """Compress a model for a target under a latency budget; see :func:`llmshrink.api.compress`."""
    from llmshrink.api import compress as _compress

    return _compress(*args, **kwargs)


__all__ = ["__version__", "LlmshrinkError", "compress"]
