"""The ``kfp.local`` run itself, in a process of its own: ``python -m localrun.kfp_run DIR``.

:func:`localrun.run.run_local` starts this module in a process group of its own
(:func:`localrun.processes.run_in_own_group`) and reads its output; stopping that group
stops ``kfp.local`` and every step it started, without touching ``kfp.local``'s internals.
``DIR/spec.json`` holds the pipeline root, the pipeline's arguments, the dataset folder to
start from (or null) and whether the steps run in containers; the pipeline's outputs are
written to ``DIR/outputs.json`` (``{name: {"path", "metadata", "metrics"}}``).
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.pipeline import Variant


def variant_for(source_dir: str | None) -> Variant:
    """The pipeline ``make run-local`` runs: from a dataset folder, or downloading one."""
    from pipeline.pipeline import PREPARED_DATA, SINGLE_NODE

    return SINGLE_NODE if source_dir is None else PREPARED_DATA


def run(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Run the pipeline as ``spec`` says; returns its outputs (path, metadata, metrics)."""
    from kfp import local
    from kfp.dsl import Metrics

    from pipeline.pipeline import build_pipeline

    source = spec["source_dir"]
    extra = {} if source is None else {"source_dir": source}
    pipeline = build_pipeline(variant_for(source), **extra)
    with contextlib.ExitStack() as stack:
        if spec["containers"]:
            from localrun.containers import step_containers

            stack.enter_context(step_containers(extra_mounts=[source] if source else []))
            runner: Any = local.DockerRunner()
        else:
            runner = local.SubprocessRunner(use_venv=False)
        local.init(runner=runner, pipeline_root=spec["pipeline_root"], raise_on_error=True)
        with warnings.catch_warnings():
            # kfp warns that image names without "python" may not run in a local
            # interpreter; they are our images, and here the installed package stands in.
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            task = pipeline(**spec["arguments"])
    return {
        name: {
            "path": artifact.path,
            "metadata": dict(artifact.metadata),
            "metrics": isinstance(artifact, Metrics),
        }
        for name, artifact in task.outputs.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m localrun.kfp_run DIR``: 0 when every step succeeded, 1 otherwise."""
    folder = Path((sys.argv[1:] if argv is None else argv)[0])
    try:
        outputs = run(json.loads((folder / "spec.json").read_text(encoding="utf-8")))
    except RuntimeError as exc:  # kfp.local: a task ended with status FAILURE
        print(f"error: {exc}", flush=True)
        return 1
    (folder / "outputs.json").write_text(json.dumps(outputs, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
