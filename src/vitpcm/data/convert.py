"""``vitpcm data convert``: a VOC-layout or COCO 2014 folder -> sharded TFRecords.

Splits become ``<split>-<shard>-of-<n>.tfrecord`` files (schema in
:mod:`vitpcm.data.tfrecord`) and a ``dataset.json`` written last, all inside
:func:`vitpcm.storage.atomic_dir`, so an interrupted run never leaves a folder that looks
complete. Images keep their original encoded bytes; masks are stored as single-channel
8-bit PNGs of class indices, because ``tf.io.decode_png`` turns a palette PNG into its
*colours*, not its indices (the original file is kept when it already is such a PNG).

Shards are contiguous blocks of each split's list, each written whole by one worker
process in list order, so the output is byte-identical whatever the number of workers.
Workers never import TensorFlow (seconds of start-up each): they encode the
``tf.train.Example`` protobuf and the TFRecord framing themselves, and are forked (started
at once) unless the parent has imported TensorFlow, which is not fork-safe. For ``s3://`` output
they write shards to a local staging folder and the main process uploads them, so no
worker process touches tensorflow-io (which aborts at interpreter exit).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitpcm import storage
from vitpcm.data import tfrecord
from vitpcm.data.imageinfo import image_info, palette_png_as_grey
from vitpcm.errors import BadSampleError, DataError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGES_PER_SHARD = 1000
IMAGES_PER_WORKER = 1000
VOC_SPLITS = ("train", "val", "trainval", "trainaug", "test")
COCO_SPLITS = ("train", "val")
DATASETS = ("voc12", "coco14")


@dataclass(frozen=True)
class Sample:
    """One image to convert; ``mask`` is a label PNG path, ``coco_id`` an annotated image."""

    image: str
    mask: str | None = None
    coco_id: int | None = None


@dataclass
class SplitPlan:
    """The samples of one split, in list order."""

    name: str
    samples: list[Sample]
    has_masks: bool
    coco_annotations: str | None = None


@dataclass
class ShardTask:
    """Everything one worker needs to write one shard file."""

    split: str
    index: int
    num_shards: int
    samples: list[Sample]
    path: str
    num_classes: int
    skip_bad: bool
    coco_json: str | None = None


@dataclass
class ShardResult:
    """What a worker did: records written, samples skipped, or the bad sample that stopped it."""

    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    error: tuple[str, str] | None = None


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


# --- one sample, one shard (run in worker processes) ----------------------------------------


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise BadSampleError(path, "listed in the split but missing; restore the file") from None
    except OSError as exc:
        raise BadSampleError(path, f"cannot be read ({exc})") from exc


def _grey_png(label: Any) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(label).save(buffer, format="PNG")  # 2-D uint8 -> mode L
    return buffer.getvalue()


def _check_values(label: Any, num_classes: int, where: str) -> None:
    import numpy as np

    from vitpcm.data.labels import IGNORE_LABEL, check_label_values

    # Nearly every mask is valid, and proving it takes a max (plus one comparison pass when
    # it has ignore pixels): several times cheaper than a histogram, which widens every
    # pixel to 64 bits. The full check (and its message) runs only when a value is off.
    if label.dtype == np.uint8 and label.size:
        top = int(label.max())
        if top < num_classes:
            return
        if top == IGNORE_LABEL and not np.logical_and(label >= num_classes, label != top).any():
            return
    check_label_values(label, num_classes, where)


def _stored_mask(mask_bytes: bytes | None, label: Any, where: str) -> bytes:
    """The mask as a single-channel 8-bit PNG, reusing the file's bytes where possible."""
    if mask_bytes is None:
        return _grey_png(label)
    header = image_info(mask_bytes, where)
    if (header.png_color_type, header.png_bit_depth) == (0, 8):
        return mask_bytes
    return palette_png_as_grey(mask_bytes) or _grey_png(label)


def encode_sample(sample: Sample, num_classes: int, coco: Any = None) -> bytes:
    """Check one sample and serialize it as a ``tf.train.Example``.

    Raises:
        BadSampleError: Missing or corrupt file, mask size unlike the image's, or label
            values outside ``0..K-1`` and 255.
    """
    from vitpcm.data.labels import decode_label_png

    image = _read_file(sample.image)
    info = image_info(image, sample.image)
    label_png = None
    if sample.mask is not None or sample.coco_id is not None:
        if sample.coco_id is not None:
            where, mask_bytes = f"{sample.image} (annotations)", None
            label = coco.mask(sample.coco_id)
        else:
            where, mask_bytes = sample.mask, _read_file(sample.mask)
            label = decode_label_png(mask_bytes, where)
        if label.shape != (info.height, info.width):
            raise BadSampleError(
                where,
                f"mask is {label.shape[1]}x{label.shape[0]} but the image {sample.image} is "
                f"{info.width}x{info.height}; the pair does not belong together",
            )
        _check_values(label, num_classes, where)
        label_png = _stored_mask(mask_bytes, label, where)
    return tfrecord.encode_example(
        image=image,
        filename=os.path.basename(sample.image),
        image_format=info.format,
        height=info.height,
        width=info.width,
        channels=info.channels,
        label=label_png,
    )


def write_shard(task: ShardTask, report: Callable[[int], None] | None = None) -> ShardResult:
    """Write one shard file in list order; stop at the first bad sample unless skipping."""
    coco = None
    if task.coco_json is not None:
        from vitpcm.data.coco import CocoMasks

        coco = CocoMasks(task.coco_json)
    result = ShardResult()
    with open(task.path, "wb") as out:
        for sample in task.samples:
            if _stop_requested():
                return result
            try:
                record = encode_sample(sample, task.num_classes, coco)
            except BadSampleError as exc:
                if not task.skip_bad:
                    result.error = (exc.path, exc.reason)
                    return result
                result.skipped.append((exc.path, exc.reason))
            else:
                out.write(tfrecord.tfrecord_frame(record))
                result.written += 1
            if report is not None:
                report(1)
    return result


_worker_stop: Any = None
_worker_progress: Any = None


def _init_worker(stop: Any, progress: Any) -> None:
    global _worker_stop, _worker_progress
    _worker_stop, _worker_progress = stop, progress


def _stop_requested() -> bool:
    return _worker_stop is not None and _worker_stop.is_set()


def _pool_write_shard(task: ShardTask) -> ShardResult:
    reporter = _BatchedReport(_worker_progress.put)
    try:
        return write_shard(task, report=reporter)
    finally:
        reporter.flush()


class _BatchedReport:
    """Progress counts sent in batches: one queue message per image costs the parent CPU."""

    def __init__(self, send: Callable[[int], None], every: int = 32) -> None:
        self.send, self.every, self.pending = send, every, 0

    def __call__(self, count: int) -> None:
        self.pending += count
        if self.pending >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.send(self.pending)
            self.pending = 0


def _pool_context() -> Any:
    """Fork when that is safe (no TensorFlow in this process), else spawn clean workers.

    A spawned worker starts a new interpreter and imports NumPy and PIL again: about a
    second of CPU before its first image, which on a few thousand images is a large part
    of the whole job. A forked one starts at once with the parent's modules. TensorFlow's
    threads make fork unsafe, so a parent that has imported it (an ``s3://`` output, a
    test session) spawns.
    """
    import multiprocessing
    import sys

    if "tensorflow" in sys.modules or "fork" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    # Imported here once, so forked workers inherit them instead of each importing them.
    import numpy  # noqa: F401
    from PIL import Image, PngImagePlugin  # noqa: F401

    import vitpcm.data.labels  # noqa: F401

    return multiprocessing.get_context("fork")


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


def _run_tasks(
    tasks: list[ShardTask],
    workers: int,
    bar: Any,
    on_done: Callable[[ShardTask, ShardResult], None],
) -> None:
    """Write every shard (in-process for one worker), calling ``on_done`` as each finishes."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            on_done(task, write_shard(task, report=bar.update))
        return
    import queue

    context = _pool_context()
    stop, progress = context.Event(), context.Queue()
    executor = ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(stop, progress)
    )
    # Longest shards first, so no worker is left with a long shard while the other idles at
    # the end. Which worker writes a shard never changes its bytes.
    by_size = sorted(tasks, key=lambda task: len(task.samples), reverse=True)
    futures: dict[Future[ShardResult], ShardTask] = {
        executor.submit(_pool_write_shard, task): task for task in by_size
    }
    order = {id(task): i for i, task in enumerate(tasks)}
    pending = set(futures)

    def drain_progress() -> None:
        while True:
            try:
                bar.update(progress.get_nowait())
            except queue.Empty:
                return

    try:
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            drain_progress()
            for future in sorted(done, key=lambda f: order[id(futures[f])]):
                on_done(futures[future], future.result())
        drain_progress()
    except BaseException:
        stop.set()  # workers stop at their next sample instead of finishing their shard
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    executor.shutdown(wait=True)


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
    out_uri = storage.local_path(out).rstrip("/")
    if storage.is_s3(out_uri):
        storage.check_s3_config(out_uri)  # fail now, not after the conversion
    with (
        tempfile.TemporaryDirectory(prefix="vitpcm-convert-") as staging,
        storage.atomic_dir(out_uri) as tmp,
    ):
        remote = storage.is_s3(tmp)
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
            results[(task.split, task.index)] = result
            if remote:  # upload as shards finish, while the workers carry on
                path = Path(task.path)
                storage.write_bytes(storage.join(tmp, path.name), path.read_bytes())
                path.unlink()

        from tqdm import tqdm

        total = sum(len(p.samples) for p in plans)
        if workers is None:
            # Starting a worker costs about a second (numpy, PIL), worth ~1000 images.
            workers = min(os.cpu_count() or 1, -(-total // IMAGES_PER_WORKER))
        count = min(workers, len(tasks))
        with tqdm(total=total, desc=f"convert {dataset}", unit="img", disable=not progress) as bar:
            _run_tasks(tasks, count, bar, on_done)
        info = _dataset_info(dataset, root, class_names, plans, by_split, results)
        payload = json.dumps(info, indent=2).encode("utf-8") + b"\n"
        storage.write_bytes(storage.join(tmp, tfrecord.DATASET_JSON), payload)
    return info


def _dataset_info(
    dataset: str,
    root: Path,
    class_names: list[str],
    plans: Sequence[SplitPlan],
    by_split: dict[str, list[ShardTask]],
    results: dict[tuple[str, int], ShardResult],
) -> dict[str, Any]:
    split_info: dict[str, Any] = {}
    skipped = []
    for plan in plans:
        tasks = by_split[plan.name]
        shard_results = [results[(plan.name, t.index)] for t in tasks]
        split_info[plan.name] = {
            "num_examples": sum(r.written for r in shard_results),
            "num_shards": len(tasks),
            "has_masks": plan.has_masks,
            "files": [os.path.basename(t.path) for t in tasks],
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
