"""Talking to an MLflow server that may be down: timeouts, health probe, error classes.

Outages must cost seconds, not minutes: before sending, an ``http(s)`` server's
``/health`` is probed with a short timeout, and the MLflow client runs with few retries
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``, defaults below; values
already in the environment win), except that uploads get a long timeout so a big model
is not cut off while the server streams it to object storage.

Errors fall in two classes: *transient* ones (connection refused or reset, timeouts, HTTP
5xx/429, auth failures an operator can fix) may succeed later; *permanent* ones (MLflow
refusing the request itself) never will.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# MLflow's own defaults (7 retries with exponential backoff, 120 s timeout) turn an outage
# into many minutes of a stalled training loop per call.
DEFAULT_MAX_RETRIES = 1
DEFAULT_BACKOFF_FACTOR = 1  # MLflow parses it as an int
DEFAULT_TIMEOUT_S = 15
UPLOAD_TIMEOUT_S = 900
HEALTH_TIMEOUT_S = 3.0

_TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "IO_ERROR",
    "ENDPOINT_NOT_FOUND",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "CUSTOMER_UNAUTHORIZED",
    "DEADLINE_EXCEEDED",
    "ABORTED",
}


def is_transient(exc: BaseException) -> bool:
    """Whether a failed MLflow call may succeed later (outage) or never will (refusal)."""
    import requests
    import urllib3

    network = (requests.RequestException, urllib3.exceptions.HTTPError)
    if isinstance(exc, (*network, ConnectionError, TimeoutError)):
        return True
    code = getattr(exc, "error_code", None)
    if code is not None:
        return str(code) in _TRANSIENT_CODES
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status is not None and (status >= 500 or status in (401, 403, 408, 429))


@contextlib.contextmanager
def client_timeouts(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Run MLflow client calls with short retries; restores the environment afterwards.

    The MLflow client reads these variables on every request. A value the user exported
    is kept, except that the timeout is raised to ``timeout_s`` when that is longer.
    """
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(DEFAULT_MAX_RETRIES),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(DEFAULT_BACKOFF_FACTOR),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s)),
    }
    saved = {key: os.environ.get(key) for key in wanted}
    try:
        for key, value in wanted.items():
            current = saved[key]
            longer = key == "MLFLOW_HTTP_REQUEST_TIMEOUT" and (
                current is not None and float(current) < timeout_s
            )
            if current is None or longer:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def server_health(tracking_uri: str) -> str | None:
    """``None`` when an ``http(s)`` MLflow server answers ``/health``, else why not.

    Other URIs (a local ``sqlite:``/file store) are not probed.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    import requests

    url = tracking_uri.rstrip("/") + "/health"
    try:
        response = requests.get(url, timeout=HEALTH_TIMEOUT_S)
    except requests.RequestException as exc:
        return f"{type(exc).__name__}: {exc}"
    if response.status_code >= 500:
        return f"HTTP {response.status_code} from {url}"
    return None
