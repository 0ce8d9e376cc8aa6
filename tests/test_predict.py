"""``vitpcm predict``: masks for one's own images, checked against ``vitpcm test``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.s3_server import S3Server, s3_bucket, s3_server  # noqa: F401  (fixtures)
from helpers.tiny import TINY_OVERRIDES, tiny_config
from vitpcm.cli import main
from vitpcm.config import save_config
from vitpcm.predict import load_predictor

# Sharpen the random classifier so several classes clear the 0.5 presence threshold.
CLASSIFIER_GAIN = 40.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model folder and a converted dataset whose test split has no masks."""
    from vitpcm.data.convert import convert_dataset
    from vitpcm.data.synth import make_synthetic
    from vitpcm.model.vitpcm import build_vitpcm, patch_classifier_of

    root = tmp_path_factory.mktemp("predict")
    raw_root = make_synthetic(root / "raw", train=4, val=2, test=6, size=64, seed=1, progress=False)
    raw = raw_root / "VOCdevkit" / "VOC2012"
    test_ids = (raw / "ImageSets" / "Segmentation" / "test.txt").read_text().split()
    for name in test_ids:  # like the real VOC test split: images only, so the model decides
        (raw / "SegmentationClass" / f"{name}.png").unlink()
    data = root / "tfrecords"
    convert_dataset("voc12", raw_root, data, workers=1, progress=False)
    cfg = tiny_config("model.pretrained=null")
    model = build_vitpcm(cfg.model, cfg.data.num_classes)
    kernel = patch_classifier_of(model).kernel
    kernel.assign(kernel.numpy() * CLASSIFIER_GAIN)
    folder = root / "model"
    folder.mkdir()
    model.save(folder / "model.keras")
    save_config(cfg, folder / "config.yaml")
    images = root / "images"
    images.mkdir()
    for name in test_ids:
        (images / f"{name}.jpg").write_bytes((raw / "JPEGImages" / f"{name}.jpg").read_bytes())
    return {"root": root, "data": data, "model": folder, "images": images}


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_equals_vitpcm_test_with_and_without_crf(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    # Reference: the test path over the converted split (its own decoding and batching).
    ref = tmp_path / "test-out"
    args = ["-c", "synthetic", "--set", "model.pretrained=null"]
    for item in TINY_OVERRIDES:
        args += ["--set", item]
    rc = main(
        [
            "test",
            *args,
            "-m",
            str(setup["model"]),
            "--data",
            str(setup["data"]),
            "--split",
            "test",
            "--out",
            str(ref),
            "--crf",
            "--no-progress",
        ]
    )
    assert rc == 0
    out = tmp_path / "pred"
    rc = main(
        [
            "predict",
            "-m",
            str(setup["model"]),
            str(setup["images"]),
            "--out",
            str(out),
            "--crf",
            "--overlays",
            "--workers",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0
    records = _lines(out / "predictions.jsonl")
    stems = sorted(p.stem for p in setup["images"].iterdir())
    assert [Path(r["image"]).stem for r in records] == stems
    non_background = 0
    for record in records:
        stem = Path(record["image"]).stem
        mask = _png(out / record["mask"])
        assert Image.open(out / record["mask"]).mode == "P"
        np.testing.assert_array_equal(mask, _png(ref / "pseudo_masks_crf" / f"{stem}.png"))
        assert (record["height"], record["width"]) == mask.shape
        overlay = Image.open(out / record["overlay"])
        assert overlay.format == "JPEG" and overlay.size == (mask.shape[1], mask.shape[0])
        non_background += int(len(record["classes"]) > 1)
    assert non_background >= 2  # the comparison covered real multi-class merges

    plain = tmp_path / "plain"
    assert main(["predict", "-m", str(setup["model"]), str(setup["images"]), "--out", str(plain),
                 "--no-progress"]) == 0  # fmt: skip
    for record in _lines(plain / "predictions.jsonl"):
        stem = Path(record["image"]).stem
        expected = _png(ref / "pseudo_masks" / f"{stem}.png")
        np.testing.assert_array_equal(_png(plain / record["mask"]), expected)
    assert not (plain / "overlays").exists()


def test_classes_are_the_models_own_scores(setup: dict[str, Path], tmp_path: Path) -> None:
    import keras

    from vitpcm.data.augment import resize_image
    from vitpcm.data.synth import SYNTH_CLASSES

    out = tmp_path / "pred"
    first = sorted(setup["images"].iterdir())[0]
    assert main(["predict", "-m", str(setup["model"] / "model.keras"), str(first),
                 "--out", str(out), "--threshold", "0.3", "--no-progress"]) == 0  # fmt: skip
    (record,) = _lines(out / "predictions.jsonl")
    model = keras.models.load_model(setup["model"] / "model.keras", compile=False)
    import tensorflow as tf

    image = tf.io.decode_jpeg(first.read_bytes(), channels=3)  # as the TFRecord reader does
    scores = model(resize_image(image, 64)[None])["class_probs"][0].numpy()
    expected = {
        SYNTH_CLASSES[i]: pytest.approx(float(scores[i]), abs=2e-3)
        for i in range(len(scores))
        if i == 0 or scores[i] >= 0.3
    }
    assert record["classes"] == expected


def test_predictor_api_keeps_the_image_size(setup: dict[str, Path]) -> None:
    predictor = load_predictor(str(setup["model"]))
    assert predictor.image_size == 64
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (37, 91, 3), dtype=np.uint8)
    mask, scores = predictor.predict(image)
    assert mask.shape == (37, 91) and mask.dtype == np.uint8
    assert "background" in scores
    present = [predictor.class_names.index(name) for name in scores]
    assert set(np.unique(mask)) <= set(present)
    crf_mask, crf_scores = predictor.predict(image, crf=True)
    assert crf_mask.shape == (37, 91) and crf_scores == scores
    assert set(np.unique(crf_mask)) <= set(present)


def test_bad_images_are_skipped_counted_and_fail_the_exit_code(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted(setup["images"].iterdir())[:2]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    truncated = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(truncated, format="PNG")
    (folder / "cut.png").write_bytes(truncated.getvalue()[:30])
    (folder / "notes.txt").write_text("not an image, not an input")
    # A grey PNG of another size: accepted, mask at its own size.
    Image.fromarray(np.full((30, 50), 128, np.uint8)).save(folder / "grey.png")
    out = tmp_path / "pred"
    rc = main(["predict", "-m", str(setup["model"]), str(folder), "--out", str(out),
               "--no-progress"])  # fmt: skip
    assert rc == 1
    err = capsys.readouterr().err
    assert "error: 2 of 5 images failed" in err
    records = _lines(out / "predictions.jsonl")
    assert sorted(Path(r["image"]).name for r in records) == sorted(
        [p.name for p in good] + ["grey.png"]
    )
    assert _png(out / "grey.png").shape == (30, 50)
    failures = _lines(out / "failures.jsonl")
    assert sorted(Path(f["image"]).name for f in failures) == ["broken.jpg", "cut.png"]
    assert all("not a readable JPEG/PNG" in f["error"] for f in failures)


def test_bad_arguments_give_one_error_and_write_nothing(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(setup["model"])
    out = tmp_path / "pred"
    assert main(["predict", "-m", model, str(tmp_path / "nope.jpg"), "--out", str(out)]) == 2
    assert "error: input" in capsys.readouterr().err and not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "-m", model, str(empty), "--out", str(out)]) == 2
    assert "holds no .jpg/.jpeg/.png" in capsys.readouterr().err and not out.exists()
    images = str(setup["images"])
    assert main(["predict", "-m", model, images, "--out", str(out), "--size", "60"]) == 2
    assert "multiple of the model's patch size 8" in capsys.readouterr().err
    assert main(["predict", "-m", str(tmp_path / "no-model"), images, "--out", str(out)]) == 2
    assert "cannot read model" in capsys.readouterr().err
    assert not out.exists()
    mine = tmp_path / "someone-elses"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    assert main(["predict", "-m", model, images, "--out", str(mine), "--no-progress"]) != 0
    assert "not empty and was not written by `vitpcm predict`" in capsys.readouterr().err
    assert (mine / "keep.txt").read_text() == "x" and len(list(mine.iterdir())) == 1
    inside = setup["images"] / "masks"
    assert main(["predict", "-m", model, images, "--out", str(inside), "--no-progress"]) != 0
    assert "inside the input INPUT" in capsys.readouterr().err and not inside.exists()


def test_predict_replaces_its_own_output(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pred"
    first = sorted(setup["images"].iterdir())
    assert main(["predict", "-m", str(setup["model"]), str(first[0]), "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["predict", "-m", str(setup["model"]), str(first[1]), "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    assert sorted(p.name for p in out.glob("*.png")) == [f"{first[1].stem}.png"]


@pytest.mark.slow
def test_predict_reads_and_writes_s3(
    setup: dict[str, Path],
    s3_bucket: S3Server,  # noqa: F811
    tmp_path: Path,
) -> None:
    import os
    import subprocess
    import sys

    client = s3_bucket.client()
    images = sorted(setup["images"].iterdir())[:2]
    for path in images:
        client.upload_file(str(path), s3_bucket.bucket, f"photos/{path.name}")
    vitpcm = str(Path(sys.executable).parent / "vitpcm")
    command = [vitpcm, "predict", "-m", str(setup["model"]), s3_bucket.uri("photos"),
               "--out", s3_bucket.uri("masks"), "--no-progress"]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, **s3_bucket.env()}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    local = tmp_path / "local"
    assert main(["predict", "-m", str(setup["model"]), *map(str, images), "--out", str(local),
                 "--no-progress"]) == 0  # fmt: skip
    keys = s3_bucket.list_keys("masks")
    for path in images:
        assert f"masks/{path.stem}.png" in keys
        served = np.asarray(Image.open(io.BytesIO(s3_bucket.read(f"masks/{path.stem}.png"))))
        np.testing.assert_array_equal(served, _png(local / f"{path.stem}.png"))
    lines = s3_bucket.read("masks/predictions.jsonl").decode().splitlines()
    assert [json.loads(x)["image"] for x in lines] == [
        s3_bucket.uri(f"photos/{p.name}") for p in images
    ]
