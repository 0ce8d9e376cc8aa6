"""A small synthetic weakly supervised segmentation dataset in the PASCAL VOC layout.

Each image holds 1-3 objects of 5 classes on a cluttered background. A class is told by
its **shape, its texture family and its hue family** together: an object is textured in a
light and a dark shade of its class's hue (5 hues evenly spaced, small jitter), while the
smooth background, the flat blobs and the lines of the clutter take any colour, so hue
narrows the class down but never marks the object pixels by itself:

=========  ==========  ==========================================
label      shape       texture
=========  ==========  ==========================================
1 disc     circle      stripes at a random angle and period
2 triangle triangle    checkerboard at a random angle and cell size
3 square   square      grid of dots (rotated, random spacing)
4 ring     annulus     concentric circles
5 star     5-point     thresholded smooth-noise blobs
=========  ==========  ==========================================

Why hue families: the method localises objects from image labels with features that
already tell classes apart (ImageNet-pretrained ViTs in the paper). A tiny ViT trained from
scratch on two CPU cores learns colour-invariant texture classes far too slowly for a
minutes-long run (measured: no progress over the class prior after 8 epochs of 1000 images,
against steady progress with hue families); the hue plays the pretrained features' part,
and localising the textured shapes among same-coloured clutter is still left to learn.
Textures are fine (periods of 3-6 px at 128 px, ``TEXTURE_UNIT``), so every 8 px patch of
an object holds both of its shades, much as every 16 px patch of a dog in a 384 px photo
shows fur: with coarse stripes a max-pooled classifier learns to fire on one shade only.

Objects are 30-80% of the image side (``OBJECT_SIDE``), so about a quarter of the pixels
are foreground, as in VOC, where most images show one or two large objects; with 15-45%
(a tenth foreground, objects 2-7 patches across on the 16x16 grid) a patch-level method
loses most of each object to its boundary ring. A later object is drawn on top of an
earlier one and the mask follows, but every object keeps at least half of its pixels
visible.

Backgrounds co-occur with classes, as water with boats and rails with trains in VOC: each
class has a *context scene* (broad wavy bands in a hue between the class hues), shown behind
an image's first object with probability ``CONTEXT_PROB`` and behind a random image with
``STRAY_CONTEXT_PROB``. A context patch predicts its class almost as well as an object patch
does, but it is background: a classifier whose loss rewards covering the image with the class
(average pooling) learns to paint the scene, while max pooling only needs the one patch
that tells the class best, the object's.

The output flows through ``vitpcm data convert --dataset voc12`` like the real thing:
``<out>/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}`` plus
``classes.txt`` (class names, background first), which the converter reads in place of
the VOC names. Test images get masks too, so inference on them can be scored.

Every image is drawn from its own random generator seeded by ``(seed, split, index)``,
so the same arguments give byte-identical files, whatever the order of generation.
"""

from __future__ import annotations

import colorsys
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vitpcm import outputs, storage
from vitpcm.data.labels import encode_palette_png
from vitpcm.data.sources.synthetic import SYNTH_CLASSES
from vitpcm.errors import DataError

MARKER = "synth.json"
"""File at the output root that marks a folder as written by :func:`make_synthetic`."""

MIN_SIZE = 32
JPEG_QUALITY = 90
_GENERATOR = "vitpcm data synth"
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_MIN_VISIBLE = 0.5  # an object hidden more than this by later ones is re-placed
_PLACEMENT_TRIES = 20
# Hue (0..1) each object class is drawn around, evenly spaced; background and clutter are
# drawn from all colours, so hue narrows the class down without marking object pixels.
CLASS_HUES: dict[int, float] = {cls: (cls - 1) / 5 for cls in range(1, 6)}
HUE_JITTER = 0.04
# Texture scale as a fraction of the image side: 4 px at 128 px, so any 8 px patch of an
# object holds both shades and every patch of it looks alike (see the module docstring).
TEXTURE_UNIT = 1 / 32
# Object diameter as a fraction of the image side, drawn uniformly from this range.
OBJECT_SIDE = (0.3, 0.8)
# Co-occurring context (see the module docstring): the chance that an image shows the scene
# of its first object's class, and that it shows a random class's scene instead.
CONTEXT_PROB = 0.7
STRAY_CONTEXT_PROB = 0.15
CONTEXT_HUE_OFFSET = 0.1  # halfway between two class hues

# Default split sizes: what ``vitpcm data synth`` writes without flags and what the learning
# benchmark (bench/learning.py) measures, so README's step-by-step commands are the measured
# ones. 2000 training images reach a held-out BPM mIoU above 0.8 with configs/synthetic.yaml
# in about 10 minutes on 2 CPU cores; 200 (the earlier default) stay below 0.5.
DEFAULT_TRAIN = 2000
DEFAULT_VAL = 100
DEFAULT_TEST = 200
DEFAULT_SIZE = 128

Texture = Callable[[np.random.Generator, np.ndarray, np.ndarray, float], np.ndarray]


def make_synthetic(
    out: str | os.PathLike[str],
    train: int = DEFAULT_TRAIN,
    val: int = DEFAULT_VAL,
    test: int = DEFAULT_TEST,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the synthetic dataset under ``<out>/VOCdevkit/VOC2012/``.

    The folder is built under a temporary name and moved into place when complete.
    Running again into a folder this function wrote replaces it (same arguments give
    the same bytes); any other non-empty folder is refused.

    Args:
        out: Local output folder.
        train: Number of training images (>= 1).
        val: Number of validation images (>= 1).
        test: Number of test images (>= 0).
        size: Image side in pixels (>= 32).
        seed: Non-negative seed.
        progress: Show a progress bar.

    Returns:
        The output folder.

    Raises:
        DataError: Bad arguments, a remote or foreign output folder.
    """
    _check_args(out, train, val, test, size, seed)
    final = Path(storage.local_path(out))
    # synth.json (MARKER) is this output's ownership marker (vitpcm.outputs knows it).
    outputs.claim_output(final, "data synth")
    from tqdm import tqdm

    splits = {"train": train, "val": val, "test": test}
    ids: dict[str, list[str]] = {}
    start = 0
    for split, count in splits.items():  # ids are unique across splits
        ids[split] = [f"synth_{start + i:06d}" for i in range(count)]
        start += count
    with storage.atomic_dir(final) as tmp:
        root = Path(tmp) / "VOCdevkit" / "VOC2012"
        images = root / "JPEGImages"
        masks = root / "SegmentationClass"
        lists = root / "ImageSets" / "Segmentation"
        for folder in (images, masks, lists):
            folder.mkdir(parents=True, exist_ok=True)
        with tqdm(total=start, desc="synthetic images", unit="img", disable=not progress) as bar:
            for split, names in ids.items():
                for index, name in enumerate(names):
                    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
                    image, label = render_sample(rng, size, first_class=1 + index % 5)
                    (images / f"{name}.jpg").write_bytes(_encode_jpeg(image))
                    (masks / f"{name}.png").write_bytes(encode_palette_png(label))
                    bar.update(1)
        for split, names in {**ids, "trainval": ids["train"] + ids["val"]}.items():
            (lists / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
        (root / "classes.txt").write_text("".join(f"{c}\n" for c in SYNTH_CLASSES))
        params = {"generator": _GENERATOR, "classes": list(SYNTH_CLASSES), **splits}
        params.update(size=size, seed=seed, jpeg_quality=JPEG_QUALITY)
        (Path(tmp) / MARKER).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    return final


def _check_args(
    out: str | os.PathLike[str], train: int, val: int, test: int, size: int, seed: int
) -> None:
    if storage.is_remote(out):
        raise DataError(
            f"synthetic data is written to a local folder, not {out}; write it locally "
            "and upload the TFRecords made by `vitpcm data convert`"
        )
    if size < MIN_SIZE:
        raise DataError(f"--size {size} is too small; use at least {MIN_SIZE} pixels")
    if train < 1 or val < 1:
        raise DataError(f"--train {train} and --val {val} must both be at least 1")
    if test < 0:
        raise DataError(f"--test {test} must be 0 or more")
    if seed < 0:
        raise DataError(f"--seed {seed} must be 0 or more")


def _encode_jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# --- drawing ---------------------------------------------------------------------------


def render_sample(
    rng: np.random.Generator, size: int, first_class: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image and its label map.

    Args:
        rng: The generator every random choice comes from.
        size: Image side in pixels.
        first_class: Class of the first object (cycled by the caller so every class
            appears in any split of 5 images or more); random when None.

    Returns:
        ``(image (size, size, 3) uint8, label (size, size) uint8)``.
    """
    first = first_class or int(rng.integers(1, 6))
    canvas = _background(rng, size, _scene(rng, first))
    label = np.zeros((size, size), dtype=np.uint8)
    owner = np.full((size, size), -1, dtype=np.int8)  # which object each pixel shows
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    num_objects = int(rng.integers(1, 4))
    for k in range(num_objects):
        cls = first if k == 0 else int(rng.integers(1, 6))
        placed = _place(rng, size, cls, owner, k)
        if placed is None:
            continue  # no placement left the earlier objects visible enough
        shape, cy, cx, radius = placed
        texture = _TEXTURES[cls](rng, yy - cy, xx - cx, size * TEXTURE_UNIT)
        colours = _texture_colours(rng, cls)
        pixels = colours[0] + texture[..., None] * (colours[1] - colours[0])
        canvas[shape] = pixels[shape]
        label[shape] = cls
        owner[shape] = k
    noisy = canvas + rng.normal(0.0, 3.0, size=canvas.shape)
    return np.clip(noisy, 0, 255).round().astype(np.uint8), label


def _place(
    rng: np.random.Generator, size: int, cls: int, owner: np.ndarray, k: int
) -> tuple[np.ndarray, float, float, float] | None:
    """Choose where object ``k`` goes: its mask, centre and radius, or None."""
    for _ in range(_PLACEMENT_TRIES):
        radius = size * float(rng.uniform(*OBJECT_SIDE)) / 2
        cy, cx = (float(rng.uniform(radius, size - radius)) for _ in range(2))
        shape = _shape_mask(rng, cls, size, cy, cx, radius)
        if not shape.any():
            continue
        covered = owner[shape]
        visible = all(
            np.count_nonzero(covered == j) <= (1 - _MIN_VISIBLE) * np.count_nonzero(owner == j)
            for j in range(k)
            if np.any(owner == j)
        )
        if visible:
            return shape, cy, cx, radius
    return None


def _shape_mask(
    rng: np.random.Generator, cls: int, size: int, cy: float, cx: float, radius: float
) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    turn = float(rng.uniform(0, 2 * np.pi))

    def polygon(radii: list[float]) -> list[tuple[float, float]]:
        angles = turn + 2 * np.pi * np.arange(len(radii)) / len(radii)
        return [
            (cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles, strict=True)
        ]

    def disc(r: float, fill: int) -> None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)

    if cls == 1:
        disc(radius, 1)
    elif cls == 2:
        draw.polygon(polygon([radius] * 3), fill=1)
    elif cls == 3:
        draw.polygon(polygon([radius] * 4), fill=1)
    elif cls == 4:
        disc(radius, 1)
        disc(radius * float(rng.uniform(0.45, 0.6)), 0)
    else:
        draw.polygon(polygon([radius, radius * 0.45] * 5), fill=1)
    return np.asarray(image, dtype=bool)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    # Background and clutter: any colour, so a flat blob may share an object's hue.
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), np.float32) * 255.0


def _texture_colours(rng: np.random.Generator, cls: int) -> tuple[np.ndarray, np.ndarray]:
    """A light and a dark shade of the class's hue family (see the module docstring)."""
    hue = CLASS_HUES[cls] + float(rng.uniform(-HUE_JITTER, HUE_JITTER))
    light = _hsv(hue, float(rng.uniform(0.55, 0.9)), float(rng.uniform(0.8, 1.0)))
    dark = _hsv(hue, float(rng.uniform(0.6, 1.0)), float(rng.uniform(0.25, 0.5)))
    return (light, dark) if rng.random() < 0.5 else (dark, light)


def _rotated(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray) -> tuple[np.ndarray, ...]:
    angle = float(rng.uniform(0, np.pi))
    cos, sin = np.cos(angle), np.sin(angle)
    return dx * cos + dy * sin, -dx * sin + dy * cos


def _stripes(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, unit: float) -> np.ndarray:
    u, _ = _rotated(rng, dy, dx)
    period = max(3.0, unit * float(rng.uniform(0.8, 1.4)))
    phase = float(rng.uniform(0, 2 * np.pi))
    return (np.sin(2 * np.pi * u / period + phase) > 0).astype(np.float32)


def _checkerboard(
    rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, unit: float
) -> np.ndarray:
    u, v = _rotated(rng, dy, dx)
    cell = max(2.0, unit * float(rng.uniform(0.6, 0.9)))
    offset = rng.uniform(0, cell, size=2)
    return ((np.floor((u + offset[0]) / cell) + np.floor((v + offset[1]) / cell)) % 2).astype(
        np.float32
    )


def _dots(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, unit: float) -> np.ndarray:
    u, v = _rotated(rng, dy, dx)
    spacing = max(4.0, unit * float(rng.uniform(1.1, 1.5)))
    dot = spacing * float(rng.uniform(0.25, 0.32))
    offset = rng.uniform(0, spacing, size=2)
    fu = np.mod(u + offset[0], spacing) - spacing / 2
    fv = np.mod(v + offset[1], spacing) - spacing / 2
    return (fu * fu + fv * fv < dot * dot).astype(np.float32)


def _concentric(
    rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, unit: float
) -> np.ndarray:
    period = max(3.0, unit * float(rng.uniform(0.8, 1.3)))
    phase = float(rng.uniform(0, 2 * np.pi))
    return (np.sin(2 * np.pi * np.hypot(dy, dx) / period + phase) > 0).astype(np.float32)


def _blobs(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, unit: float) -> np.ndarray:
    size = dy.shape[0]
    cells = max(2, round(size / max(3.0, unit * float(rng.uniform(0.8, 1.2)))))
    field = _smooth_noise(rng, cells, size)
    return (field > np.median(field)).astype(np.float32)


_TEXTURES: dict[int, Texture] = {
    1: _stripes,
    2: _checkerboard,
    3: _dots,
    4: _concentric,
    5: _blobs,
}


def _smooth_noise(rng: np.random.Generator, cells: int, size: int, channels: int = 0) -> np.ndarray:
    """Random values on a ``cells`` grid upsampled bicubically to ``size`` pixels."""
    from PIL import Image

    shape = (cells, cells, channels) if channels else (cells, cells)
    coarse = rng.uniform(0, 1, size=shape).astype(np.float32)
    if not channels:
        return np.asarray(
            Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
        )
    planes = [
        np.asarray(
            Image.fromarray(coarse[..., c], mode="F").resize((size, size), Image.Resampling.BICUBIC)
        )
        for c in range(channels)
    ]
    return np.stack(planes, axis=-1)


def _scene(rng: np.random.Generator, first: int) -> int:
    """The context scene behind an image whose first object has class ``first`` (0: none)."""
    draw = rng.random()
    if draw < CONTEXT_PROB:
        return first
    if draw < CONTEXT_PROB + STRAY_CONTEXT_PROB:
        return int(rng.integers(1, 6))  # a scene without its class now and then
    return 0


def _context(rng: np.random.Generator, size: int, cls: int) -> np.ndarray:
    """Class ``cls``'s context scene: broad wavy bands of a hue between the class hues."""
    hue = CLASS_HUES[cls] + CONTEXT_HUE_OFFSET + float(rng.uniform(-HUE_JITTER, HUE_JITTER))
    low = _hsv(hue, float(rng.uniform(0.3, 0.6)), float(rng.uniform(0.35, 0.55)))
    high = _hsv(hue, float(rng.uniform(0.2, 0.5)), float(rng.uniform(0.7, 0.95)))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    period = float(rng.uniform(0.15, 0.3))
    wobble = 0.05 * np.sin(2 * np.pi * (xx * float(rng.uniform(1, 3)) + float(rng.random())))
    bands = 0.5 + 0.5 * np.sin(2 * np.pi * (yy + wobble) / period + float(rng.uniform(0, 6.3)))
    return low + bands[..., None] * (high - low)


def _background(rng: np.random.Generator, size: int, scene: int = 0) -> np.ndarray:
    """Smooth colour noise (or a class's context scene) with plain lines and blobs on top."""
    from PIL import Image, ImageDraw

    if scene:
        base = _context(rng, size, scene)
    else:
        low, high = _random_colour(rng), _random_colour(rng)
        mix = _smooth_noise(rng, int(rng.integers(2, 6)), size, channels=3)
        base = low + np.clip(mix, 0, 1) * (high - low)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        radius = size * rng.uniform(0.04, 0.15, size=2)
        cy, cx = rng.uniform(0, size, size=2)
        box = (cx - radius[1], cy - radius[0], cx + radius[1], cy + radius[0])
        draw.ellipse(box, fill=tuple(int(c) for c in _random_colour(rng)))
    for _ in range(int(rng.integers(2, 7))):
        ends = [tuple(float(v) for v in rng.uniform(0, size, size=2)) for _ in range(2)]
        width = max(1, round(size * float(rng.uniform(0.005, 0.02))))
        draw.line(ends, fill=tuple(int(c) for c in _random_colour(rng)), width=width)
    return np.asarray(image, dtype=np.float32).copy()
