"""The threads attention's shares run on: every job run once, on the thread its index gives, results in order, and
an error raised only once every thread is done with the batch."""

import gc
import threading
import time

import pytest

from edge_runtime.worker_threads import Workers


def test_jobs_spread_over_the_threads_by_index_and_results_keep_their_order():
    workers = Workers(3)
    ran_on: dict[int, str] = {}

    def job(k: int) -> int:
        ran_on[k] = threading.current_thread().name
        return k * k

    assert workers.map(job, range(8)) == [k * k for k in range(8)]
    here = threading.current_thread().name
    assert [ran_on[k] == here for k in range(8)] == [k % 3 == 0 for k in range(8)]
    assert {ran_on[k] for k in (1, 4, 7)} == {"attention-1"} and {ran_on[k] for k in (2, 5)} == {"attention-2"}
    assert workers.run([]) == [] and workers.map(job, [5]) == [25]


def test_a_helpers_error_is_raised_after_the_callers_share_is_done():
    workers = Workers(2)
    finished = []

    def slow() -> None:
        time.sleep(0.05)
        finished.append("caller")

    def fails() -> None:
        raise ValueError("share 1 failed")

    with pytest.raises(ValueError, match="share 1 failed"):
        workers.run([slow, fails])
    assert finished == ["caller"]
    assert workers.run([lambda: 1, lambda: 2]) == [1, 2]  # the helper serves the next batch


def test_the_callers_error_waits_for_the_helpers():
    workers = Workers(2)
    finished = []

    def fails() -> None:
        raise KeyError("share 0")

    def slow() -> None:
        time.sleep(0.05)
        finished.append("helper")

    with pytest.raises(KeyError):
        workers.run([fails, slow])
    assert finished == ["helper"]


def test_an_error_left_by_a_failed_batch_is_not_raised_by_the_next():
    """The caller's error is the one raised; a helper's failing in the same batch is dropped with it."""
    workers = Workers(2)

    def caller_fails() -> None:
        raise KeyError("share 0")

    def helper_fails() -> None:
        raise ValueError("share 1")

    with pytest.raises(KeyError):
        workers.run([caller_fails, helper_fails])
    assert workers.run([lambda: 1, lambda: 2]) == [1, 2]


def test_the_helpers_end_with_their_owner():
    before = set(threading.enumerate())
    workers = Workers(4, name="owned")
    helpers = [t for t in threading.enumerate() if t not in before]
    assert sorted(t.name for t in helpers) == ["owned-1", "owned-2", "owned-3"]
    del workers
    gc.collect()
    for thread in helpers:
        thread.join(timeout=5)
    assert not any(thread.is_alive() for thread in helpers)


def test_at_least_one_thread():
    with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
        Workers(0)
