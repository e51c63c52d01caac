"""The threads that share attention's work (a decode step's split layers, a prefill chunk's blocks), handed it with
the least ceremony.

A decode step splits each long layer's attention across the cores (flash-decoding), and at a chat context a share
is a few hundred microseconds of kernel time. concurrent.futures paid ~50 us a round trip (a Future, a work queue,
a condition per result) and started the second share ~40 us after the first: E2B int4 tq3.5 at 2k, a full layer
took 550-580 us in two shares of 380-400 us each, against 720 us whole. Here each helper thread sleeps on a lock of
its own; the caller hands it its jobs by releasing that lock, runs its own, and waits on the helper's `done` lock: a
wake-up, no allocation, no queue.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")


class _Helper:
    """A thread that runs the batches of jobs it is handed, one batch at a time."""

    def __init__(self, name: str) -> None:
        self._wake = threading.Lock()
        self._wake.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._jobs: Sequence[Callable[[], Any]] | None = ()
        self._results: list = []
        self._error: BaseException | None = None
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while True:
            self._wake.acquire()
            jobs = self._jobs
            if jobs is None:
                return
            try:
                self._results = [job() for job in jobs]
            except BaseException as error:  # noqa: BLE001 - raised again on the caller's thread, by outcome
                self._error = error
            self._done.release()

    def start(self, jobs: Sequence[Callable[[], Any]]) -> None:
        self._jobs = jobs
        self._wake.release()

    def wait(self) -> tuple[list, BaseException | None]:
        """Wait for the batch to end; its results, or its error, taken (none is left over for the next batch)."""
        self._done.acquire()
        outcome, self._results, self._error = (self._results, self._error), [], None
        return outcome

    def stop(self) -> None:
        self._jobs = None
        self._wake.release()


def _stop(helpers: list[_Helper]) -> None:
    for helper in helpers:
        helper.stop()


class Workers:
    """`threads` threads, the caller's among them. Job k of a batch runs on thread k % threads, the caller being
    thread 0, so a batch of `threads` jobs takes one each and the caller never sits idle while a helper works. One
    batch at a time: a second caller waits for the first's batch to end. The helpers end with this object."""

    def __init__(self, threads: int, name: str = "attention") -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.threads = threads
        self._helpers = [_Helper(f"{name}-{k}") for k in range(1, threads)]
        self._lock = threading.Lock()
        weakref.finalize(self, _stop, self._helpers)

    def run(self, jobs: Sequence[Callable[[], T]]) -> list[T]:
        """Run every job, spread over the threads; their results in the jobs' order. A job's error is raised once
        every thread is done with the batch (a share still running may be writing into the caller's buffers)."""
        n = self.threads
        with self._lock:
            busy = [(k, helper) for k, helper in enumerate(self._helpers, 1) if k < len(jobs)]
            for k, helper in busy:
                helper.start(jobs[k::n])
            results: list = [None] * len(jobs)
            try:
                results[::n] = [job() for job in jobs[::n]]
            finally:
                outcomes = [(k, *helper.wait()) for k, helper in busy]
            for k, done, error in outcomes:
                if error is not None:
                    raise error
                results[k::n] = done
            return results

    def map(self, fn: Callable[..., T], *iterables: Iterable) -> list[T]:
        """fn over the iterables' items taken together, as the builtin map, spread over the threads."""
        return self.run([partial(fn, *args) for args in zip(*iterables, strict=False)])


def thread_count(pool: Workers | None) -> int:
    """Threads a job may be split across: no pool is the caller alone."""
    return pool.threads if pool else 1
