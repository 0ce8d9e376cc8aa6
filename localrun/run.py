"""Run the single-node pipeline on this machine with ``kfp.local`` (``make run-local``).

The same components as in the cluster run as subprocesses of this interpreter
(``SubprocessRunner(use_venv=False)``: the installed ``vitpcm`` is used, images are not).
Kubernetes settings (GPUs, Secrets, node selectors, retries) are ignored locally; the
environment of this process is inherited by every step.

By default the built-in synthetic dataset is generated; ``mirror`` downloads VOC/COCO from
a mirror, and ``source_dir`` starts from a dataset folder already on disk.

``python -m localrun`` is the newcomer's first command. Around :func:`run_local` it
starts a local MLflow server and S3 endpoint (:mod:`localrun.mlflow_store`, set up like
the cluster's) and stops them at the end, shows one line per step (:mod:`localrun.progress`;
the steps' full logs go to ``<root>/logs/``), and ends with a summary
(:mod:`localrun.summary`; also ``<root>/summary.json``). ``make mlflow-ui`` browses the
runs afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localrun.progress import KfpLogSink, StepDisplay, open_log, run_in_own_group
from vitpcm import events
from vitpcm.errors import ConfigError, VitpcmError

DEFAULT_ROOT = "runs/local"
SUMMARY_FILE = "summary.json"
_FAILURE_TAIL_LINES = 30


@dataclass(frozen=True)
class SyntheticData:
    """Size of the generated dataset (``dataset="synthetic"``).

    Validation, test and image size are ``vitpcm data synth``'s defaults. Training takes half
    of its 2000 images so the whole local DAG (data, training, evaluation, CRF, MLflow) stays
    within about 6 minutes on 2 CPU cores; the full 2000 add about 4 minutes of training for
    about +0.08 held-out BPM mIoU (BENCHMARKS.md).
    """

    train: int = 1000
    val: int = 100
    test: int = 200
    size: int = 128


@dataclass
class LocalRun:
    """What a local run produced.

    Attributes:
        pipeline_root: Folder holding every step's outputs.
        artifacts: Local path of each output of the pipeline, by its name in the step table
            (``model``, ``eval_report``, ``pseudo_masks``, ``summary``...).
        metrics: The scalar metrics of each ``Metrics`` output (``train_metrics``: the best
            validation epoch, ``eval_metrics``: baseline pseudo masks, ``test_metrics``:
            before/after the CRF).
        summary: The registration step's summary (metrics, artifact URIs, MLflow outcome).
        log_path: The steps' full logs.
    """

    pipeline_root: Path
    artifacts: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    log_path: Path | None = None


_EXCEPTION_LINE = re.compile(r"^\s*((?:\w+\.)*\w*(?:Error|Exception)\w*): (.+)$")


class StepFailedError(RuntimeError):
    """A pipeline step exited with an error.

    Attributes:
        step: the failed task's name (``train-model``...), when known.
        tail: the last lines of its log.
        log_path: the full log of the run.
        cause: the exception line at the end of the step's log, when there is one.
    """

    def __init__(self, step: str | None, tail: Sequence[str], log_path: Path) -> None:
        from pipeline.steps import BY_TASK

        self.step = step
        self.tail = list(tail)
        self.log_path = log_path
        causes = [m.group(0).strip() for m in map(_EXCEPTION_LINE.match, self.tail) if m]
        self.cause = causes[-1] if causes else None
        label = BY_TASK[step].label if step in BY_TASK else step
        name = f"step {label!r}" if step else "a step"
        because = f": {self.cause}" if self.cause else ""
        super().__init__(f"{name} failed{because}; the full log is {log_path}")


def _overrides_text(overrides: Sequence[str] | str) -> str:
    if isinstance(overrides, str):
        return overrides
    return shlex.join(overrides)


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def check_source(source_dir: str | os.PathLike[str] | None, dataset: str) -> Path | None:
    """The resolved dataset folder, or None to download/synthesise.

    Raises:
        ConfigError: ``source_dir`` is not a folder, or is given with the synthetic dataset.
    """
    if source_dir is None:
        return None
    source = Path(source_dir).resolve()
    if not source.is_dir():
        raise ConfigError(f"source_dir {source} is not a folder; pass a downloaded dataset")
    if dataset == "synthetic":
        raise ConfigError("source_dir holds real data: set dataset to voc12 or coco14")
    return source


def check_config(
    config: str | None,
    overrides: Sequence[str] | str = (),
    epochs: int = 0,
    dataset: str = "synthetic",
) -> str:
    """Load the config as the training step will and check it fits the dataset
    (:func:`vitpcm.run_plan.check_plan`), so a mismatch fails before anything runs.

    Returns:
        The config name the run uses: ``config``, or the dataset's default when it is empty.

    Raises:
        ConfigError: an unknown config, key or value, or a config for another dataset.
    """
    from vitpcm.run_plan import config_for, load_checked_config

    sets = shlex.split(overrides) if isinstance(overrides, str) else list(overrides)
    if epochs > 0:
        sets.append(f"train.epochs={epochs}")
    load_checked_config(dataset, config or None, sets)
    return config_for(dataset, config or None)


def run_local(
    *,
    pipeline_root: str | os.PathLike[str] = DEFAULT_ROOT,
    dataset: str = "synthetic",
    config: str = "",
    source_dir: str | os.PathLike[str] | None = None,
    mirror: str = "",
    epochs: int = 0,
    overrides: Sequence[str] | str = (),
    crf: bool = True,
    mlflow_tracking_uri: str = "",
    experiment: str = "vitpcm-local",
    registered_model: str = "vitpcm-local",
    checkpoint_root: str = "",
    synthetic: SyntheticData = SyntheticData(),  # noqa: B008  (frozen, so a safe default)
    display: StepDisplay | None = None,
    log_path: str | os.PathLike[str] | None = None,
    echo_logs: bool = False,
    containers: bool = False,
) -> LocalRun:
    """Run download/synth -> convert -> train -> evaluate -> infer + CRF -> register locally.

    Args:
        pipeline_root: Local folder for every step's outputs (one subfolder per run).
        dataset: ``synthetic``, ``voc12`` or ``coco14``.
        config: Config name or YAML path (e.g. ``synthetic``, ``voc12_vit_s16``); empty for
            the dataset's (its source's ``config``, :mod:`vitpcm.data.sources`).
        source_dir: A downloaded dataset (holding ``VOCdevkit/`` or ``coco2014/``) to start
            from instead of downloading.
        mirror: Base URL serving the official archives (``voc12``/``coco14``).
        epochs: Fine-tuning epochs; 0 keeps the config's value.
        overrides: ``KEY=VALUE`` config overrides (a list, or one space-separated string).
        crf: Refine the pseudo masks with the dense CRF.
        mlflow_tracking_uri: MLflow server; empty skips MLflow.
        experiment: MLflow experiment.
        registered_model: MLflow registered model name.
        checkpoint_root: Checkpoint folder or ``s3://`` prefix (resumable training).
        synthetic: Size of the generated dataset when ``dataset`` is ``synthetic``.
        display: Shows one line per step (None: nothing is shown).
        log_path: Where the steps' logs go (default ``<root>/logs/run-<time>.log``).
        echo_logs: Also print the steps' logs as they come.
        containers: Run each step in its image (``kfp.local.DockerRunner`` on docker or
            podman, :mod:`localrun.containers`) instead of this interpreter.

    Returns:
        The run's artifact paths, metrics and registration summary.

    Raises:
        ConfigError: A bad combination of arguments (e.g. a missing ``source_dir``), or a
            bad config or override.
        StepFailedError: A step failed (the end of its log is in the error).
    """
    from localrun.kfp_run import write_spec

    source = check_source(source_dir, dataset)
    config = check_config(config, overrides, epochs, dataset)
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log_file = Path(log_path) if log_path else root / "logs" / f"run-{_stamp()}.log"
    arguments: dict[str, Any] = {
        "dataset": dataset,
        "config": config,
        "epochs": epochs,
        "overrides": _overrides_text(overrides),
        # No accelerator request locally; TensorFlow uses the GPUs it can see.
        "gpus": 0,
        # The cluster's per-pod process counts do not fit this machine: 0 = every core for
        # the conversion, and the config's crf.workers (an override of it still applies).
        "convert_workers": 0,
        "crf_workers": 0,
        "crf": crf,
        "mlflow_tracking_uri": mlflow_tracking_uri,
        "experiment": experiment,
        "registered_model": registered_model,
        "checkpoint_root": checkpoint_root,
    }
    if source is None:
        arguments.update(
            mirror=mirror,
            synthetic_train=synthetic.train,
            synthetic_val=synthetic.val,
            synthetic_test=synthetic.test,
            synthetic_size=synthetic.size,
        )
    # The steps report their progress as events (vitpcm.events); TensorFlow's C++ start-up
    # chatter would drown their logs; and each line should arrive as it is printed.
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", **os.environ, events.ENV: "1", "PYTHONUNBUFFERED": "1"}
    with contextlib.ExitStack() as stack:
        if containers:
            from localrun.containers import docker_engine

            env["DOCKER_HOST"] = stack.enter_context(docker_engine())
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=root, prefix=".run-")))
        spec = write_spec(
            work / "spec.json",
            pipeline_root=root,
            arguments=arguments,
            source_dir=None if source is None else str(source),
            containers=containers,
            outputs=work / "outputs.json",
        )
        log = stack.enter_context(open_log(log_file))
        sink = KfpLogSink(log, display, echo=sys.stdout if echo_logs else None)
        command = [sys.executable, "-m", "localrun.kfp_run", str(spec)]
        if run_in_own_group(command, sink.line, env) != 0:
            raise StepFailedError(sink.failed, sink.tail, log_file)
        outputs = json.loads((work / "outputs.json").read_text(encoding="utf-8"))
    run = LocalRun(pipeline_root=root, log_path=log_file)
    for name, out in outputs.items():
        run.artifacts[name] = out["path"]
        if out["metrics"]:
            run.metrics[name] = {k: float(v) for k, v in out["metadata"].items()}
    with open(run.artifacts["summary"], encoding="utf-8") as handle:
        run.summary = json.load(handle)
    return run


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
    parser.add_argument("--dataset", default="synthetic", choices=["synthetic", "voc12", "coco14"])
    parser.add_argument(
        "-c",
        "--config",
        default="",
        help="config name or YAML path (default: the dataset's: synthetic, voc12_vit_s16, "
        "coco14_vit_b16)",
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
    log_path = root / "logs" / f"run-{_stamp()}.log"
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
