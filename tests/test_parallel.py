"""vitpcm.parallel.ordered_map: input order, bounded pulling, clean early stop, dead workers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool

import pytest

from vitpcm.parallel import ordered_map


def _square_slowly_first(x: int) -> int:
    # The first items take longest, so results finish out of order.
    import time

    time.sleep(0.2 if x < 2 else 0.0)
    return x * x


def _thread_vars(_: int) -> tuple[str | None, ...]:
    return tuple(os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"))


def _die_on_three(x: int) -> int:
    if x == 3:
        os._exit(7)  # as the OOM killer would: no exception, the process is gone
    return x


def _counting(n: int, pulled: list[int]) -> Iterator[int]:
    for i in range(n):
        pulled[0] += 1
        yield i


def test_results_come_back_in_input_order_from_several_workers() -> None:
    assert list(ordered_map(_square_slowly_first, range(8), workers=2)) == [x * x for x in range(8)]


def _pid(_: int) -> int:
    return os.getpid()


def test_one_worker_runs_in_this_process_and_several_do_not() -> None:
    assert set(ordered_map(_pid, range(3), workers=1)) == {os.getpid()}
    assert os.getpid() not in set(ordered_map(_pid, range(3), workers=2))


def test_workers_start_with_native_threads_off_and_the_parent_keeps_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    assert set(ordered_map(_thread_vars, range(4), workers=2)) == {("1", "1")}
    assert os.environ["OMP_NUM_THREADS"] == "5"
    assert "OPENBLAS_NUM_THREADS" not in os.environ


def test_items_are_pulled_only_as_far_as_the_bound_and_an_early_stop_returns() -> None:
    pulled = [0]
    stream = ordered_map(_square_slowly_first, _counting(1000, pulled), workers=2, max_in_flight=3)
    assert next(stream) == 0
    assert pulled[0] == 3
    stream.close()  # cancels what has not started; must not hang
    assert pulled[0] == 3


def test_a_worker_that_dies_raises_instead_of_waiting_forever() -> None:
    with pytest.raises(BrokenProcessPool):
        list(ordered_map(_die_on_three, range(6), workers=2))
