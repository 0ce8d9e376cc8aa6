"""The logged ViT-PCM model: MLflow signature, pinned requirements, saved folder.

Keras 3 models are saved with MLflow's ``tensorflow`` flavor (a ``.keras`` file inside);
its pyfunc returns the model's dict of outputs. The ``vitpcm`` source goes along as code,
so the registered model loads where the package is not installed (its custom layers
deserialise from there).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def vitpcm_signature(num_classes: int) -> Any:
    """The MLflow signature of a ViT-PCM model.

    Input ``images``: float32 (batch, H, W, 3) in [0, 255], H and W multiples of the patch
    size. Outputs: ``patch_probs`` (batch, G_h, G_w, K) per-patch softmax and
    ``class_probs`` (batch, K) max-pooled image-level probabilities.
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    f32 = np.dtype(np.float32)
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, -1, -1, 3), "images")]),
        outputs=Schema(
            [
                TensorSpec(f32, (-1, -1, -1, num_classes), "patch_probs"),
                TensorSpec(f32, (-1, num_classes), "class_probs"),
            ]
        ),
    )


def model_requirements() -> list[str]:
    """Pinned pip requirements of the logged model (skips MLflow's slow inference)."""
    from importlib import metadata

    requirements = []
    for dist, name in (
        (("tensorflow", "tensorflow-cpu"), "tensorflow"),
        (("keras",), "keras"),
        (("mlflow", "mlflow-skinny"), "mlflow"),
    ):
        for candidate in dist:
            try:
                requirements.append(f"{name}=={metadata.version(candidate)}")
                break
            except metadata.PackageNotFoundError:
                continue
    return requirements


def save_mlflow_model(model: Any, path: str | os.PathLike[str], metadata: dict[str, Any]) -> None:
    """Save ``model`` as an MLflow model folder at ``path`` (which must not exist)."""
    import mlflow.tensorflow

    import vitpcm

    num_classes = int(model.output["class_probs"].shape[-1])
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "vitpcm"
        shutil.copytree(
            Path(vitpcm.__file__).parent,
            code,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        mlflow.tensorflow.save_model(
            model,
            str(path),
            signature=vitpcm_signature(num_classes),
            pip_requirements=model_requirements(),
            code_paths=[str(code)],
            metadata={"vitpcm_version": vitpcm.__version__, "num_classes": num_classes, **metadata},
        )
