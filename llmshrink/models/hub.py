"""Reachability of the Hugging Face hub, checked fast instead of waiting on retries."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"


def hub_endpoint() -> str:
    """The hub URL in use (``$HF_ENDPOINT`` or the public hub)."""
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT)


def hub_offline_requested() -> bool:
    """True when the user asked for offline mode (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub endpoint opens within ``timeout`` seconds.

    huggingface_hub retries unreachable hosts for ~25 s before failing; this
    probe lets llmshrink tell the user at once.
    """
    if hub_offline_requested():
        return False
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False
