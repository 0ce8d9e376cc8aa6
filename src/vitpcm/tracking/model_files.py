"""The logged ViT-PCM model: MLflow signature, pinned requirements, saved folder.

Keras 3 models are saved with MLflow's ``tensorflow`` flavor (a ``.keras`` file inside)
and a ``python_function`` flavor served by :mod:`vitpcm.serving` (images in, masks out).
The ``vitpcm`` source goes along as code, so the registered model loads where the package
is not installed (its custom layers deserialise from there).
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
    # What the served model (vitpcm.serving) needs besides Keras: images, CRF, config.
    for name in ("tensorflow", "keras", "mlflow", "pillow", "pydensecrf2", "pyyaml", "tqdm"):
        for dist in (name, f"{name}-cpu", f"{name}-skinny"):
            try:
                requirements.append(f"{name}=={metadata.version(dist)}")
                break
            except metadata.PackageNotFoundError:
                continue
    return requirements


def save_mlflow_model(
    model: Any,
    path: str | os.PathLike[str],
    metadata: dict[str, Any],
    config: Any = None,
) -> None:
    """Save ``model`` as a new MLflow model folder ``path`` with two flavors sharing
    ``data/`` (the ``.keras`` file, and ``config`` as ``config.yaml``: class names, test
    size, CRF settings) and ``code/``: ``tensorflow`` (the Keras model) and
    ``python_function`` (:mod:`vitpcm.serving`: base64 images in, masks out, so
    ``mlflow models serve`` answers with masks); ``metadata`` goes into MLmodel."""
    import mlflow.pyfunc
    import mlflow.tensorflow
    from mlflow.models import Model

    import vitpcm
    from vitpcm.serving import input_example, pyfunc_signature

    num_classes = int(model.output["class_probs"].shape[-1])
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "vitpcm"
        shutil.copytree(
            Path(vitpcm.__file__).parent,
            code,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        keras_dir = Path(tmp) / "keras"
        mlflow.tensorflow.save_model(
            model,
            str(keras_dir),
            signature=vitpcm_signature(num_classes),  # of this flavor alone; replaced below
            pip_requirements=model_requirements(),
            code_paths=[str(code)],
        )
        if config is not None:
            from vitpcm.config import save_config

            save_config(config, keras_dir / "data" / "config.yaml")
        mlflow.pyfunc.save_model(
            str(path),
            loader_module="vitpcm.serving",
            data_path=str(keras_dir / "data"),
            code_paths=[str(code)],
            signature=pyfunc_signature(),
            input_example=input_example(),
            pip_requirements=model_requirements(),
            metadata={"vitpcm_version": vitpcm.__version__, "num_classes": num_classes, **metadata},
        )
        tensorflow = Model.load(str(keras_dir / "MLmodel")).flavors["tensorflow"]
    mlmodel = Model.load(str(Path(path) / "MLmodel"))
    # Both flavors read the one copy pyfunc made of the data folder.
    tensorflow["data"] = mlmodel.flavors["python_function"]["data"]
    mlmodel.add_flavor("tensorflow", **tensorflow)
    mlmodel.save(str(Path(path) / "MLmodel"))
