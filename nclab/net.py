"""Network access: whether the user asked for offline mode, and whether a download host answers.

The lowest room of the package for anything that talks to the network: ``data``, ``mirror`` and
``models`` all ask here before they download, so the offline switches and the reachability timeout
mean the same thing everywhere. Nothing here touches the network at import time.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

OFFLINE_VARS: tuple[str, ...] = ("NCLAB_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Environment variables that switch every download off when set to 1/true/yes/on."""


def offline() -> bool:
    """Whether any of :data:`OFFLINE_VARS` is set to a true value (1, true, yes, on)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` accepts a TCP connection within ``timeout`` seconds in total
    (name resolution included).

    ``url`` is a full URL (``https://host/path``, port from the scheme: 443 for https, 80 otherwise,
    unless the URL names one) or a bare host name (port 443).
    """
    parsed = urlparse(url if "://" in url else f"https://{url}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # name resolution ignores the socket timeout: run the whole check in a thread that is
    # abandoned when late, so ``timeout`` bounds the total
    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])
