"""One sample, one shard, and the worker processes that write shards for ``data convert``.

Workers never import TensorFlow (seconds of start-up each): they encode the
``tf.train.Example`` protobuf and the TFRecord framing themselves, and are forked (started
at once) unless the parent has imported TensorFlow, which is not fork-safe. A worker exits
when its parent dies, however the parent ends (``PR_SET_PDEATHSIG`` plus a watchdog
thread), so a killed conversion never leaves workers behind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from vitpcm.data import tfrecord
from vitpcm.data.imageinfo import image_info, palette_png_as_grey
from vitpcm.data.sources.base import MaskDecoder, Sample, read_sample_file
from vitpcm.errors import BadSampleError


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
    masks: MaskDecoder | None = None  # None: the split has no masks


@dataclass
class ShardResult:
    """What a worker did: records written, samples skipped, or the bad sample that stopped it."""

    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    error: tuple[str, str] | None = None


# --- one sample, one shard (run in worker processes) ----------------------------------------


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


def encode_sample(sample: Sample, num_classes: int, masks: MaskDecoder | None = None) -> bytes:
    """Check one sample and serialize it as a ``tf.train.Example``.

    Raises:
        BadSampleError: Missing or corrupt file, mask size unlike the image's, or label
            values outside ``0..K-1`` and 255. (Whether TensorFlow decodes the image is
            checked on the written shard: :mod:`vitpcm.data.verify`.)
    """
    image = read_sample_file(sample.image)
    info = image_info(image, sample.image)
    label_png = None
    if masks is not None:
        where = masks.name(sample)
        label, mask_bytes = masks.decode(sample)
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
    result = ShardResult()
    with open(task.path, "wb") as out:
        for sample in task.samples:
            if _stop_requested():
                return result
            try:
                record = encode_sample(sample, task.num_classes, task.masks)
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


def _init_worker(stop: Any, progress: Any, parent: int) -> None:
    global _worker_stop, _worker_progress
    _worker_stop, _worker_progress = stop, progress
    die_with_parent(parent)


def die_with_parent(parent: int, poll_seconds: float = 0.5) -> None:
    """End this process when ``parent`` ends, however it ends (``kill -9`` included).

    ``PR_SET_PDEATHSIG`` (Linux) delivers SIGKILL at once; a daemon thread that notices
    the process being re-parented covers other systems and the race where the parent died
    before the call.
    """
    import threading

    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        import time

        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


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


def run_tasks(
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
        max_workers=workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(stop, progress, os.getpid()),
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
