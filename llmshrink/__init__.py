"""llmshrink: compress a pretrained LLM for one deployment target.

Public API (importing this package does not import torch):

* :mod:`llmshrink.models` — resolve, load and describe models; calibration text.
* :mod:`llmshrink.errors` — the error tree and exit codes.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmshrink")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

from llmshrink.errors import LlmshrinkError  # noqa: E402

__all__ = ["__version__", "LlmshrinkError"]
