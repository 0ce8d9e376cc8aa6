"""Kubeflow Pipelines components: one thin step per library entry point.

Each component is a lightweight Python component whose body imports the ``vitpcm`` library
and calls one function, so the same code runs in the cluster (in the images named by
:mod:`pipeline.images`) and on one machine under ``kfp.local``.
"""

from components.data import convert_data, download_data
from components.evaluate import evaluate_model, infer_crf
from components.register import register_model
from components.train import train_model, train_model_tfjob

__all__ = [
    "convert_data",
    "download_data",
    "evaluate_model",
    "infer_crf",
    "register_model",
    "train_model",
    "train_model_tfjob",
]
