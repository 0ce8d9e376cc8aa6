"""``vitpcm data convert``: a dataset source's layout -> sharded TFRecords.

What to convert (splits, samples, class names, how masks decode) is the dataset source's
(:mod:`vitpcm.data.sources`); this module is the engine: plans -> shard tasks -> worker
processes -> commit.

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

import logging
import os
import posixpath
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vitpcm import outputs, storage
from vitpcm.data import generations, tfrecord
from vitpcm.data.manifest import FORMAT_VERSION, write_dataset_info
from vitpcm.data.shards import ShardResult, ShardTask, run_tasks
from vitpcm.data.sources import SplitPlan, get_source
from vitpcm.data.verify import verify_shard
from vitpcm.errors import BadSampleError, ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGES_PER_SHARD = 1000
IMAGES_PER_WORKER = 1000
KIND = "data convert"
_STAGING = "vitpcm-convert-"  # local staging folders: vitpcm-convert-<pid>-<random>


def _plan_tasks(
    plans: Sequence[SplitPlan],
    shards: int | None,
    folder: Path,
    staging: Path,
    num_classes: int,
    skip_bad: bool,
) -> dict[str, list[ShardTask]]:
    tasks: dict[str, list[ShardTask]] = {}
    for plan in plans:
        count = len(plan.samples)
        wanted = shards if shards is not None else -(-count // IMAGES_PER_SHARD)
        num = max(1, min(wanted, count))
        parts = [plan.samples[i * count // num : (i + 1) * count // num] for i in range(num)]
        masks = plan.masks.for_shards(parts, staging, plan.name) if plan.masks else [None] * num
        tasks[plan.name] = [
            ShardTask(
                split=plan.name,
                index=i,
                num_shards=num,
                samples=part,
                path=str(folder / tfrecord.shard_name(plan.name, i, num)),
                num_classes=num_classes,
                skip_bad=skip_bad,
                masks=masks[i],
            )
            for i, part in enumerate(parts)
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
        dataset: A registered dataset name (``voc12`` converts any VOC layout, the
            synthetic one included).
        src: The download folder or the layout's root folder itself; local.
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
    try:
        source = get_source(dataset)
    except ConfigError as err:
        raise DataError(str(err)) from None
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
    known = source.splits
    unknown = sorted(set(splits or ()) - set(known))
    if unknown:
        raise DataError(f"unknown split(s) {', '.join(unknown)} for {dataset}; use {known}")
    wanted = [s for s in known if splits is None or s in splits]

    root = source.find_root(src_path)
    plans, class_names = source.plan(root, wanted)
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
        by_split = _plan_tasks(plans, shards, folder, Path(staging), len(class_names), skip_bad)
        tasks = [task for split_tasks in by_split.values() for task in split_tasks]
        results: dict[tuple[str, int], ShardResult] = {}

        def on_done(task: ShardTask, result: ShardResult) -> None:
            if result.error is not None:
                raise BadSampleError(*result.error)
            verify_shard(task, result)
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
        # Locally dataset.json goes into the folder swapped in whole; on S3 this one PUT at
        # the root is the commit: it switches readers to the new generation.
        write_dataset_info(out_uri if remote else tmp, info)
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
            "has_masks": plan.masks is not None,
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
