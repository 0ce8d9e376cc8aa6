"""The logged model, its registered versions and the ``champion`` gate.

The Keras model is saved in MLflow's ``tensorflow`` flavor (a ``.keras`` file inside) and a
``python_function`` flavor served by :mod:`vitpcm.serving` (images in, masks out), with the
``vitpcm`` source as code, so it loads where the package is not installed.

A recurring (cron) run retrains on schedule, and a new model becomes the registered model's
``champion`` only if its mIoU beats the current champion's on the same split (DESIGN.md).
Every version carries its score as tags (``miou``, ``miou_split``), so the gate compares
like with like and a person can see why a version was or was not promoted
(``champion_comparison``, ``promoted``, ``previous_champion``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vitpcm.run_files import CONFIG_FILE

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
RECORD_TAG = "vitpcm.record_id"


@dataclass(frozen=True)
class ChampionDecision:
    """Outcome of :func:`promote_if_better`: whether ``version`` is now the champion, the
    champion before (``previous_version``, its ``previous_miou`` on ``split``; ``None``:
    none or not comparable) and the ``comparison`` text also tagged on the version."""

    promoted: bool
    model_name: str
    version: str
    miou: float
    split: str
    previous_version: str | None
    previous_miou: float | None
    comparison: str

    def to_dict(self) -> dict[str, Any]:
        """The decision as plain JSON values."""
        return asdict(self)


def _scores(miou: float, other: float | None = None) -> tuple[str, str]:
    """``miou`` and ``other`` with enough decimals (4 to 8) to show their difference:
    three decimals showed "0.081 > 0.081" for a real improvement."""
    digits = 4
    while (
        other is not None
        and miou != other
        and digits < 8
        and (
            f"{miou:.{digits}f}" == f"{other:.{digits}f}"
            or float(f"{miou - other:.{digits}f}") == 0
        )
    ):
        digits += 1
    return f"{miou:.{digits}f}", "" if other is None else f"{other:.{digits}f}"


def comparison_text(miou: float, previous: float, split: str) -> str:
    """E.g. ``"0.6120 > 0.5800 (val, +0.0320)"``, ``"0.08127 > 0.08122 (val, +0.00005)"``."""
    new, old = _scores(miou, previous)
    digits = len(new.partition(".")[2])
    sign = ">" if miou > previous else "<="
    return f"{new} {sign} {old} ({split}, {miou - previous:+.{digits}f})"


def _tag_float(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, TypeError, ValueError):
        return None


def promote_if_better(
    client: Any, model_name: str, version: str | int, miou: float, split: str
) -> ChampionDecision:
    """Make ``version`` the ``champion`` if its mIoU on ``split`` beats the champion's.

    The first version gated becomes champion; a later one only with a strictly greater
    mIoU, and only against a champion scored on the same split (otherwise the champion
    keeps its alias: promote by hand if the protocol changed on purpose). Gating the
    current champion again (a replay) reports ``promoted=True`` and changes nothing. The
    score and the outcome are tagged on the version.

    Args:
        client: an ``mlflow.MlflowClient``.
        model_name: the registered model.
        version: the candidate version.
        miou: its mIoU (0..1) on ``split``.
        split: the split it was measured on, e.g. ``val``.
    """
    from mlflow.exceptions import MlflowException

    version, miou = str(version), float(miou)
    client.set_model_version_tag(model_name, version, "miou", f"{miou:.6f}")
    client.set_model_version_tag(model_name, version, "miou_split", split)
    try:
        champion = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException as exc:
        missing = getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
        if not missing and "not found" not in str(exc).lower():
            raise
        champion = None
    previous_version = None if champion is None else str(champion.version)
    tags = {} if champion is None else champion.tags
    previous_miou = _tag_float(tags, "miou") if tags.get("miou_split") == split else None
    if champion is None:
        promoted, comparison = True, f"{_scores(miou)[0]} ({split}), first champion"
    elif previous_version == version:
        promoted, comparison = True, f"{_scores(miou)[0]} ({split}), already champion"
    elif previous_miou is None:
        promoted = False
        comparison = (
            f"{_scores(miou)[0]} ({split}) not comparable: champion v{previous_version} has no "
            f"mIoU on {split!r} (its tags: miou={tags.get('miou')}, "
            f"miou_split={tags.get('miou_split')})"
        )
    else:
        promoted, comparison = miou > previous_miou, comparison_text(miou, previous_miou, split)
    if promoted and previous_version != version:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
    client.set_model_version_tag(model_name, version, "champion_comparison", comparison)
    client.set_model_version_tag(model_name, version, "promoted", str(promoted).lower())
    if previous_version is not None:
        client.set_model_version_tag(model_name, version, "previous_champion", previous_version)
    outcome = "champion" if promoted else "champion unchanged"
    log.info("%s v%s: %s -> %s", model_name, version, comparison, outcome)
    return ChampionDecision(
        promoted, model_name, version, miou, split, previous_version, previous_miou, comparison
    )


def register_version(
    client: Any,
    model_name: str,
    model_id: str,
    run_id: str | None,
    record_id: str,
    tags: dict[str, str] | None = None,
) -> str:
    """Register a logged model as a new version, once per ``record_id``: a replay after a
    lost acknowledgement finds the version tagged with it instead of adding a duplicate."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:  # it exists (perhaps created by a run racing this one)
        if getattr(exc, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    query = f"name = '{model_name}'" + (f" and run_id = '{run_id}'" if run_id else "")
    for existing in client.search_model_versions(query):
        if existing.tags.get(RECORD_TAG) == record_id:
            return str(existing.version)
    version = client.create_model_version(
        model_name,
        source=f"models:/{model_id}",
        run_id=run_id,
        tags={**(tags or {}), RECORD_TAG: record_id},
        model_id=model_id,
    )
    return str(version.version)


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

            save_config(config, keras_dir / "data" / CONFIG_FILE)
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
