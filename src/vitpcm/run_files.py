"""The names of the files inside the folders this tool writes, named once.

A trained model's folder (``vitpcm train --out``, the pipeline's model artifact, an MLflow
model's ``data/``) holds :data:`MODEL_FILE` and the resolved :data:`CONFIG_FILE`; train,
eval and test folders hold their scores in :data:`METRICS_JSON`; a training run its
per-epoch record in :data:`HISTORY_JSON`.
"""

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.yaml"
METRICS_JSON = "metrics.json"
HISTORY_JSON = "history.json"
