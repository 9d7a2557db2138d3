"""Requests leave the event loop here: each runs the library's blocking calls on a thread of its
own, while the model's engine (one generation thread per model) serves them in turn. The event
loop stays free for other clients meanwhile, and a stream whose client went away is closed,
which cancels its request in the engine."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator

from starlette.concurrency import run_in_threadpool


@dataclass
class WorkerStats:
    finished: int = 0  # streams that ran to their end
    cancelled: int = 0  # streams whose client went away (or stopped reading) first
    items: int = 0  # items (tokens) produced, over all streams
    items_after_cancel: int = 0  # of those, produced after their stream's cancellation was asked for
    last_cancelled_items: int = 0  # items the last cancelled stream produced in all


class ModelWorker:
    def __init__(self):
        self.stats = WorkerStats()
        self._waiting = 0
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """Requests queued or running."""
        return self._waiting

    def _start(self, job: Callable[[], None]) -> None:
        def run():
            try:
                job()
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name="mlx-gemma3n-request", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def close(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join()

    async def call(self, fn: Callable, *args):
        """`fn(*args)` run off the event loop (Starlette's thread pool), awaited."""
        self._waiting += 1
        try:
            return await run_in_threadpool(fn, *args)
        finally:
            self._waiting -= 1

    async def stream(self, make_iterator: Callable[[], Iterator]) -> AsyncIterator:
        """The items of `make_iterator()`, iterated on a thread of its own. Leaving the `async for`
        early, or the task being cancelled (a client that went away), closes the iterator after
        at most the item it is producing then."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        produced = [0, None]  # items so far; the count when cancellation was asked for

        def job():
            try:
                if cancel.is_set():
                    return
                iterator = make_iterator()
                try:
                    for item in iterator:
                        produced[0] += 1
                        loop.call_soon_threadsafe(items.put_nowait, (True, item))
                        if cancel.is_set():
                            break
                finally:
                    getattr(iterator, "close", lambda: None)()
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting request
                loop.call_soon_threadsafe(items.put_nowait, (False, e))
            finally:
                self._account(produced, cancel.is_set())
                loop.call_soon_threadsafe(items.put_nowait, (False, None))

        self._waiting += 1
        try:
            self._start(job)
            while True:
                ok, value = await items.get()
                if ok:
                    yield value
                elif value is None:
                    return
                else:
                    raise value
        finally:
            produced[1] = produced[0]
            cancel.set()
            self._waiting -= 1

    def _account(self, produced: list, cancelled: bool) -> None:
        self.stats.items += produced[0]
        if cancelled and produced[1] is not None:
            self.stats.cancelled += 1
            self.stats.items_after_cancel += produced[0] - produced[1]
            self.stats.last_cancelled_items = produced[0]
        else:
            self.stats.finished += 1
