"""Fail fast and clearly when a Hugging Face hub name is used on a machine that cannot reach the hub.

Without this check transformers and datasets retry for ~25 s before failing with a generic message.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse


def offline_requested() -> bool:
    return any(os.environ.get(var, "").lower() in ("1", "true", "yes") for var in ("HF_HUB_OFFLINE",))


@lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 2.0) -> bool:
    """True when the hub endpoint accepts a TCP connection (one quick probe per process)."""
    if offline_requested():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
