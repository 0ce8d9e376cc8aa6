"""``python -m localrun`` (``make run-local``): the newcomer's first command.

Around :func:`localrun.run.run_local` it starts a local MLflow server and S3 endpoint
(:mod:`localrun.mlflow_store`, set up like the cluster's) and stops them at the end, shows
one line per step (:mod:`localrun.progress`; the steps' full logs go to ``<root>/logs/``),
and ends with a summary (:mod:`localrun.summary`; also ``<root>/summary.json``).
``make mlflow-ui`` browses the runs afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from localrun import DEFAULT_ROOT
from localrun.progress import StepDisplay
from localrun.run import (
    SUMMARY_FILE,
    StepFailedError,
    SyntheticData,
    check_config,
    check_source,
    run_local,
    stamp,
)
from vitpcm.data.sources import dataset_names, get_source
from vitpcm.errors import VitpcmError

_FAILURE_TAIL_LINES = 30


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from localrun.services import DEFAULT_MLFLOW_PORT

    parser = argparse.ArgumentParser(
        prog="python -m localrun",
        description=(
            "Run the ViT-PCM pipeline on this machine with kfp.local, with a local MLflow "
            "server and S3 endpoint, and print a summary."
        ),
    )
    parser.add_argument("--root", default=DEFAULT_ROOT, help=f"outputs folder ({DEFAULT_ROOT})")
    names = dataset_names()
    parser.add_argument("--dataset", default="synthetic", choices=names)
    defaults = ", ".join(f"{name}: {get_source(name).config}" for name in names)
    parser.add_argument(
        "-c", "--config", default="", help=f"config name or YAML path (the dataset's: {defaults})"
    )
    parser.add_argument("--source-dir", help="downloaded dataset folder (skips the download)")
    parser.add_argument("--mirror", default="", help="base URL serving the official archives")
    parser.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs (config's)")
    parser.add_argument(
        "--set", metavar="KEY=VALUE", action="append", default=[], help="config override"
    )
    parser.add_argument("--no-crf", action="store_true", help="skip the dense CRF")
    parser.add_argument("--train", type=int, default=SyntheticData.train, help="synthetic train")
    parser.add_argument("--val", type=int, default=SyntheticData.val, help="synthetic val")
    parser.add_argument("--test", type=int, default=SyntheticData.test, help="synthetic test")
    parser.add_argument("--size", type=int, default=SyntheticData.size, help="synthetic px")
    mlflow = parser.add_argument_group("MLflow")
    mlflow.add_argument(
        "--mlflow-port",
        type=int,
        help=f"port of the local MLflow server ({DEFAULT_MLFLOW_PORT}, or a free one when it "
        "is busy; 0: a free one)",
    )
    mlflow.add_argument("--s3-port", type=int, default=0, help="local S3 port (0: a free one)")
    mlflow.add_argument(
        "--keep-servers", action="store_true", help="keep the servers up after the run (Ctrl-C)"
    )
    mlflow.add_argument(
        "--mlflow-uri", default="", help="log to this MLflow server instead of a local one"
    )
    mlflow.add_argument("--no-mlflow", action="store_true", help="no MLflow at all")
    mlflow.add_argument("--experiment", default="vitpcm-local", help="MLflow experiment")
    mlflow.add_argument(
        "--registered-model", default="vitpcm-local", help="MLflow registered model name"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print the steps' full logs instead of progress"
    )
    parser.add_argument(
        "--containers",
        action="store_true",
        help="run each step in its image (make images first) through docker or podman "
        "(DOCKER_HOST, the docker socket, or a podman service started for the run)",
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP stop the run like Ctrl-C does: steps and servers are stopped."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _mlflow_port(requested: int | None, display: StepDisplay) -> int:
    from localrun.services import DEFAULT_MLFLOW_PORT, free_port, port_is_free

    if requested is not None:
        return requested  # explicit: a busy one is an error (0: a free one)
    if port_is_free(DEFAULT_MLFLOW_PORT):
        return DEFAULT_MLFLOW_PORT
    port = free_port()
    display.note(
        f"port {DEFAULT_MLFLOW_PORT} is busy: MLflow listens on {port} this time "
        f"(--mlflow-port chooses)"
    )
    return port


def _browse_command(root: Path, port: int) -> str:
    from localrun.services import DEFAULT_MLFLOW_PORT

    options = []
    if root != Path(DEFAULT_ROOT).resolve():
        options.append(f"--root {shlex.quote(str(root))}")
    if port != DEFAULT_MLFLOW_PORT:
        options.append(f"--port {port}")
    command = "make mlflow-ui" + (f' ARGS="{" ".join(options)}"' if options else "")
    return f"{command}   (serves http://127.0.0.1:{port} until Ctrl-C)"


def _print_failure(error: StepFailedError, out: Any) -> None:
    lines = [line for line in error.tail if line.strip()]
    # From the last traceback on, when there is one: what comes before is the step's inputs.
    starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
    lines = lines[starts[-1] if starts else 0 :][-_FAILURE_TAIL_LINES:]
    if lines:
        out.write(f"\nThe end of the failed step's log ({error.log_path}):\n")
        out.write("\n".join(lines) + "\n")
    out.flush()


def _run_and_summarise(
    args: argparse.Namespace, root: Path, log_path: Path, display: StepDisplay, out: Any
) -> str:
    """Services, the DAG, ``summary.json``; returns the summary text still to print."""
    from localrun.mlflow_store import local_services, wait_for_interrupt
    from localrun.summary import build_summary, format_summary, write_summary

    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        tracking_uri, port = args.mlflow_uri, 0
        if not (args.mlflow_uri or args.no_mlflow):
            port = _mlflow_port(args.mlflow_port, display)
            display.begin("services", "start MLflow + S3 servers", numbered=False)
            services = stack.enter_context(
                local_services(root, port or None, args.s3_port or None, display.note)
            )
            tracking_uri, port = services.mlflow.uri, services.mlflow.port
            display.end("services", detail=tracking_uri)
        run = run_local(
            pipeline_root=root,
            dataset=args.dataset,
            config=args.config,
            source_dir=args.source_dir,
            mirror=args.mirror,
            epochs=args.epochs,
            overrides=args.set,
            crf=not args.no_crf,
            mlflow_tracking_uri=tracking_uri,
            experiment=args.experiment,
            registered_model=args.registered_model,
            synthetic=SyntheticData(args.train, args.val, args.test, args.size),
            display=None if args.verbose else display,
            log_path=log_path,
            echo_logs=args.verbose,
            containers=args.containers,
        )
        summary = build_summary(
            run,
            dataset=args.dataset,
            config=args.config,
            wall_seconds=time.monotonic() - started,
            steps=[s for s in display.steps if s.name != "services"],
            log_path=log_path,
            tracking_uri=tracking_uri,
            browse_command=_browse_command(root, port) if port else "",
        )
        summary_path = write_summary(summary, root / SUMMARY_FILE)
        text = format_summary(summary, str(summary_path))
        if port and args.keep_servers:
            out.write(text + f"\nMLflow UI: {tracking_uri}  (Ctrl-C stops the servers)\n")
            out.flush()
            text = ""
            wait_for_interrupt()
        if port:
            display.begin("stop", "stop servers, save MLflow artifacts", numbered=False)
    if port:
        display.end("stop")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m localrun``: services, the DAG with progress, then the summary."""
    args = _parse_args(argv)
    try:
        check_source(args.source_dir, args.dataset)
        args.config = check_config(args.config, args.set, args.epochs, args.dataset)
    except VitpcmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    from localrun.kfp_run import variant_for
    from pipeline.steps import BY_TASK

    out = sys.stdout
    root = Path(args.root).resolve()
    log_path = root / "logs" / f"run-{stamp()}.log"
    steps = variant_for(args.source_dir).steps
    display = StepDisplay(out, len(steps), labels={t: BY_TASK[t].label for t in steps})
    out.write(f"ViT-PCM on this machine (kfp.local): outputs in {root}, step logs in {log_path}\n")
    out.flush()
    try:
        with _signals_interrupt():
            text = _run_and_summarise(args, root, log_path, display, out)
    except KeyboardInterrupt as exc:
        display.close()
        why = str(exc) or "SIGINT"
        out.write(f"\ninterrupted ({why}): every step and server was stopped\n")
        out.flush()
        # The shell's convention: 128 + the signal's number.
        return 128 + int(getattr(signal.Signals, why, signal.SIGINT))
    except StepFailedError as exc:
        display.close()
        _print_failure(exc, out)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except VitpcmError as exc:
        display.close()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    display.close()
    # The summary comes last, under the lines about stopping the servers.
    out.write(text)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
