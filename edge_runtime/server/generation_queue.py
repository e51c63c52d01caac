"""One generation at a time on one thread, with a bounded line of waiting requests.

A model has one KV cache and the device has a few cores, so running two generations at once would only make
both slower. Requests take turns in arrival order; when `depth` are already waiting the next is refused at
once (the server answers 429 with Retry-After) rather than left to time out. All model work happens on the
one generation thread, so the model's lock is always taken and released by the same thread. A request whose
client leaves, while waiting or while generating, gives up its turn: its `cancel` event is set and the
generation stops at the next token.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """Every waiting place is taken; `retry_after` is the estimated wait in whole seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: {retry_after} s")
        self.retry_after = retry_after


class ClientGone(Exception):
    """The client disconnected while its request waited for a turn."""


class GenerationQueue:
    """Admission (bounded, FIFO) and the single generation thread."""

    def __init__(self, depth: int):
        self.depth = depth
        self.waiting = 0
        self._turn = asyncio.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="generation")
        self._durations: deque[float] = deque(maxlen=16)
        self._running: threading.Event | None = None  # the cancel event of the generation that holds the turn

    @property
    def busy(self) -> bool:
        """A generation holds the turn (it is taken only to start one, and passed on when that returns)."""
        return self._turn.locked()

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the recent mean generation time for each request ahead."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(mean * (self.waiting + 1)))

    async def run(self, work: Callable[[], T], cancel: threading.Event, gone: asyncio.Future[Any]) -> asyncio.Future[T]:
        """Wait for this request's turn, then start `work` on the generation thread and return its future.

        Raises QueueFull when the line is full, and ClientGone if `gone` completes first (the client left).
        `cancel` is set by shutdown; the turn passes on when `work` returns, whatever becomes of the request.
        """
        if self._turn.locked() and self.waiting >= self.depth:
            raise QueueFull(self.retry_after())
        self.waiting += 1
        acquire = asyncio.ensure_future(self._turn.acquire())
        try:
            await asyncio.wait({acquire, gone}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            if acquire.done():
                self._turn.release()
            acquire.cancel()
            raise
        finally:
            self.waiting -= 1
        if not acquire.done():
            acquire.cancel()
            raise ClientGone
        loop = asyncio.get_running_loop()
        self._running = cancel
        started = time.perf_counter()

        def done() -> None:
            self._durations.append(time.perf_counter() - started)
            self._running = None
            self._turn.release()

        try:
            future = self._executor.submit(work)
        except BaseException:
            done()
            raise
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(done))
        return asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Stop the running generation at its next token and wait for the thread to finish."""
        if self._running is not None:
            self._running.set()
        self._executor.shutdown(wait=True, cancel_futures=True)

