"""One ordered, bounded process map for the CPU-heavy per-image work (CRF, pseudo masks).

Why not ``multiprocessing.Pool``: its ``imap`` feeder drains the whole input as fast as it
can (unbounded memory over a split); a worker killed by the OOM killer loses its task and
``get()`` then waits forever; and ``terminate()`` with tasks still queued can deadlock its
task-handler thread on the input pipe. ``concurrent.futures.ProcessPoolExecutor`` feeds
its workers at most ``workers + 1`` calls ahead (the rest stay cancellable in the parent),
raises ``BrokenProcessPool`` when a worker dies, and shuts down by cancelling what has not
started. This module adds the input-order results and the bound on items pulled.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TypeVar

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

In = TypeVar("In")
Out = TypeVar("Out")


@contextlib.contextmanager
def single_threaded_children() -> Iterator[None]:
    """Native thread pools off in processes started inside this block.

    Each worker runs one image at a time, so threads inside every worker would
    oversubscribe the cores the workers already fill. The variables must be in the
    environment when a child starts (numpy reads them on import); they are restored after.
    """
    saved = {var: os.environ.get(var) for var in _THREAD_VARS}
    os.environ.update(dict.fromkeys(_THREAD_VARS, "1"))
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def resolve_workers(workers: int) -> int:
    """``workers`` itself when positive, else every core."""
    return workers if workers > 0 else (os.cpu_count() or 1)


def ordered_map(
    fn: Callable[[In], Out],
    items: Iterable[In],
    workers: int,
    max_in_flight: int | None = None,
) -> Iterator[Out]:
    """``fn`` over ``items`` in ``workers`` spawned processes, results in input order.

    At most ``max_in_flight`` (default ``2 * workers``) items are taken from ``items``
    beyond the results already yielded, so the caller's generator (e.g. the network's
    forward over a split) runs while the workers are busy and a split never sits in
    memory. Closing the iterator early cancels the items not yet started and waits for
    the few running ones (at most ``workers + 1``). ``workers == 1`` runs in this process.

    ``fn`` must be a module-level function (it is pickled by name).
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    bound = max(max_in_flight or 2 * workers, 1)
    # "spawn": the parent often has TensorFlow loaded with live threads, and forking such a
    # process can deadlock the child.
    spawn = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=spawn)
    pending: collections.deque[Future[Out]] = collections.deque()
    try:
        for item in items:
            # The executor starts a worker inside submit() when none is idle.
            with single_threaded_children():
                pending.append(executor.submit(fn, item))
            if len(pending) >= bound:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
