"""``make run-local``: the pipeline's DAG on this machine with ``kfp.local``.

:mod:`localrun.run` runs it (``kfp.local`` itself runs in :mod:`localrun.kfp_run`);
:mod:`localrun.command` (``python -m localrun``) adds a local MLflow server and S3 endpoint
(:mod:`localrun.services`, :mod:`localrun.mlflow_store`), one line per step
(:mod:`localrun.progress`) and a closing summary (:mod:`localrun.summary`). The servers and
the ``kfp.local`` run each lead a process group of their own (:mod:`localrun.processes`).
:mod:`localrun.containers` runs the steps in their images instead, and
:mod:`localrun.docs_pictures` makes README's pictures from a finished run.
"""

DEFAULT_ROOT = "runs/local"  # the run folder: outputs, logs, MLflow store, summary.json
