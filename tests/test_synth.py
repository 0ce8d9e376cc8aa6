"""The synthetic dataset: VOC layout, determinism, and a real shape+texture problem."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from vitpcm.data import synth
from vitpcm.data.labels import check_label_values, decode_label_png, image_labels_from_mask
from vitpcm.data.synth import (
    CLASS_HUES,
    CONTEXT_HUE_OFFSET,
    HUE_JITTER,
    SYNTH_CLASSES,
    make_synthetic,
)
from vitpcm.errors import DataError
from vitpcm.outputs import OutputError

SIZE = 96
COUNTS = {"train": 60, "val": 10, "test": 10}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    make_synthetic(out, size=SIZE, seed=3, progress=False, **COUNTS)
    return out


def _voc(out):
    return out / "VOCdevkit" / "VOC2012"


def _ids(out, split):
    return (_voc(out) / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _load(out, name):
    image_bytes = (_voc(out) / "JPEGImages" / f"{name}.jpg").read_bytes()
    image = Image.open(io.BytesIO(image_bytes))
    assert image.format == "JPEG"
    assert image.mode == "RGB"
    mask = decode_label_png((_voc(out) / "SegmentationClass" / f"{name}.png").read_bytes(), name)
    return np.asarray(image), mask


def _files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_layout(dataset):
    voc = _voc(dataset)
    ids = {split: _ids(dataset, split) for split in ("train", "val", "trainval", "test")}
    assert {k: len(v) for k, v in ids.items()} == {
        "train": 60,
        "val": 10,
        "trainval": 70,
        "test": 10,
    }
    assert ids["trainval"] == ids["train"] + ids["val"]
    every = ids["train"] + ids["val"] + ids["test"]
    assert len(set(every)) == 80
    assert ids["train"][:2] == ["synth_000000", "synth_000001"]
    assert ids["test"][-1] == "synth_000079"
    assert sorted(p.stem for p in (voc / "JPEGImages").iterdir()) == sorted(every)
    assert sorted(p.stem for p in (voc / "SegmentationClass").iterdir()) == sorted(every)
    assert (voc / "classes.txt").read_text().splitlines() == list(SYNTH_CLASSES)
    assert SYNTH_CLASSES[0] == "background"
    assert len(SYNTH_CLASSES) == 6
    marker = json.loads((dataset / "synth.json").read_text())
    assert marker["size"] == SIZE
    assert marker["seed"] == 3
    # Nothing but the dataset was left next to it (no temporary folders).
    assert [p.name for p in dataset.parent.iterdir()] == ["data"]


def test_images_and_masks_align_and_labels_derive(dataset):
    seen = {split: set() for split in COUNTS}
    for split in COUNTS:
        for name in _ids(dataset, split):
            image, mask = _load(dataset, name)
            assert image.shape == (SIZE, SIZE, 3)
            assert mask.shape == (SIZE, SIZE)
            check_label_values(mask, len(SYNTH_CLASSES), name)
            present = image_labels_from_mask(mask, len(SYNTH_CLASSES))
            assert present[0] == 1  # objects never fill the image
            assert 1 <= present[1:].sum() <= 3
            seen[split] |= set(np.flatnonzero(present[1:]) + 1)
    for split in COUNTS:
        assert seen[split] == {1, 2, 3, 4, 5}, split


def test_object_sizes(dataset):
    fractions = []
    for name in _ids(dataset, "train"):
        _, mask = _load(dataset, name)
        fractions.append((mask > 0).mean())
    fractions = np.array(fractions)
    # About a quarter of the pixels are foreground on average, as in VOC.
    assert 0.15 < fractions.mean() < 0.4, fractions.mean()
    assert fractions.min() > 0.02
    assert fractions.max() < 0.9  # there is always some background to tell objects from
    assert np.ptp(fractions) > 0.2  # sizes vary


def _erode(region: np.ndarray, steps: int) -> np.ndarray:
    out = region.copy()
    for _ in range(steps):
        padded = np.pad(out, 1)
        out = out & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return out


def _box5(a: np.ndarray) -> np.ndarray:
    padded = np.pad(a, 2, mode="edge")
    h, w = a.shape
    return sum(padded[i : i + h, j : j + w] for i in range(5) for j in range(5)) / 25.0


def _texture_features(gray: np.ndarray, region: np.ndarray) -> list[float]:
    """Colour-free texture statistics of one object (structure tensor, binariness, edges)."""
    g = gray.astype(np.float64)
    gy, gx = np.gradient(g)
    values = g[region]
    jxx, jyy, jxy = (gx * gx)[region].mean(), (gy * gy)[region].mean(), (gx * gy)[region].mean()
    global_coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy + 1e-9)
    lxx, lyy, lxy = _box5(gx * gx), _box5(gy * gy), _box5(gx * gy)
    local = np.sqrt((lxx - lyy) ** 2 + 4 * lxy**2) / (lxx + lyy + 1e-9)
    threshold = (values.min() + values.max()) / 2
    minority = min((values > threshold).mean(), (values <= threshold).mean())
    edges = np.hypot(gx, gy)[region].mean() / (values.std() + 1e-6)
    return [global_coherence, local[region].mean(), minority, edges]


def test_classes_have_distinct_textures(dataset):
    features, classes = [], []
    for split in ("train", "val", "test"):
        for name in _ids(dataset, split):
            image, mask = _load(dataset, name)
            gray = image.astype(np.float64) @ [0.299, 0.587, 0.114]
            for cls in range(1, 6):
                region = _erode(mask == cls, 2)
                if region.sum() >= 60:
                    features.append(_texture_features(gray, region))
                    classes.append(cls)
    features, classes = np.array(features), np.array(classes)
    assert np.bincount(classes, minlength=6)[1:].min() >= 5
    features = (features - features.mean(0)) / features.std(0)
    # Nearest class centroid, fitted on every other object and scored on the rest:
    # colours are random per instance, so only texture can make this work.
    fit = np.arange(len(classes)) % 2 == 0
    centroids = np.stack([features[fit & (classes == c)].mean(0) for c in range(1, 6)])
    distances = ((features[~fit, None, :] - centroids[None]) ** 2).sum(-1)
    accuracy = (distances.argmin(1) + 1 == classes[~fit]).mean()
    assert accuracy > 0.6, accuracy  # chance is 0.2


def _hues(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).convert("HSV"))[..., 0] / 256.0


def _hue_distance(a: np.ndarray, b: float) -> np.ndarray:
    return np.abs((a - b + 0.5) % 1.0 - 0.5)


def test_classes_come_in_hue_families_and_clutter_spans_all_hues(dataset):
    background_hues = []
    for name in _ids(dataset, "train"):
        image, mask = _load(dataset, name)
        hues = _hues(image)
        for cls in np.unique(mask[mask > 0]):
            region = _erode(mask == cls, 2)
            if region.sum() < 30:
                continue
            # The circular mean hue of an object stays near its class's hue (JPEG slack).
            angles = hues[region] * 2 * np.pi
            mean = np.arctan2(np.sin(angles).mean(), np.cos(angles).mean()) / (2 * np.pi) % 1.0
            assert _hue_distance(mean, CLASS_HUES[int(cls)]) < HUE_JITTER + 0.03, (name, cls)
        background_hues.append(hues[mask == 0])
    # Background and clutter take every hue, each class's family included, so hue alone
    # does not mark object pixels: shape and texture still matter for localisation.
    background = np.concatenate(background_hues)
    for hue in CLASS_HUES.values():
        share = (_hue_distance(background, hue) < 0.1).mean()
        assert share > 0.05, (hue, share)


def test_backgrounds_co_occur_with_classes(dataset):
    # Background pixels in a class's context hue are far more common in images of that class.
    with_class = {cls: [] for cls in CLASS_HUES}
    without = {cls: [] for cls in CLASS_HUES}
    for name in _ids(dataset, "train"):
        image, mask = _load(dataset, name)
        hues = _hues(image)[mask == 0]
        for cls, hue in CLASS_HUES.items():
            share = (_hue_distance(hues, hue + CONTEXT_HUE_OFFSET) < 0.03).mean()
            (with_class if np.any(mask == cls) else without)[cls].append(share)
    for cls in CLASS_HUES:
        assert np.mean(with_class[cls]) > 2 * np.mean(without[cls]), cls


def test_deterministic(tmp_path):
    kwargs = {"train": 4, "val": 2, "test": 2, "size": 48, "seed": 11, "progress": False}
    make_synthetic(tmp_path / "a", **kwargs)
    make_synthetic(tmp_path / "b", **kwargs)
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(first) == 8 + 8 + 4 + 2  # jpg, png, split lists, classes.txt + synth.json
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)
    make_synthetic(tmp_path / "c", **{**kwargs, "seed": 12})
    other = _files(tmp_path / "c")
    jpgs = [k for k in first if k.endswith(".jpg")]
    assert all(first[k] != other[k] for k in jpgs)


def test_rerun_into_own_output_and_refuse_foreign(tmp_path):
    kwargs = {"train": 2, "val": 1, "test": 0, "size": 32, "progress": False}
    out = tmp_path / "own"
    make_synthetic(out, **kwargs)
    before = _files(out)
    make_synthetic(out, **kwargs)
    assert _files(out) == before
    assert _ids(out, "test") == []

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty and was not written by"):
        make_synthetic(foreign, **kwargs)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    make_synthetic(empty, **kwargs)
    assert (empty / "synth.json").is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 31}, "--size 31 is too small"),
        ({"train": 0}, "--train 0 and --val 100"),
        ({"val": 0}, "--val 0 must both be at least 1"),
        ({"test": -1}, "--test -1"),
        ({"seed": -2}, "--seed -2"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        make_synthetic(tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def test_remote_output_refused():
    with pytest.raises(DataError, match="local folder"):
        make_synthetic("s3://bucket/synth", progress=False)


def test_readme_defaults_are_the_benchmarked_ones(tmp_path, monkeypatch, capsys):
    """`vitpcm data synth` without flags writes what bench/learning.py measures, and the
    synthetic config scores the held-out test split (which has masks), not val."""
    import importlib.util
    import inspect
    from pathlib import Path

    from pipeline.pipeline import vitpcm_single_node_pipeline
    from vitpcm import cli
    from vitpcm.config import load_config

    seen = {}

    def fake(out, **kwargs):
        seen.update(kwargs)
        return Path(out)

    monkeypatch.setattr(synth, "make_synthetic", fake)
    assert cli.main(["data", "synth", "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    defaults = {
        "train": synth.DEFAULT_TRAIN, "val": synth.DEFAULT_VAL,
        "test": synth.DEFAULT_TEST, "size": synth.DEFAULT_SIZE,
    }  # fmt: skip
    assert {k: seen[k] for k in defaults} == defaults
    assert (defaults["train"], defaults["val"], defaults["test"]) == (2000, 100, 200)
    # --help names the same numbers.
    with pytest.raises(SystemExit):
        cli.main(["data", "synth", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag in ("train", "val", "test", "size"):
        said = re.search(rf"--{flag} {flag.upper()} [^()]*\((\d+)\)", help_text)
        assert said and int(said.group(1)) == defaults[flag], (flag, help_text)
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("learning", root / "bench" / "learning.py")
    learning = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(learning)
    assert {k: learning.FULL[k] for k in ("train", "val", "test")} == {
        k: defaults[k] for k in ("train", "val", "test")
    }
    assert learning.FULL["overrides"] == []
    params = inspect.signature(vitpcm_single_node_pipeline.pipeline_func).parameters
    assert [params[f"synthetic_{k}"].default for k in defaults] == list(defaults.values())
    cfg = load_config("synthetic")
    assert (cfg.data.val_split, cfg.data.test_split) == ("val", "test")
