"""One decoded token as one compiled function.

Built op by op, a decode step's graph costs the host as much time as a few hundred kernels, and
the host builds the same graph again for every token; compiled, the step is traced once and
replayed (E2B 4-bit on an H200's host: 8.1 ms of graph building per token op by op, 3.5 ms
compiled, beside ~13 ms of evaluation; `benchmarks/step_profile.py`). The caches' buffers are the
step's inputs and outputs and keep their shape from token to token (`claim` makes room outside
the step: a full cache is reserved for the whole reply, a sliding one grows at once to the window
and a step), so that a reply retraces at most when a buffer first reaches its size; the step
writes the new position in place (the caches hold no other reference to the buffers it is given).
The step attends over whole buffers, the slots not yet written masked. The lazy PLE table is read
on the host and the output head runs after the step, outside it (on a CPU it evaluates in blocks).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import mlx.core as mx

from ..cache import KVCache, QuantizedKVCache, SlidingWindowCache
from ..plan import Plan


def compilable(cache) -> bool:
    """Whether a step can continue `cache` compiled: caches of ours that already hold positions."""
    return bool(cache) and all(type(c) in (KVCache, SlidingWindowCache, QuantizedKVCache) and c.state for c in cache)


# Traces kept per plan and thread, one per shape of the caches' buffers (each reply's reservation
# may differ). Each holds about 8 MB for E2B (8 replies of different lengths on a CPU: 58 MB more resident with
# every trace kept, 26 MB with 4), so the least recently used is dropped. More than one, so that
# requests stepped in turn by the engine do not retrace at every token.
TRACES_KEPT = 4


# A compiled function's traces live in the cache of the thread that traced it. Freed by another
# thread (a model freed elsewhere), a trace is erased from that cache under the cache's lock, the
# GIL held; a thread clearing its streams (`mx.clear_streams()`, before it ends) holds the lock
# while it waits for the GIL to free the traces' Python objects: the two would wait for each
# other. So a thread that will clear its streams holds on to the trace tables it added steps to
# (no other thread can then free them) and frees its own steps itself.
_owner = threading.local()


def own_traces_until_thread_ends() -> None:
    """Hold the steps this thread traces until `free_this_threads_traces`."""
    _owner.tables = []


def free_this_threads_traces() -> None:
    """Free, on this thread, the compiled steps it traced (call before `mx.clear_streams()`)."""
    me = threading.get_ident()
    for traces in getattr(_owner, "tables", ()):
        for key in [k for k in traces if k[0] == me]:
            del traces[key]
    _owner.tables = []


def compiled_step(model, plan: Plan) -> Callable[[mx.array, list], mx.array]:
    """A function (ids (B, 1), caches) -> final hidden states, the caches advanced by one
    position: `model`'s text decoder under `plan`, compiled."""
    text = model.language_model
    model.embed_multimodal_ids()  # computed (and evaluated) once, here, never inside a trace

    def trace(views):
        # A function object of its own for each shape: MLX keys a compiled function's traces by
        # the function, and drops them with it. `views`: how the step sees each kind of cache.
        @mx.compile
        def step(ids, per_layer_rows, positions, states):
            # positions: the new token's position, then each cache's slot for it.
            caches = [view(state, positions[0], positions[i + 1 : i + 2])
                      for i, (view, state) in enumerate(zip(views, states))]
            hidden = text(ids, caches, model.embed(ids), per_layer_inputs=per_layer_rows, plan=plan)
            return hidden, [c.state for c in caches]

        return step

    traces = OrderedDict()  # (thread, ids shape, buffer shapes) -> its compiled step, the most recently used last

    def run(ids: mx.array, cache: list) -> mx.array:
        rows = text.per_layer_inputs(ids)  # the lazy table reads its rows on the host
        positions = mx.array([cache[0].offset] + [c.claim() for c in cache], mx.int32)
        # The buffers' shapes tell float from quantized caches (and their widths) apart.
        shapes = (threading.get_ident(), ids.shape, *(tuple(a.shape for a in c.state) for c in cache))
        step = traces.pop(shapes, None)
        if step is None:
            step = trace([c.slot_view() for c in cache])
            tables = getattr(_owner, "tables", None)
            if tables is not None and not any(t is traces for t in tables):
                tables.append(traces)
        traces[shapes] = step
        mine = [k for k in traces if k[0] == shapes[0]]
        if len(mine) > TRACES_KEPT:  # each thread drops only its own steps, so they are freed where traced
            del traces[mine[0]]
        hidden, states = step(ids, rows, positions, [c.state for c in cache])
        # The caches let go of the old buffers before anything runs, so that the step writes in place.
        for c, state in zip(cache, states):
            c.state = state
        return hidden

    return run
