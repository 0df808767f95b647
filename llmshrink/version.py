"""The installed llmshrink version, in a module that imports nothing of llmshrink.

Every layer records it (manifests, latency tables, reports, ``doctor``);
reading it from here rather than from the package root keeps those imports
pointing down (the root re-exports the verbs of :mod:`llmshrink.api`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmshrink")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
