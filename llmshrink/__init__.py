"""llmshrink: compress a pretrained LLM for one deployment target.

Public API (importing this package does not import torch):

* :mod:`llmshrink.models` — resolve, load and describe models; calibration text.
* :mod:`llmshrink.errors` — the error tree and exit codes.
* :func:`compress` — the whole job (:func:`llmshrink.api.compress`); :mod:`llmshrink.api`
  has the other verbs (export, validate, bench, ...).
"""

from llmshrink.errors import LlmshrinkError
from llmshrink.version import __version__


def compress(*args, **kwargs):
    """Compress a model for a target under a latency budget; see :func:`llmshrink.api.compress`."""
    from llmshrink.api import compress as _compress

    return _compress(*args, **kwargs)


__all__ = ["__version__", "LlmshrinkError", "compress"]
