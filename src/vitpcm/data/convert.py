"""``vitpcm data convert``: a VOC-layout or COCO 2014 folder -> sharded TFRecords.

Splits become ``<split>-<shard>-of-<n>.tfrecord`` files (schema in
:mod:`vitpcm.data.tfrecord`) and a ``dataset.json`` written last, all inside
:func:`vitpcm.storage.atomic_dir`, so an interrupted run never leaves a folder that looks
complete. Images keep their original encoded bytes; masks are stored as single-channel
8-bit PNGs of class indices, because ``tf.io.decode_png`` turns a palette PNG into its
*colours*, not its indices (the original file is kept when it already is such a PNG).

Every image and mask is decoded at conversion with the decoder training uses
(``tf.io.decode_image`` / ``tf.io.decode_png``), so a file that would stop training hours
later stops the conversion now, named.

Shards are contiguous blocks of each split's list, each written whole by one worker
process in list order (:mod:`vitpcm.data.shards`), so the output is byte-identical whatever
the number of workers. For ``s3://`` output workers write shards to a local staging folder
and the main process uploads them, so no worker process touches tensorflow-io (which
aborts at interpreter exit).

Commits. Locally the output folder is swapped in whole (:func:`vitpcm.storage.atomic_dir`).
On ``s3://``, which has no rename, each run uploads its shards under a new generation
prefix ``<out>/gen-<id>/`` and then writes ``<out>/dataset.json``, which lists them: that
single PUT is the commit, so a reader (which follows ``dataset.json``) sees the old complete
dataset or the new complete one. Objects no ``dataset.json`` refers to (older generations,
a killed run's upload) are deleted after the commit and at the start of the next run.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitpcm import outputs, storage
from vitpcm.data import generations, tfrecord
from vitpcm.data.shards import (  # noqa: F401  (Sample and encode_sample are public here too)
    Sample,
    ShardResult,
    ShardTask,
    encode_sample,
    run_tasks,
    write_shard,
)
from vitpcm.data.verify import verify_shard
from vitpcm.errors import BadSampleError, DataError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGES_PER_SHARD = 1000
IMAGES_PER_WORKER = 1000
VOC_SPLITS = ("train", "val", "trainval", "trainaug", "test")
COCO_SPLITS = ("train", "val")
DATASETS = ("voc12", "coco14")
KIND = "data convert"
OPTIONAL_SPLITS = ("test",)  # may be listed empty (no test images): skipped with a warning
_STAGING = "vitpcm-convert-"  # local staging folders: vitpcm-convert-<pid>-<random>


@dataclass
class SplitPlan:
    """The samples of one split, in list order."""

    name: str
    samples: list[Sample]
    has_masks: bool
    coco_annotations: str | None = None


# --- sources -----------------------------------------------------------------------------


def _voc_root(src: Path) -> Path:
    for candidate in (src / "VOCdevkit" / "VOC2012", src / "VOC2012", src):
        if (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    raise DataError(
        f"{src} holds no VOC layout (VOCdevkit/VOC2012/ImageSets/Segmentation); pass the "
        "folder made by `vitpcm data download --dataset voc12` or `vitpcm data synth`"
    )


def _read_ids(list_file: Path) -> list[str]:
    """Image ids of a split list; accepts plain ids or DeepLab-style ``/JPEGImages/x.jpg`` lines."""
    ids = []
    for line in list_file.read_text().splitlines():
        token = line.split()[0] if line.strip() else ""
        if token and not token.startswith("#"):
            ids.append(Path(token).stem)
    return ids


def _voc_class_names(root: Path) -> list[str]:
    names_file = root / "classes.txt"
    if not names_file.is_file():
        from vitpcm.data.labels import VOC_CLASSES

        return list(VOC_CLASSES)
    names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    if len(names) < 2:
        raise DataError(f"{names_file} lists {len(names)} class names; it needs at least 2")
    return names


def _voc_plans(root: Path, splits: Sequence[str]) -> list[SplitPlan]:
    lists = root / "ImageSets" / "Segmentation"
    plans = []
    for split in splits:
        list_file = lists / f"{split}.txt"
        if not list_file.is_file():
            logger.info("split %s skipped: %s not found", split, list_file)
            continue
        ids = _read_ids(list_file)
        if not ids:
            _empty_split(split, list_file)
            continue
        images = [_voc_image(root, i) for i in ids]
        if split == "trainaug":  # SBD masks, with the VOC ones where SBD has none
            masks = [
                _first_existing(root, i, ("SegmentationClassAug", "SegmentationClass")) for i in ids
            ]
        else:
            masks = [str(root / "SegmentationClass" / f"{i}.png") for i in ids]
        has_masks = True
        if split == "test" and not all(os.path.exists(m) for m in masks):
            # The real VOC test set has no public masks; the synthetic one has them.
            has_masks = False
        samples = [
            Sample(img, m if has_masks else None) for img, m in zip(images, masks, strict=True)
        ]
        plans.append(SplitPlan(split, samples, has_masks))
    return plans


def _empty_split(split: str, listing: Path) -> None:
    """An empty split list: a loud warning for an optional split, an error otherwise."""
    if split in OPTIONAL_SPLITS:
        logger.warning("split %s skipped: %s lists no images", split, listing)
        return
    raise DataError(
        f"{listing} lists no images, so the {split} split would be empty; restore the "
        "list (download or synthesise the dataset again)"
    )


def _voc_image(root: Path, image_id: str) -> str:
    jpeg = root / "JPEGImages" / f"{image_id}.jpg"
    if not jpeg.exists():
        for other in (".jpeg", ".png"):
            alternative = jpeg.with_suffix(other)
            if alternative.exists():
                return str(alternative)
    return str(jpeg)


def _first_existing(root: Path, image_id: str, folders: Sequence[str]) -> str:
    paths = [root / folder / f"{image_id}.png" for folder in folders]
    return str(next((p for p in paths if p.exists()), paths[0]))


def _coco_root(src: Path) -> Path:
    for candidate in (src / "coco2014", src):
        if (candidate / "annotations").is_dir():
            return candidate
    raise DataError(
        f"{src} holds no COCO 2014 layout (coco2014/annotations/); pass the folder made by "
        "`vitpcm data download --dataset coco14`"
    )


def _coco_plans(root: Path, splits: Sequence[str]) -> tuple[list[SplitPlan], list[str]]:
    from vitpcm.data.coco import CocoMasks

    plans, names = [], []
    for split in splits:
        annotations = root / "annotations" / f"instances_{split}2014.json"
        if not annotations.is_file():
            logger.info("split %s skipped: %s not found", split, annotations)
            continue
        logger.info("reading %s", annotations)
        masks = CocoMasks(annotations)
        names = list(masks.class_names)
        images = root / f"{split}2014"
        samples = [Sample(str(images / masks.file_name(i)), coco_id=i) for i in masks.image_ids]
        if not samples:
            _empty_split(split, annotations)
            continue
        plans.append(SplitPlan(split, samples, True, str(annotations)))
        del masks  # the full annotation index is large; workers get per-shard subsets
    return plans, names


def _write_coco_subsets(plan: SplitPlan, tasks: list[ShardTask], staging: Path) -> None:
    """Give each shard an annotation file holding only its images, for its worker's CocoMasks."""
    assert plan.coco_annotations is not None
    data = json.loads(Path(plan.coco_annotations).read_bytes())
    images = {int(img["id"]): img for img in data["images"]}
    by_image: dict[int, list[Any]] = {}
    for annotation in data["annotations"]:
        by_image.setdefault(int(annotation["image_id"]), []).append(annotation)
    for task in tasks:
        ids = [s.coco_id for s in task.samples if s.coco_id is not None]
        subset = {
            "images": [images[i] for i in ids],
            "annotations": [a for i in ids for a in by_image.get(i, [])],
            "categories": data["categories"],
        }
        task.coco_json = str(staging / f"{task.split}-{task.index:05d}.json")
        Path(task.coco_json).write_text(json.dumps(subset))


# --- orchestration --------------------------------------------------------------------------


def _plan_tasks(
    plans: Sequence[SplitPlan], shards: int | None, folder: Path, num_classes: int, skip_bad: bool
) -> dict[str, list[ShardTask]]:
    tasks: dict[str, list[ShardTask]] = {}
    for plan in plans:
        count = len(plan.samples)
        wanted = shards if shards is not None else -(-count // IMAGES_PER_SHARD)
        num = max(1, min(wanted, count))
        tasks[plan.name] = [
            ShardTask(
                split=plan.name,
                index=i,
                num_shards=num,
                samples=plan.samples[i * count // num : (i + 1) * count // num],
                path=str(folder / tfrecord.shard_name(plan.name, i, num)),
                num_classes=num_classes,
                skip_bad=skip_bad,
            )
            for i in range(num)
        ]
    return tasks


def convert_dataset(
    dataset: str,
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    shards: int | None = None,
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    splits: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Convert a downloaded (or synthetic) dataset to sharded TFRecords plus ``dataset.json``.

    Args:
        dataset: ``voc12`` (real or synthetic VOC layout) or ``coco14``.
        src: The download folder (holding ``VOCdevkit/`` or ``coco2014/``) or the
            ``VOC2012``/``coco2014`` folder itself; local.
        out: Output folder or ``s3://`` prefix; replaced atomically when complete.
        shards: Shards per split (default: one per ~1000 images).
        workers: Worker processes (default: all CPU cores, fewer for small datasets).
        skip_bad: Skip bad samples and list them in ``dataset.json`` instead of failing.
        progress: Show a progress bar.
        splits: Only these splits (default: every split whose list file exists).

    Returns:
        The content of ``dataset.json``.

    Raises:
        DataError: Unknown dataset, bad arguments, no usable split in ``src``.
        BadSampleError: A bad sample (without ``skip_bad``); nothing is written.
        StorageError: The output cannot be written.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if shards is not None and shards < 1:
        raise DataError(f"--shards {shards} must be at least 1")
    if workers is not None and workers < 1:
        raise DataError(f"--workers {workers} must be at least 1")
    if storage.is_remote(src):
        raise DataError(f"--src {src} must be a local folder (download or synthesise it first)")
    src_path = Path(storage.local_path(src)).resolve()
    if not src_path.is_dir():
        raise DataError(f"--src {src} is not a folder; download or synthesise the dataset first")
    out_uri = storage.local_path(out).rstrip("/")
    if storage.is_s3(out_uri):
        storage.check_s3_config(out_uri)  # fail now, not after the conversion
    outputs.claim_output(out_uri, KIND, inputs={"--src": str(src_path)})
    known = VOC_SPLITS if dataset == "voc12" else COCO_SPLITS
    unknown = sorted(set(splits or ()) - set(known))
    if unknown:
        raise DataError(f"unknown split(s) {', '.join(unknown)} for {dataset}; use {known}")
    wanted = [s for s in known if splits is None or s in splits]

    if dataset == "voc12":
        root = _voc_root(src_path)
        class_names = _voc_class_names(root)
        plans = _voc_plans(root, wanted)
    else:
        root = _coco_root(src_path)
        plans, class_names = _coco_plans(root, wanted)
    if not plans:
        raise DataError(
            f"no split list found in {root} (looked for {', '.join(wanted)}); "
            "the dataset is incomplete: download or extract it again"
        )
    remote = storage.is_s3(out_uri)
    generation = f"gen-{uuid.uuid4().hex[:12]}" if remote else ""
    commit = (
        generations.open_generation(out_uri, generation)
        if remote
        else storage.atomic_dir(out_uri, kind=KIND)
    )
    _remove_dead_staging()
    staging_dir = tempfile.TemporaryDirectory(prefix=f"{_STAGING}{os.getpid()}-")
    with staging_dir as staging, commit as tmp:
        folder = Path(staging) if remote else Path(tmp)
        by_split = _plan_tasks(plans, shards, folder, len(class_names), skip_bad)
        for plan in plans:
            if plan.coco_annotations:
                _write_coco_subsets(plan, by_split[plan.name], Path(staging))
        tasks = [task for split_tasks in by_split.values() for task in split_tasks]
        results: dict[tuple[str, int], ShardResult] = {}

        def on_done(task: ShardTask, result: ShardResult) -> None:
            if result.error is not None:
                raise BadSampleError(*result.error)
            verify_shard(task.path, task.samples, result, task.skip_bad)
            results[(task.split, task.index)] = result
            if remote:  # upload as shards finish, while the workers carry on
                path = Path(task.path)
                storage.write_bytes(storage.join(tmp, path.name), path.read_bytes())
                path.unlink()

        from tqdm import tqdm

        total = sum(len(p.samples) for p in plans)
        if workers is None:
            # Starting a worker costs about a second (NumPy, PIL), worth ~1000 images.
            workers = min(os.cpu_count() or 1, -(-total // IMAGES_PER_WORKER))
        count = min(workers, len(tasks))
        with tqdm(total=total, desc=f"convert {dataset}", unit="img", disable=not progress) as bar:
            run_tasks(tasks, count, bar, on_done)
        info = _dataset_info(dataset, root, class_names, plans, by_split, results, generation)
        payload = json.dumps(info, indent=2).encode("utf-8") + b"\n"
        # Locally dataset.json goes into the folder swapped in whole; on S3 this one PUT at
        # the root is the commit: it switches readers to the new generation.
        storage.write_bytes(
            storage.join(out_uri if remote else tmp, tfrecord.DATASET_JSON), payload
        )
    if remote:
        generations.remove_unreferenced(out_uri, info)
    return info


def _remove_dead_staging() -> None:
    """Delete local staging folders of conversions whose process is gone (killed runs)."""
    import shutil

    root = Path(tempfile.gettempdir())
    for folder in root.glob(f"{_STAGING}*-*"):
        pid = folder.name[len(_STAGING) :].split("-", 1)[0]
        if not pid.isdigit() or not folder.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            logger.info("removing %s, left by a killed conversion", folder)
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # alive, another user's
            continue


def _dataset_info(
    dataset: str,
    root: Path,
    class_names: list[str],
    plans: Sequence[SplitPlan],
    by_split: dict[str, list[ShardTask]],
    results: dict[tuple[str, int], ShardResult],
    generation: str = "",
) -> dict[str, Any]:
    """``dataset.json``'s content; shard ``files`` are relative to the dataset root."""
    split_info: dict[str, Any] = {}
    skipped = []
    for plan in plans:
        tasks = by_split[plan.name]
        shard_results = [results[(plan.name, t.index)] for t in tasks]
        split_info[plan.name] = {
            "num_examples": sum(r.written for r in shard_results),
            "num_shards": len(tasks),
            "has_masks": plan.has_masks,
            "files": [posixpath.join(generation, os.path.basename(t.path)) for t in tasks],
        }
        for result in shard_results:
            skipped.extend({"split": plan.name, "file": p, "reason": r} for p, r in result.skipped)
    return {
        "name": dataset,
        "num_classes": len(class_names),
        "class_names": class_names,
        "splits": split_info,
        "skipped": skipped,
        "source": str(root),
        "format_version": FORMAT_VERSION,
    }


def read_dataset_info(uri: str | os.PathLike[str]) -> dict[str, Any]:
    """Load the ``dataset.json`` of a converted dataset (local folder or ``s3://`` prefix).

    Raises:
        DataError: No ``dataset.json`` (not converted, or interrupted) or unreadable JSON.
    """
    text = storage.local_path(uri).rstrip("/")
    path = storage.join(text, tfrecord.DATASET_JSON)
    if not storage.exists(path):
        raise DataError(
            f"no dataset.json in {text}: not a converted dataset or an interrupted "
            "conversion; run vitpcm data convert"
        )
    try:
        info = json.loads(storage.read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); run vitpcm data convert again") from exc
    if not isinstance(info, dict) or "splits" not in info or "num_classes" not in info:
        raise DataError(f"{path} lacks 'splits' or 'num_classes'; run vitpcm data convert again")
    return info
