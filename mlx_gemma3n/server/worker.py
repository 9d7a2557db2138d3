"""The one thread that runs the model for the server: requests wait their turn in its queue, in
order, and the event loop stays free for other clients meanwhile. (The model is not thread-safe,
and MLX keeps per-thread streams: one long-lived thread keeps both simple. The library's engine,
which interleaves requests, is meant to take this module's place.)"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator

import mlx.core as mx


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
        self._jobs: queue.Queue = queue.Queue()
        self._waiting = 0
        self._thread = threading.Thread(target=self._run, name="mlx-gemma3n-model", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests queued or running."""
        return self._waiting

    def _run(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                job()
        finally:
            mx.clear_streams()  # left to interpreter exit, a thread's MLX streams can abort the process

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    async def call(self, fn: Callable, *args):
        """`fn(*args)` run on the model thread, awaited."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def settle(outcome, error):
            if not done.cancelled():
                done.set_exception(error) if error is not None else done.set_result(outcome)

        def job():
            try:
                outcome, error = fn(*args), None
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting request
                outcome, error = None, e
            loop.call_soon_threadsafe(settle, outcome, error)

        self._waiting += 1
        try:
            self._jobs.put(job)
            return await done
        finally:
            self._waiting -= 1

    async def stream(self, make_iterator: Callable[[], Iterator]) -> AsyncIterator:
        """The items of `make_iterator()`, iterated on the model thread. Leaving the `async for`
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
            self._jobs.put(job)
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
