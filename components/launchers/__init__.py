"""Launchers of distributed training jobs, called from the train step.

* :mod:`components.launchers.trainjob`: a Kubeflow Trainer v2 ``TrainJob`` on the shipped
  ``TrainingRuntime`` (``manifests/trainer/``), current Kubeflow.
* :mod:`components.launchers.tfjob`: a Training Operator v1 ``TFJob``, older clusters.
* :mod:`components.launchers.kube`: what both share: create or attach, wait, stream worker
  0's log, delete the job on SIGTERM or failure, the errors a user can act on.

Nothing here imports kfp, so the step imports it inside a running pipeline, and the tests
drive it against a fake Kubernetes API server with the real ``kubernetes`` client.
"""

from __future__ import annotations

# `distributed` values of the train step and the pipeline; "none" trains in the step's pod.
DISTRIBUTED_MODES: tuple[str, ...] = ("none", "trainjob", "tfjob")
