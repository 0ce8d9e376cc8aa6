"""Helpers of the registration step, importable inside its container (no kfp needed).

The step fails when MLflow was asked for and the model was not registered; what MLflow did
not receive stays in the step's ``mlflow_spool`` folder. KFP uploads a step's outputs only
when it succeeds, so on a cluster the spool is written to the output's object-store URI
before the step fails, where ``vitpcm mlflow replay`` can pick it up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def registration_failure(result: dict[str, Any] | None) -> str | None:
    """Why ``log_pipeline_run``'s result is not a complete registration, or None if it is."""
    if not result:
        return "no result"
    pending = int(result.get("pending") or 0)
    if result.get("version") is None:
        return f"no model version registered ({pending} record(s) not sent)"
    if pending:
        return f"{pending} record(s) not sent"
    return None


def keep_spool(path: str, uri: str) -> str:
    """Make the spool at ``path`` survive the failing step; returns where it is.

    A local artifact (``kfp.local``) already lives at ``path``. A ``minio://`` or ``s3://``
    artifact is copied file by file to its URI (the S3 Secret gives the endpoint).
    """
    if not uri.startswith(("minio://", "s3://")):
        return path
    from vitpcm import storage

    target = "s3://" + uri.split("://", 1)[1]
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(target, *file.relative_to(root).parts), file.read_bytes())
    return target if os.listdir(path) else path
