"""One loaded model, many callers: the `Engine`.

Every computation on a model runs on its engine's one generation thread (MLX streams belong
to the thread that made them, and one device runs one graph at a time anyway). A request is a
job: a generator that does one step of work per `next` (a prompt chunk, a token) and yields
what it produced. The engine runs the jobs it holds in turn, one step each, so a long prompt
does not stall the replies streaming beside it. Callers read a job's results from its
`Request`, from any thread; a request that is cancelled, or whose reader went away, is
stopped before its next step and its generator closed there (its `finally` frees its cache).

One step can be long (a tower call takes seconds on a CPU): work inside a step calls
`raise_if_cancelled()` where it can stop (between a tower's blocks), and the job ends there.

A job runs at most `AHEAD` results ahead of its reader: a reader that stops reading stops the
job, and a cancelled stream has computed at most one token more than its reader saw.
"""

from __future__ import annotations

import atexit
import itertools
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import mlx.core as mx

from ..errors import Cancelled
from ..model.decode import free_this_threads_traces, own_traces_until_thread_ends

T = TypeVar("T")

AHEAD = 1  # results a job may hold that its reader has not taken yet
# An engine thread with nothing to do for this long ends (a new one starts on demand). Its
# compiled decode steps end with it (`model/decode.py`), so a reply on a new thread traces its
# step again: E2B 4-bit, 2-core x86, ~90 ms against ~7 ms for a traced step. A minute spans the
# pause between the turns of a chat; the traces it keeps meanwhile hold ~8 MB each (E2B).
IDLE_SECONDS = 60.0

_running = threading.local()  # the job whose step this thread is running, if any


def raise_if_cancelled() -> None:
    """Raise `Cancelled` when the job whose step is running on this thread has been cancelled;
    otherwise (or outside any job) do nothing."""
    job = getattr(_running, "job", None)
    if job is not None and job.cancelled:
        raise Cancelled("The request was cancelled.")


class _Job:
    def __init__(self, make: Callable[[], Iterator], engine: "Engine"):
        self.make = make
        self.engine = engine
        self.steps: Iterator | None = None
        self.results: deque = deque()
        self.done = False
        self.cancelled = False
        self.error: BaseException | None = None
        self.value: Any = None  # what the job's generator returned
        self.produced = 0  # results made, read or not

    def cancel(self, wait: bool = False) -> None:
        engine = self.engine
        with engine._cond:
            if self.done:
                return
            self.cancelled = True
            if self in engine._waiting:  # never started: nothing to close
                engine._waiting.remove(self)
                self.done, self.make = True, None
            engine._cond.notify_all()
            if wait and threading.current_thread() is not engine._thread:
                while not self.done:
                    engine._cond.wait()


class Request(Generic[T]):
    """A submitted job as its caller sees it: iterate it for the job's results (the job's error is
    raised there); `cancel()` stops it. Dropping the last reference cancels it too."""

    def __init__(self, job: _Job):
        self._job = job
        weakref.finalize(self, job.cancel)

    def __iter__(self) -> "Request[T]":
        return self

    def __next__(self) -> T:
        job, cond = self._job, self._job.engine._cond
        with cond:
            while not job.results and not job.done:
                cond.wait()
            if job.results:
                result = job.results.popleft()
                cond.notify_all()  # the job may run ahead again
                return result
        if job.error is not None:
            raise job.error
        raise StopIteration(job.value)

    def cancel(self, wait: bool = True) -> None:
        """Stop the job before its next step. With `wait`, return once it has stopped (its
        generator closed): at most one step (a token, a prompt chunk, a tower block) later."""
        self._job.cancel(wait)

    def wait(self) -> Any:
        """Drain the results; return what the job's generator returned."""
        for _ in self:
            pass
        return self._job.value

    @property
    def cancelled(self) -> bool:
        return self._job.cancelled


class Engine:
    """The generation thread of one loaded model. `Engine.of(model)` gives the model's engine."""

    _engines: dict[int, "Engine"] = {}  # by id(model): MLX modules are dicts, not hashable
    _registry_lock = threading.Lock()

    def __init__(self, max_active: int = 8):
        self.max_active = max_active  # jobs run in turn; the rest wait in line
        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._active: list[_Job] = []
        self._thread: threading.Thread | None = None  # the one serving; one that is leaving may still run
        self._threads: list[threading.Thread] = []  # every thread started, until joined
        self._closed = False
        self._ids = itertools.count()
        _live_engines.add(self)

    @classmethod
    def of(cls, model) -> "Engine":
        with cls._registry_lock:
            engine = cls._engines.get(id(model))
            if engine is None:
                engine = cls._engines[id(model)] = cls()
                weakref.finalize(model, cls._forget, id(model))
            return engine

    @classmethod
    def _forget(cls, key: int) -> None:
        with cls._registry_lock:
            engine = cls._engines.pop(key, None)
        if engine is not None:
            engine.close()

    def submit(self, make: Callable[[], Iterator[T]]) -> Request[T]:
        """Queue a job: `make()` is called on the engine's thread and gives the job's generator."""
        job = _Job(make, self)
        with self._cond:
            if self._closed:
                raise RuntimeError("This engine is closed.")
            self._waiting.append(job)
            if self._thread is None:
                self._start_thread()
            self._cond.notify_all()
        return Request(job)

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Call `fn` on the engine's thread and return its result (for one-off work on the model)."""

        def job():
            return fn(*args, **kwargs)
            yield  # a generator that yields nothing

        return self.submit(job).wait()

    def close(self) -> None:
        """Cancel what is queued and running, and end the thread."""
        with self._cond:
            self._closed = True
            for job in [*self._waiting, *self._active]:
                job.cancelled = True
            self._cond.notify_all()
        # Every thread, the one serving and any still leaving (an idle one ending, which no longer
        # serves but may still be freeing its MLX streams: left running into interpreter exit,
        # it aborts the process).
        while True:
            with self._cond:
                self._threads = [t for t in self._threads if t.is_alive()]
                others = [t for t in self._threads if t is not threading.current_thread()]
            if not others:
                return
            for thread in others:
                thread.join()

    # -- the engine's thread ---------------------------------------------------------

    def _start_thread(self) -> None:
        """(With the lock held.) Daemon: an engine never keeps a program from ending (see `_close_all`)."""
        self._thread = threading.Thread(target=self._serve, name=f"mlx_gemma3n-engine-{next(self._ids)}", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [self._thread]
        self._thread.start()

    def _runnable(self) -> list[_Job]:
        while self._waiting and len(self._active) < self.max_active:
            self._active.append(self._waiting.popleft())
        return [j for j in self._active if j.cancelled or len(j.results) < AHEAD]

    def _serve(self) -> None:
        own_traces_until_thread_ends()
        try:
            while True:
                with self._cond:
                    runnable = self._runnable()
                    while not runnable:
                        if self._closed and not self._active and not self._waiting:
                            return
                        if not self._active and not self._waiting:
                            if not self._cond.wait(IDLE_SECONDS) and not self._waiting:
                                return  # idle: end, and let the next request start a thread
                        else:
                            self._cond.wait()
                        runnable = self._runnable()
                for job in runnable:
                    self._step(job)
        finally:
            with self._cond:
                self._thread = None
                if self._waiting or self._active:  # arrived while we were leaving
                    self._start_thread()
            # Before the thread ends: MLX keeps a thread's streams after it, and left to
            # interpreter exit they abort the process now and then. The compiled steps this
            # thread traced are freed first, here (see `model/decode.py`).
            mx.synchronize()
            free_this_threads_traces()
            mx.clear_streams()

    def _step(self, job: _Job) -> None:
        finished, result, error, value = False, None, None, None
        if job.cancelled:
            finished, error = True, Cancelled("The request was cancelled.")
            if job.steps is not None:
                try:
                    job.steps.close()
                except BaseException:  # noqa: BLE001 - a job's clean-up must not stop the engine
                    pass
        else:
            _running.job = job
            try:
                if job.steps is None:
                    job.steps = job.make()
                result = next(job.steps)
            except StopIteration as stop:
                finished, value = True, stop.value
            except BaseException as e:  # noqa: BLE001 - handed to the request's reader (a cancelled job's is dropped)
                finished, error = True, e
            finally:
                _running.job = None
        with self._cond:
            if finished:
                job.done, job.value = True, value
                job.error = None if job.cancelled else error
                job.steps = job.make = None  # whatever the job held (its cache) can go now
                self._active.remove(job)
            else:
                job.results.append(result)
                job.produced += 1
            self._cond.notify_all()


_live_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Daemon threads are stopped where they stand at exit; an engine thread must end cleanly
    # first (its MLX streams freed on its own thread).
    for engine in list(_live_engines):
        engine.close()
