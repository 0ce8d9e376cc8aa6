"""Which ``tf.distribute`` strategy a run uses, and who is the chief.

* ``TF_CONFIG`` naming more than one worker (a Kubeflow TFJob, a Trainer v2 TrainJob through
  :mod:`vitpcm.tf_config`, or the multi-worker tests on 127.0.0.1) ->
  ``MultiWorkerMirroredStrategy``.
* Otherwise ``MirroredStrategy`` over every visible GPU, or the CPU when there is none, so the
  one training loop serves a laptop, one GPU node and many.

Keras' ``fit`` fails under MultiWorkerMirroredStrategy with Keras 3 (keras-team/keras#20585),
which is why training is a custom loop over ``strategy.run``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from vitpcm.errors import ConfigError


@dataclass(frozen=True)
class WorkerRole:
    """Where this process stands in a (possibly multi-worker) job."""

    num_workers: int = 1
    task_type: str = "worker"
    task_index: int = 0
    has_chief: bool = False

    @property
    def is_chief(self) -> bool:
        """The chief writes the run's outputs; the other workers keep private copies."""
        if self.task_type == "chief":
            return True
        return self.task_type == "worker" and self.task_index == 0 and not self.has_chief

    @property
    def replica_dir_name(self) -> str:
        """Folder name under the output for a non-chief worker's private files."""
        return f"{self.task_type}-{self.task_index}"


def worker_role(environ: dict[str, str] | None = None) -> WorkerRole:
    """Parse ``TF_CONFIG`` (absent or single worker -> a lone chief)."""
    env = os.environ if environ is None else environ
    raw = env.get("TF_CONFIG", "").strip()
    if not raw:
        return WorkerRole()
    try:
        tf_config = json.loads(raw)
        cluster = tf_config.get("cluster", {})
        task = tf_config.get("task", {})
        num = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
        return WorkerRole(
            num_workers=max(num, 1),
            task_type=str(task.get("type", "worker")),
            task_index=int(task.get("index", 0)),
            has_chief=bool(cluster.get("chief")),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"TF_CONFIG is not valid JSON with 'cluster' and 'task' ({exc}); "
            "unset it for single-node training"
        ) from exc


def make_strategy(role: WorkerRole | None = None) -> Any:
    """The strategy for this process (see the module docstring)."""
    import tensorflow as tf

    role = role or worker_role()
    if role.num_workers > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    cpus = tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([d.name for d in cpus])
