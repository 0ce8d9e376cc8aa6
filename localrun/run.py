"""Run the single-node pipeline on this machine with ``kfp.local``: :func:`run_local`.

The same components as in the cluster run as subprocesses (``SubprocessRunner(use_venv=
False)``: the installed ``vitpcm`` is used, images are not), under a ``kfp.local`` run in a
process group of its own (:mod:`localrun.kfp_run`). Kubernetes settings (GPUs, Secrets,
node selectors, retries) are ignored locally; the environment of this process is inherited
by every step.

By default the built-in synthetic dataset is generated; ``mirror`` downloads VOC/COCO from
a mirror, and ``source_dir`` starts from a dataset folder already on disk.
:mod:`localrun.command` (``make run-local``) runs it with local services and a summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localrun import DEFAULT_ROOT
from localrun.processes import run_in_own_group
from localrun.progress import KfpLogSink, StepDisplay, open_log
from vitpcm import events
from vitpcm.data.sources import dataset_names, get_source
from vitpcm.errors import ConfigError

SUMMARY_FILE = "summary.json"


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


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def check_source(source_dir: str | os.PathLike[str] | None, dataset: str) -> Path | None:
    """The resolved dataset folder, or None to download/synthesise.

    Raises:
        ConfigError: ``source_dir`` is not a folder, or is given with a generated dataset.
    """
    if source_dir is None:
        return None
    source = Path(source_dir).resolve()
    if not source.is_dir():
        raise ConfigError(f"source_dir {source} is not a folder; pass a downloaded dataset")
    if not get_source(dataset).files:  # a dataset with nothing to download is generated
        real = " or ".join(name for name in dataset_names() if get_source(name).files)
        raise ConfigError(f"source_dir holds real data: set dataset to {real}")
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
        dataset: A registered dataset (:func:`vitpcm.data.sources.dataset_names`).
        config: Config name or YAML path (e.g. ``synthetic``, ``voc12_vit_s16``); empty for
            the dataset's (its source's ``config``, :mod:`vitpcm.data.sources`).
        source_dir: A downloaded dataset (holding ``VOCdevkit/`` or ``coco2014/``) to start
            from instead of downloading.
        mirror: Base URL serving the datasets' official archives.
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
    source = check_source(source_dir, dataset)
    config = check_config(config, overrides, epochs, dataset)
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log_file = Path(log_path) if log_path else root / "logs" / f"run-{stamp()}.log"
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
        spec = {
            "pipeline_root": str(root),
            "arguments": arguments,
            "source_dir": None if source is None else str(source),
            "containers": containers,
        }
        (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        log = stack.enter_context(open_log(log_file))
        sink = KfpLogSink(log, display, echo=sys.stdout if echo_logs else None)
        command = [sys.executable, "-m", "localrun.kfp_run", str(work)]
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
