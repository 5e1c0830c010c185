"""Transient faults: which errors are worth retrying later, and injecting them to test that.

A dead letter is *transient* when trying again may succeed (a read timed out, a connection was
dropped, a server answered 5xx or 429, an inference call failed on its own) and *permanent* when
the same bytes will fail the same way (they do not decode, are too large, hold a NaN embedding).
jobs.reindex retries transient dead letters on later runs.

Injection (tests and bench/soak.py): when the environment variable KOCLIP_FAULTS names a folder,
each file `read-<key>-<n>` in it makes one read of the uri with that key (`fault_key(uri)`)
raise TimeoutError. A reader takes a fault by deleting its file, so across processes each
injected fault fires exactly once. Unset, a read costs one environment lookup.
"""
from __future__ import annotations

import hashlib
import os

FAULTS_ENV = "KOCLIP_FAULTS"
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def is_transient(error: BaseException) -> bool:
    """Whether `error` (from reading an object) may not recur on another try."""
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    # gcsfs's HttpError has .code, aiohttp's ClientResponseError .status; neither is imported here
    status = getattr(error, "code", None) or getattr(error, "status", None)
    if isinstance(status, int) and status in _TRANSIENT_STATUS:
        return True
    return type(error).__name__ in ("ClientConnectionError", "ServerDisconnectedError", "ClientOSError",
                                    "ServerTimeoutError")


def fault_key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def inject_read_faults(folder: str, uri: str, times: int = 1) -> None:
    """Make the next `times` reads of `uri` time out (for processes that see KOCLIP_FAULTS=folder)."""
    os.makedirs(folder, exist_ok=True)
    key = fault_key(uri)
    for n in range(times):
        with open(os.path.join(folder, f"read-{key}-{n}"), "w"):
            pass


def check_read(uri: str) -> None:
    """Raise the injected TimeoutError for this read of `uri`, if one is pending."""
    folder = os.environ.get(FAULTS_ENV)
    if not folder:
        return
    prefix = f"read-{fault_key(uri)}-"
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix)]
    except FileNotFoundError:
        return
    for name in names:
        try:
            os.remove(os.path.join(folder, name))
        except FileNotFoundError:  # another reader took this one
            continue
        raise TimeoutError(f"injected read timeout for {uri}")
