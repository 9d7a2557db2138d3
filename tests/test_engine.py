"""One loaded model, many callers: the engine serves threads at once, each request with its own
state, cancellable; towers are shared and never released under a request."""

from __future__ import annotations

import functools
import gc
import subprocess
import sys
import threading
import weakref

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma3n import ChatSession, Engine, generate, load, stream_generate
from mlx_gemma3n.runtime.generation import SamplingOptions, reply, stream_tokens
from mlx_gemma3n.towers import Towers
from samples import speech_like

GREEDY = dict(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def loaded(tiny):
    return load(tiny[0], dtype=mx.float32)




def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (64, 80, 3), dtype=np.uint8)


REQUESTS = [
    ("hello world", {}),
    ("what is the cat", {}),
    ("the mat", {"images": [picture(1)]}),
    ("what is this audio", {"audio": [speech_like(0.8, 2)]}),
    ("is the cat on the mat", {}),
    ("image", {"images": [picture(3)]}),
    ("user model hello", {}),
    ("world", {"audio": [speech_like(0.5, 4)]}),
]


def test_eight_threads_at_once_each_get_the_reply_they_get_alone(loaded):
    model, tokenizer = loaded
    alone = [generate(model, tokenizer, prompt, **media, **GREEDY) for prompt, media in REQUESTS]
    together = [None] * len(REQUESTS)
    start = threading.Barrier(len(REQUESTS))

    def ask(i):
        start.wait()
        prompt, media = REQUESTS[i]
        together[i] = generate(model, tokenizer, prompt, **media, **GREEDY)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert len(set(alone)) > 1  # the prompts do lead to different replies


def test_the_same_seed_gives_the_same_tokens_whatever_runs_beside_it(loaded):
    model, tokenizer = loaded
    sampled = dict(temperature=1.0, top_k=0, top_p=1.0, seed=7, max_tokens=8)
    alone = [r.token for r in stream_generate(model, tokenizer, "hello world", **sampled)]
    other = dict(sampled, seed=8)
    results = {}

    def run(name, options):
        results[name] = [r.token for r in stream_generate(model, tokenizer, "hello world", **options)]

    threads = [threading.Thread(target=run, args=(f"other{i}", other)) for i in range(2)]
    threads.append(threading.Thread(target=run, args=("seeded", sampled)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["seeded"] == alone
    assert results["other0"] == results["other1"] != alone


def test_a_cancelled_request_stops_within_one_token_and_frees_its_cache(loaded):
    model, tokenizer = loaded
    cache = model.make_cache()
    first_cache = weakref.ref(cache[0])
    prompt = tokenizer.encode("hello world the cat")
    request = Engine.of(model).submit(functools.partial(reply, model, tokenizer, prompt, max_tokens=200, cache=cache,
                                                        sampling=SamplingOptions(temperature=0.0)))
    del cache
    read = [next(request) for _ in range(3)]
    request.cancel()
    assert request.cancelled and request._job.done
    # Results made but never read: at most the one the engine may hold ahead of its reader.
    assert request._job.produced - len(read) <= 1
    assert list(request) == []
    gc.collect()
    assert first_cache() is None, "the cancelled request's cache is still held"


def test_leaving_a_stream_early_cancels_its_request(loaded):
    model, tokenizer = loaded
    stream = stream_generate(model, tokenizer, "hello world", temperature=0.0, max_tokens=200)
    tokens = [next(stream).token for _ in range(2)]
    stream.close()
    engine = Engine.of(model)
    assert not engine._active and not engine._waiting
    assert len(tokens) == 2


def test_a_chat_turn_left_early_keeps_a_cache_that_matches_its_history(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, sampling=SamplingOptions(temperature=0.0))
    stream = session.send("hello world", max_tokens=50)
    next(stream), next(stream)
    stream.close()
    assert {c.offset for c in session.cache} == {len(session.cached_tokens)}
    second = [r.token for r in session.send("the cat", max_tokens=4)]
    fresh = [r.token for r in stream_tokens(model, tokenizer, session.last_prompt, max_tokens=4,
                                            sampling=SamplingOptions(temperature=0.0))]
    assert second == fresh


def test_a_tower_is_never_released_under_a_request_that_uses_it():
    loads = []
    towers = Towers(lambda kind: loads.append(kind) or object(), keep=False)
    with towers.use("vision") as first:
        towers.release("vision")  # asked while in use: it waits for the request
        assert towers.loaded("vision")
        with towers.use("vision") as second:
            assert second is first
        assert towers.loaded("vision")  # the first request still holds it
    assert not towers.loaded("vision")
    assert loads == ["vision"]


def test_concurrent_image_requests_with_towers_released_after_use(tiny, loaded):
    model, tokenizer = loaded
    expected = [generate(model, tokenizer, "the mat", images=[picture(i)], **GREEDY) for i in range(3)]
    released, _ = load(tiny[0], dtype=mx.float32, keep_towers=False)
    got = [None] * 3

    def ask(i):
        got[i] = generate(released, tokenizer, "the mat", images=[picture(i)], **GREEDY)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    assert not released.towers.loaded("vision")


def test_an_error_in_one_request_reaches_its_caller_and_not_the_others(loaded):
    model, tokenizer = loaded
    from mlx_gemma3n.errors import InputError

    with pytest.raises(InputError):
        generate(model, tokenizer, "hi", images=[b"not an image"], **GREEDY)
    assert generate(model, tokenizer, "hello world", **GREEDY) == generate(model, tokenizer, "hello world", **GREEDY)


THREADED_PROGRAM = """
import threading, mlx.core as mx
from mlx_gemma3n import generate, load
model, tokenizer = load({path!r}, dtype=mx.float32)
replies = []
def ask(i):
    replies.append(generate(model, tokenizer, "hello world" * (i + 1), temperature=0.0, max_tokens=3))
threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
for t in threads: t.start()
for t in threads: t.join()
print(len(replies))
"""


def test_a_program_that_used_the_model_from_several_threads_exits_cleanly_every_time(tiny):
    code = THREADED_PROGRAM.format(path=str(tiny[0]))
    for _ in range(20):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split()[-1] == "6"


MODELS_FREED_AS_THE_ENGINE_IDLES_OUT = """
import gc, time
import mlx.core as mx
from mlx_gemma3n import generate, load
from mlx_gemma3n.runtime import engine
engine.IDLE_SECONDS = IDLE_SECONDS = 1.0
for i in range(12):
    model, tokenizer = load({path!r}, dtype=mx.float32)
    generate(model, tokenizer, "hello world", temperature=0.0, max_tokens=4)
    time.sleep(IDLE_SECONDS - 0.05 + (i % 10) * 0.01)  # free the model as the engine's thread ends
    del model, tokenizer
    gc.collect()
time.sleep(2 * IDLE_SECONDS)  # the last engine thread ends before the interpreter does
print("done")
"""


def test_a_model_freed_while_its_engine_thread_ends_does_not_hang_the_program(tiny):
    """MLX keeps a compiled function's traces in the tracing thread's cache; the engine's thread
    frees the decode steps it traced itself, before it clears its streams (`model/decode.py`).
    Before, this program hung within its first five models (twice in two runs)."""
    code = MODELS_FREED_AS_THE_ENGINE_IDLES_OUT.format(path=str(tiny[0]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split()[-1] == "done", done.stderr[-2000:]


def test_a_reply_after_a_pause_between_turns_runs_on_the_same_engine_thread():
    """A compiled decode step lives as long as the thread that traced it: the next turn of a
    chat, a few seconds later, must find the engine's thread (and its steps) still there."""
    import time

    engine = Engine()
    try:
        first = engine.run(threading.current_thread)
        time.sleep(2.0)  # longer than the second an engine thread used to wait
        assert engine.run(threading.current_thread) is first
    finally:
        engine.close()


def test_closing_an_engine_waits_for_a_thread_that_is_still_ending(monkeypatch):
    """An idle engine thread no longer serves while it frees its MLX state; `close()` (which runs
    at interpreter exit) must wait for it too, or the process aborts as it exits (before: 6 of
    30 programs that ended one idle period after their last reply)."""
    from mlx_gemma3n.runtime import engine as engine_module

    leaving, release = threading.Event(), threading.Event()
    free_traces = engine_module.free_this_threads_traces

    def held_while_leaving():
        leaving.set()
        release.wait(30)
        free_traces()

    monkeypatch.setattr(engine_module, "free_this_threads_traces", held_while_leaving)
    monkeypatch.setattr(engine_module, "IDLE_SECONDS", 1.0)
    engine = Engine()
    assert engine.run(lambda: 42) == 42
    thread = engine._thread
    assert leaving.wait(30), "the idle thread did not end"

    alive_when_closed = []
    closer = threading.Thread(target=lambda: (engine.close(), alive_when_closed.append(thread.is_alive())))
    closer.start()
    closer.join(0.5)  # the old close() returned at once here, the thread still freeing
    release.set()
    closer.join(30)
    assert alive_when_closed == [False]
