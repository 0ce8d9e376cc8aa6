"""The registered ViT-PCM model as an MLflow pyfunc: images in, masks and class scores out.

A logged model (:func:`vitpcm.tracking.registry.save_mlflow_model`) has two flavors: the
``tensorflow`` one (``mlflow.tensorflow.load_model`` gives the Keras model and its patch
probabilities) and ``python_function`` with this module as its loader, which is what
``mlflow.pyfunc.load_model`` and ``mlflow models serve`` run. Its ``predict`` is
:meth:`vitpcm.predict.Predictor.predict` on every image, so a served champion answers
exactly what ``vitpcm predict -m models:/NAME@champion`` writes.

Request (``POST /invocations``)::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 JPEG/PNG>"], ...]},
     "params": {"crf": false, "threshold": 0.5}}

Response: ``{"predictions": [{"mask": "<base64 PNG>", "height": H, "width": W,
"classes": {"background": 0.99, "cat": 0.93}}, ...]}``, one per image, in order. The mask
is a VOC-palette PNG of class ids at the image's own size (``PIL.Image.open`` gives the ids).

From Python, with decoded images instead of files::

    model = mlflow.pyfunc.load_model("models:/NAME@champion")
    model.predict(pandas.DataFrame({"image": [base64_jpeg]}), params={"crf": True})
    model.get_raw_model().predict([uint8_hwc_array, ...])   # arrays skip the schema
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from vitpcm.errors import DataError
from vitpcm.run_files import MODEL_FILE

IMAGE_COLUMN = "image"


def pyfunc_signature() -> Any:
    """The served model's signature: a base64 image column in; mask, size, scores out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "mask"),
                ColSpec(DataType.long, "height"),
                ColSpec(DataType.long, "width"),
                ColSpec(Map(DataType.double), "classes"),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("crf", DataType.boolean, False),
                ParamSpec("threshold", DataType.double, 0.5),
            ]
        ),
    )


def example_image_b64(size: int = 32) -> str:
    """A small base64 PNG (a grey square on a gradient): the signature's input example."""
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    image = np.stack([*np.meshgrid(ramp, ramp[::-1]), np.full((size, size), 96, np.uint8)], -1)
    image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 128
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def input_example() -> Any:
    """The input example stored with the model (one base64 image)."""
    import pandas as pd

    return pd.DataFrame({IMAGE_COLUMN: [example_image_b64()]})


def decode_b64_image(text: Any, index: int) -> np.ndarray:
    """One base64 JPEG/PNG (``str`` or ``bytes``) -> (H, W, 3) uint8."""
    from vitpcm.predict import decode_image

    if isinstance(text, str):
        text = text.strip()
        if text.startswith("data:") and "," in text:  # a data URL
            text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise DataError(f"image {index} is not base64 ({exc}); send base64 JPEG/PNG bytes") from exc
    return decode_image(data, f"image {index}")


def mask_png_b64(mask: np.ndarray) -> str:
    """A mask as a base64 VOC-palette PNG."""
    from vitpcm.data.labels import encode_palette_png

    return base64.b64encode(encode_palette_png(mask)).decode("ascii")


class VitpcmPyfunc:
    """What the ``python_function`` flavor loads: a :class:`~vitpcm.predict.Predictor`."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor

    def _images(self, model_input: Any) -> list[np.ndarray]:
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            if IMAGE_COLUMN not in model_input.columns:
                raise DataError(f"the input needs an {IMAGE_COLUMN!r} column of base64 images")
            values = list(model_input[IMAGE_COLUMN])
        elif isinstance(model_input, dict):
            values = list(np.atleast_1d(model_input.get(IMAGE_COLUMN, [])))
        elif isinstance(model_input, np.ndarray) and model_input.ndim == 4:
            values = list(model_input)
        else:
            values = list(model_input)
        images = []
        for index, value in enumerate(values):
            if isinstance(value, str | bytes):
                images.append(decode_b64_image(value, index))
            else:
                images.append(np.asarray(value))
        return images

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """Masks and class scores for every image of ``model_input``.

        Args:
            model_input: a DataFrame (or dict) with an ``image`` column of base64 JPEG/PNG,
                or a sequence of (H, W, 3) uint8 arrays (or a (N, H, W, 3) array).
            params: ``crf`` (bool, default False), ``threshold`` (class presence score).

        Returns:
            A DataFrame, one row per image: ``mask`` (base64 palette PNG at the image's
            size), ``height``, ``width``, ``classes`` ({name: score} of present classes).
        """
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        params = params or {}
        crf = bool(params.get("crf", False))
        threshold = params.get("threshold")
        try:
            images = self._images(model_input)
            rows = []
            for image in images:
                mask, scores = self.predictor.predict(image, crf=crf, threshold=threshold)
                rows.append(
                    {
                        "mask": mask_png_b64(mask),
                        "height": int(mask.shape[0]),
                        "width": int(mask.shape[1]),
                        "classes": scores,
                    }
                )
        except DataError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        return pd.DataFrame(rows, columns=["mask", "height", "width", "classes"])

    def get_raw_model(self) -> VitpcmPyfunc:
        """This object, whose :meth:`predict` also takes decoded arrays (no schema check)."""
        return self

    def predict_arrays(
        self, images: Sequence[np.ndarray], crf: bool = False
    ) -> list[tuple[np.ndarray, dict[str, float]]]:
        """``(mask, scores)`` of each decoded image, masks as arrays."""
        return [self.predictor.predict(image, crf=crf) for image in images]


def _load_pyfunc(data_path: str) -> VitpcmPyfunc:
    """MLflow's entry point: ``data_path`` is the model's ``data`` folder."""
    import os

    from vitpcm.predict import load_predictor

    return VitpcmPyfunc(load_predictor(os.path.join(data_path, MODEL_FILE)))
