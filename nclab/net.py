"""Network access: whether the user asked for offline mode, and whether a download host answers.

The lowest room of the package for anything that talks to the network: ``data``, ``mirror`` and
``models`` all ask here before they download, so the offline switches and the reachability timeout
mean the same thing everywhere. Nothing here touches the network at import time.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

OFFLINE_VARS: tuple[str, ...] = ("NCLAB_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Environment variables that switch every download off when set to 1/true/yes/on."""


def offline() -> bool:
    """Whether any of :data:`OFFLINE_VARS` is set to a true value (1, true, yes, on)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` accepts a TCP connection within ``timeout`` seconds.

    ``url`` is a full URL (``https://host/path``, port from the scheme: 443 for https, 80 otherwise,
    unless the URL names one) or a bare host name (port 443).
    """
    parsed = urlparse(url if "://" in url else f"https://{url}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
