"""``vitpcm weights import-reference``: the authors' Keras 2 HDF5 checkpoints.

The checkpoint is written from random arrays with the names, order and attributes of the
authors' TF 2.9.1 S/16 VOC file (12 blocks, 6 heads, 24x24 position grid), widths scaled
down; the imported model must reproduce the NumPy forward pass of those same arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers.reference_numpy import (
    Dims,
    load_layout,
    random_arrays,
    reference_forward,
    reference_shape,
    write_reference_h5,
)
from vitpcm.cli import main
from vitpcm.config import load_config
from vitpcm.predict import load_predictor

TINY = Dims(d=24, mlp=48, heads=6, lstm=8, classes=21)
TINY_SET = (
    "model.backbone=custom",
    "model.patch_size=16",
    f"model.hidden_dim={TINY.d}",
    "model.depth=12",
    f"model.num_heads={TINY.heads}",
    f"model.mlp_dim={TINY.mlp}",
    "model.pos_embed_grid=24",
    f"model.lstm_units={TINY.lstm}",
)


def _sets(*extra: str) -> list[str]:
    args = []
    for item in (*TINY_SET, *extra):
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    layout = load_layout()
    arrays = random_arrays(layout, TINY, seed=7)
    path = tmp_path_factory.mktemp("reference") / "model.12-0.66.h5"
    return write_reference_h5(path, layout, arrays), arrays


def test_shape_rules_reproduce_the_real_layout() -> None:
    layout = load_layout()
    names = [w["name_in_group"] for layer in layout["layers"] for w in layer["weights"]]
    assert len(names) == layout["num_weights"] == 211
    for layer in layout["layers"]:
        for weight in layer["weights"]:
            assert reference_shape(weight["name_in_group"], Dims()) == tuple(weight["shape"])
    total = sum(int(np.prod(reference_shape(n, Dims()))) for n in names)
    assert total == layout["num_params"] == 23_600_256


@pytest.mark.slow
def test_imported_model_reproduces_the_reference_forward_pass(
    checkpoint: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    from vitpcm.eval import load_model

    path, arrays = checkpoint
    out = tmp_path / "imported"
    rc = main(["weights", "import-reference", str(path), "-c", "voc12_vit_s16", *_sets(),
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    cfg = load_config(out / "config.yaml")
    assert cfg.model.gelu == "exact" and cfg.model.pretrained is None
    model = load_model(str(out))  # what eval, test and predict load
    assert model.get_layer("backbone").gelu == "exact"
    images = np.random.default_rng(1).uniform(0, 255, (2, 384, 384, 3)).astype(np.float32)
    outputs = model(images, training=False)
    expected_patches, expected_classes = reference_forward(arrays, images, TINY.heads)
    patch_probs = outputs["patch_probs"].numpy()
    error = np.abs(patch_probs - expected_patches).max()
    np.testing.assert_allclose(patch_probs, expected_patches, atol=1e-5)
    np.testing.assert_allclose(outputs["class_probs"].numpy(), expected_classes, atol=1e-5)
    # The GELU setting matters at this tolerance: the tanh form is measurably further away.
    tanh_patches, _ = reference_forward(arrays, images, TINY.heads, exact_gelu=False)
    assert np.abs(tanh_patches - expected_patches).max() > 5 * max(error, 1e-5)
    assert (out / "reference.json").exists()
    # the folder is a model `vitpcm predict` takes as it is
    mask, scores = load_predictor(str(out), size=384).predict(images[0].astype(np.uint8))
    assert mask.shape == (384, 384) and "background" in scores


def test_string_attributes_may_be_str(
    checkpoint: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    from vitpcm.model.reference_weights import read_reference_h5

    _, arrays = checkpoint
    path = write_reference_h5(tmp_path / "str.h5", load_layout(), arrays, as_bytes=False)
    read, attributes = read_reference_h5(path.read_bytes(), str(path))
    assert len(read) == 211 and attributes["keras_version"] == "2.9.0"
    assert "patch_conditioning/backward_lstm_cols/lstm_cell/bias" in read


def test_wrong_files_and_configs_are_refused_by_name(
    checkpoint: tuple[Path, dict[str, np.ndarray]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, arrays = checkpoint
    out = tmp_path / "out"

    def run(file: Path, *extra: str) -> str:
        rc = main(["weights", "import-reference", str(file), "-c", "voc12_vit_s16", *extra,
                   "--out", str(out)])  # fmt: skip
        assert rc != 0 and not out.exists()
        return capsys.readouterr().err

    # an S/16 file with a B/16-sized config: every mismatch named with both shapes
    err = run(path, *_sets("model.hidden_dim=48", "model.mlp_dim=96"))
    assert "does not fit the model" in err and "embedding/kernel (16, 16, 3, 24)" in err
    # the COCO classifier against a VOC config
    err = run(path, *_sets("data.num_classes=81"))
    assert "patch_classifier/kernel (32, 21) (model needs (32, 81))" in err
    # a file with one array missing
    layout = load_layout()
    for layer in layout["layers"]:
        layer["weights"] = [w for w in layer["weights"] if "encoderblock_3/Dense_1/bias" not in
                            w["name_in_group"]]  # fmt: skip
    short = write_reference_h5(tmp_path / "short.h5", layout, arrays)
    assert "lacks Transformer/encoderblock_3/Dense_1/bias" in run(short, *_sets())
    # fewer blocks in the config than in the file
    assert "has arrays the model does not" in run(path, *_sets("model.depth=11"))
    # not HDF5 at all
    bogus = tmp_path / "bogus.h5"
    bogus.write_bytes(b"not an hdf5 file")
    assert "is not an HDF5 file" in run(bogus, *_sets())
    assert "error: " in run(tmp_path / "missing.h5", *_sets())
