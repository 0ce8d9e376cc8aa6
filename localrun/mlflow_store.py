"""The MLflow store of ``make run-local``: kept in the run folder, browsable afterwards.

:func:`local_services` runs the two servers of :mod:`localrun.services` for a run folder:
``<root>/mlflow/`` holds the SQLite store and the server logs. moto forgets everything when
it stops, so the artifacts are copied from the bucket to ``<root>/mlflow-artifacts/`` at the
end (and back into it at the next start): with the SQLite file next to them, nothing is
lost between runs.

``python -m localrun.mlflow_store ui --root runs/local`` (``make mlflow-ui``) serves the same
SQLite store with ``--artifacts-destination <root>/mlflow-artifacts``: the runs' proxied
artifact URIs (``mlflow-artifacts:/<experiment>/<run>/artifacts/...``) resolve to the same
relative paths there, so the UI shows every run, artifacts included, after the run ended.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from localrun import DEFAULT_ROOT
from localrun.services import (
    ARTIFACTS_PREFIX,
    DB_FILE,
    DEFAULT_MLFLOW_PORT,
    MLFLOW_START_TIMEOUT_S,
    S3_START_TIMEOUT_S,
    MlflowServer,
    S3Bucket,
    S3Endpoint,
)
from vitpcm.errors import ConfigError, VitpcmError

# Layout of a run folder (``make run-local --root``).
BUCKET = "vitpcm"
SERVICES_DIR = "mlflow"
ARTIFACTS_DIR = "mlflow-artifacts"
S3_LOG = "s3-server.log"
UI_LOG = "mlflow-ui.log"


@dataclass
class LocalServices:
    """The running services of :func:`local_services`.

    Attributes:
        s3: the S3 endpoint.
        bucket: the bucket holding MLflow's artifacts under ``mlflow/``.
        mlflow: the MLflow server.
        root: the run folder.
    """

    s3: S3Endpoint
    bucket: S3Bucket
    mlflow: MlflowServer
    root: Path


@contextlib.contextmanager
def local_services(
    root: str | os.PathLike[str],
    mlflow_port: int | None = DEFAULT_MLFLOW_PORT,
    s3_port: int | None = None,
    on_status: Callable[[str], None] | None = None,
) -> Iterator[LocalServices]:
    """Run the S3 endpoint and the MLflow server for a run folder; stop both afterwards.

    ``root/mlflow/`` holds the SQLite store and the server logs; ``root/mlflow-artifacts/``
    the artifacts, uploaded into the bucket at start and copied back at the end (moto keeps
    S3 in memory only). Every exit path -- an error, Ctrl-C -- stops both servers.

    Args:
        root: the run folder.
        mlflow_port: the MLflow port (None or 0: a free one).
        s3_port: the S3 port (None or 0: a free one).
        on_status: called with a short line at each stage (e.g. a progress display).

    Raises:
        ConfigError: a port is busy.
        StorageError, TrackingError: a server did not start (with the end of its log).
    """
    say = on_status or (lambda _text: None)
    folder = Path(root).resolve()
    workdir = folder / SERVICES_DIR
    saved = folder / ARTIFACTS_DIR
    workdir.mkdir(parents=True, exist_ok=True)
    # Both constructors check their ports: a busy one fails before anything starts.
    s3 = S3Endpoint(s3_port, workdir / S3_LOG)
    bucket = S3Bucket(s3.endpoint, BUCKET)
    mlflow = MlflowServer(workdir, bucket, mlflow_port)
    bucket_ready = False
    try:
        # MLflow only talks to S3 on the first artifact request: both can start at once.
        s3.launch()
        mlflow.launch()
        s3.wait_ready(S3_START_TIMEOUT_S)
        bucket = s3.bucket(BUCKET)
        bucket_ready = True
        if saved.is_dir():
            count = bucket.upload_folder(saved, ARTIFACTS_PREFIX)
            if count:
                say(f"restored {count} artifact file(s) of earlier runs from {saved}")
        mlflow.wait_ready(MLFLOW_START_TIMEOUT_S)
        yield LocalServices(s3, bucket, mlflow, folder)
    finally:
        try:
            mlflow.stop()
            if bucket_ready and s3.running:
                try:
                    count = bucket.download_prefix(ARTIFACTS_PREFIX, saved)
                    if count:
                        say(f"saved {count} new MLflow artifact file(s) to {saved}")
                except Exception as exc:  # stopping goes on; say what is lost
                    say(f"warning: could not save the MLflow artifacts to {saved}: {exc}")
        finally:
            s3.stop()


def serve_ui(root: str | os.PathLike[str], port: int | None = DEFAULT_MLFLOW_PORT) -> MlflowServer:
    """An MLflow server over a finished run folder (SQLite store + saved artifacts).

    Raises:
        ConfigError: ``root`` holds no MLflow store, or the port is busy.
    """
    folder = Path(root).resolve()
    workdir = folder / SERVICES_DIR
    if not (workdir / DB_FILE).is_file():
        raise ConfigError(
            f"{workdir / DB_FILE} does not exist: run `make run-local` first, or pass the "
            "--root it used"
        )
    saved = folder / ARTIFACTS_DIR
    saved.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(
        workdir, port=port, artifacts_destination=str(saved), log_path=workdir / UI_LOG
    )
    server.start()
    return server


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = False

    def _on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m localrun.mlflow_store",
        description="The MLflow store of make run-local.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ui = sub.add_parser("ui", help="browse the runs of make run-local (until Ctrl-C)")
    ui.add_argument("--root", default=DEFAULT_ROOT, help="run folder of make run-local")
    ui.add_argument(
        "--port",
        type=int,
        default=DEFAULT_MLFLOW_PORT,
        help=f"port ({DEFAULT_MLFLOW_PORT}, the one run-local's run URLs name; 0: a free one)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m localrun.mlflow_store ui``: serve a run folder's MLflow store until Ctrl-C."""
    args = _parse_args(argv)
    print(f"starting the MLflow UI over {Path(args.root).resolve()} ...", flush=True)
    try:
        server = serve_ui(args.root, args.port or None)
    except VitpcmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        print(f"MLflow UI: {server.uri}  (runs of {Path(args.root).resolve()}; Ctrl-C stops it)")
        sys.stdout.flush()
        wait_for_interrupt()
    finally:
        server.stop()
    print("MLflow UI stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
