"""MLflow tracking for ViT-PCM runs: spooled run logging, model registry, champion gate.

* ``spool.py`` / ``sender.py``: every record is journaled locally before it is sent, so an
  MLflow outage loses nothing; :func:`replay_spool` sends what is left.
* :class:`RunTracker` (``tracker.py``): one run: tags, params, curves, results, plots,
  config, the Keras model, its registration.
* :class:`TrainingTracker` (``training.py``): ``vitpcm train`` logging each epoch live; it
  writes :data:`RUN_FILE` next to ``metrics.json``.
* :func:`log_pipeline_run` (``pipeline_run.py``): the register step continues the
  training's run and adds results and the model.
* ``registry.py``: the logged model's files, its versions and :func:`promote_if_better`,
  the ``champion`` gate; ``figures.py``: plots and overlays; ``naming.py``: names, params,
  metric keys, description, links.

Importing this package does not import MLflow (that takes seconds); the functions do.
"""

from vitpcm.tracking.figures import plot_sample_overlays
from vitpcm.tracking.naming import (
    default_experiment,
    default_registered_model,
    final_metrics,
    flatten_params,
    kfp_run_url,
)
from vitpcm.tracking.pipeline_run import log_pipeline_run
from vitpcm.tracking.registry import (
    CHAMPION_ALIAS,
    ChampionDecision,
    promote_if_better,
    vitpcm_signature,
)
from vitpcm.tracking.sender import replay_spool
from vitpcm.tracking.spool import RUN_FILE, SPOOL_DIRNAME
from vitpcm.tracking.tracker import ModelLogResult, RunTracker
from vitpcm.tracking.training import TrainingTracker, training_summary

__all__ = [
    "CHAMPION_ALIAS",
    "RUN_FILE",
    "SPOOL_DIRNAME",
    "ChampionDecision",
    "ModelLogResult",
    "RunTracker",
    "TrainingTracker",
    "default_experiment",
    "default_registered_model",
    "final_metrics",
    "flatten_params",
    "kfp_run_url",
    "log_pipeline_run",
    "plot_sample_overlays",
    "promote_if_better",
    "replay_spool",
    "training_summary",
    "vitpcm_signature",
]
