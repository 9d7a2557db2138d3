"""Live transcription and live scene description, on top of the streaming sources.

    from mlx_gemma3n import load
    from mlx_gemma3n.live import LiveTranscriber, Final
    from mlx_gemma3n.sources import MicrophoneSource

    model, tokenizer = load("google/gemma-3n-E2B-it")
    with LiveTranscriber(model, tokenizer, MicrophoneSource()) as live:
        for event in live:                      # Partial, Final and Gap events as they happen
            if isinstance(event, Final):
                print(f"[{event.start:.1f}-{event.end:.1f}] {event.text}  ({event.latency:.2f} s)")

Both classes run their loop on a thread of their own: read the source, run the model, hand
out events. Events go to the `on_event` callback (called on that thread) and to a bounded
queue that iterating the object drains; iteration ends when the stream ends, and raises the
error that ended it (a `SourceError` when a device disappears; an exception raised by a
callback ends the stream the same way). `stop()` ends at once: the model is interrupted at
its next token (a step it has begun, such as encoding an image, runs to its end) and
unfinished work is dropped; `finish()` stops listening but first transcribes what was
already heard. Both are safe to call from any thread, callbacks included. Used as a context
manager, leaving the block stops the loop, waits for its thread, and raises an error the
loop met that nobody has seen yet. `run()` runs the loop on the calling thread instead. Each
object runs once.

Time: stream times (`start`, `end`, `time`) are the source's own timestamps, in seconds
since the stream started (or positions in a replayed file). `latency` is wall-clock seconds
from the moment the last sample an event covers reached this program (the microphone
buffer, or a replay's schedule) to the moment its text was ready; for a `Final` it includes
the pause the voice-activity detector waits for before it calls an utterance finished.
`lag` is how much audio had arrived but was not yet read when the event was made: how far
behind the live edge the transcriber runs. Partial transcripts are made only while the
transcriber is not behind (lag at most `max_partial_lag`), so a slow model spends its time
on finals; audio is never skipped to catch up (the source buffers it, and counts what its
buffer could not hold: `Gap` events and `stats.lost_seconds`).

Video is the opposite: `LiveDescriber` describes the newest frame only, every `every`
seconds of stream time or when the picture has changed, and the frames that went by while
the model was busy are skipped by the source (counted in `stats.dropped`), never queued.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import InputError
from .processing.audio import SAMPLE_RATE
from .sources import AudioSource, FrameSource, SourceError
from .sources.segment import Utterance, VoiceActivitySegmenter
from .transcription import SILENCE_RMS



# --------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Partial:
    """What the utterance still being spoken says so far: audio from `start` to `end` (stream seconds)."""

    text: str
    start: float
    end: float
    latency: float
    lag: float


@dataclass(frozen=True)
class Final:
    """The transcript (or translation) of one finished utterance. `cut` says that the utterance reached
    the model's 30 s window and the speech goes on in the next one."""

    text: str
    start: float
    end: float
    latency: float
    lag: float
    cut: bool = False


@dataclass(frozen=True)
class Gap:
    """`seconds` of audio just before `start` were lost: the source's buffer overflowed."""

    start: float
    seconds: float


@dataclass(frozen=True)
class Description:
    """What the model said about frame `index`, taken at stream time `time`. `reason` is "first",
    "interval" or "change"; `dropped` counts the stale frames the source has skipped so far."""

    text: str
    time: float
    index: int
    latency: float
    reason: str
    dropped: int


@dataclass
class TranscriberStats:
    samples: int = 0  # samples read from the source
    gaps: int = 0
    lost_samples: int = 0  # samples the source lost before handing them out
    device_overflows: int = 0  # times the audio driver itself reported lost input
    utterances: int = 0
    speech_seconds: float = 0.0  # total length of the utterances transcribed
    finals: int = 0
    partials: int = 0
    partials_skipped: int = 0  # partials that were due but left out because the transcriber was behind
    model_seconds: float = 0.0  # wall time spent in the model (finals and partials)
    lag: float = 0.0  # at the last read
    max_lag: float = 0.0

    @property
    def audio_seconds(self) -> float:
        return self.samples / SAMPLE_RATE

    @property
    def lost_seconds(self) -> float:
        return self.lost_samples / SAMPLE_RATE

    @property
    def real_time_factor(self) -> float:
        """Model time per second of audio heard (below 1: the model keeps up)."""
        return self.model_seconds / self.audio_seconds if self.samples else 0.0


@dataclass
class DescriberStats:
    seen: int = 0  # frames handed out by the source and looked at
    described: int = 0
    unchanged: int = 0  # frames looked at but neither due nor different enough to describe
    dropped: int = 0  # stale frames the source skipped while we were busy
    model_seconds: float = 0.0
    started: float | None = None  # monotonic time the loop started
    ended: float | None = None

    @property
    def per_minute(self) -> float:
        """Descriptions per minute of wall time so far."""
        if self.started is None:
            return 0.0
        elapsed = (self.ended or time.monotonic()) - self.started
        return 60.0 * self.described / elapsed if elapsed > 0 else 0.0


# --------------------------------------------------------------------------------------
# The loop on its own thread, its events, and its shutdown
# --------------------------------------------------------------------------------------

# One model must not run two generations at once (two live streams, or a live stream and an
# app's own call); the live loops take this per-model lock around every model call.
class _Stopped(Exception):
    """Raised inside the loop when stop() interrupted it."""


class _LiveLoop:
    """A loop over a source on a thread of its own; events to a callback and to an iterator."""

    def __init__(self, source, on_event: Callable | None, max_events: int):
        self.source = source
        self.on_event = on_event
        self._events: deque = deque(maxlen=max_events)
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._abort = threading.Event()  # stop(): end now
        self._thread: threading.Thread | None = None
        self._state = threading.Lock()
        self._ran = False
        self.error: BaseException | None = None
        self._error_seen = False

    # -- life cycle -------------------------------------------------------------------------

    def start(self):
        """Start the loop on its own thread (once; later calls do nothing)."""
        with self._state:
            if self._ran:
                return self
            self._ran = True
            self._thread = threading.Thread(target=self._guarded, name=type(self).__name__, daemon=True)
            self._thread.start()
        return self

    def run(self) -> None:
        """Run the loop on the calling thread until the stream ends; raises the error that ended it."""
        with self._state:
            if self._ran:
                raise RuntimeError(f"This {type(self).__name__} has already run; create a new one.")
            self._ran = True
            self._thread = threading.current_thread()  # so that stop() and join() from elsewhere wait for it
        self._guarded()
        self._raise_unseen()

    def stop(self, timeout: float | None = None) -> bool:
        """End now: stop the source, interrupt the model at its next token, drop unfinished work.
        Waits (at most `timeout` seconds; None: as long as it takes) for the loop's thread to end:
        a step the model has begun (encoding an image or a clip, one token) is not interrupted,
        and leaving a thread inside MLX at interpreter exit aborts the process. Returns whether
        the loop has ended."""
        self._abort.set()
        return self._halt(timeout)

    def finish(self, timeout: float | None = None) -> bool:
        """Stop listening, but first deal with what was already heard; returns whether the loop ended."""
        return self._halt(timeout)

    def _halt(self, timeout: float | None) -> bool:
        with self._state:
            self._ran = True  # a loop never started never will be
            thread = self._thread
        self.source.stop()
        if thread is None:
            self._close()
            return True
        if thread is not threading.current_thread():  # (not when called from a callback)
            thread.join(timeout)
        return not self.running

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop to end (the stream ended or was stopped); raises the error that ended it."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                return False
        self._raise_unseen()
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if exc_type is None:
            self._raise_unseen()

    def __del__(self):
        # An object dropped while its loop runs must not leave a device open.
        with contextlib.suppress(Exception):
            self._abort.set()
            self.source.stop()

    # -- events -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator:
        """The events as they come (starting the loop if needed); ends with the stream, raising
        the error that ended it. Meant for one consumer at a time."""
        self.start()
        while True:
            with self._cond:
                while not self._events and not self._closed:
                    self._cond.wait(0.25)  # a timeout keeps Ctrl-C responsive
                if not self._events:
                    break
                event = self._events.popleft()
            yield event
        self._raise_unseen()

    def _emit(self, event) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()
        if self.on_event is not None:
            self.on_event(event)

    def _close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _raise_unseen(self) -> None:
        if self.error is not None and not self._error_seen:
            self._error_seen = True
            raise self.error

    def _guarded(self) -> None:
        try:
            self._loop()
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to whoever iterates, joins or leaves the `with` block
            self.error = e
        finally:
            try:
                self.source.stop()
            finally:
                self._close()

    def _loop(self) -> None:
        raise NotImplementedError

    def _check_abort(self) -> None:
        if self._abort.is_set():
            raise _Stopped


def _generate_text(live: _LiveLoop, model, tokenizer, prompt: str, max_tokens: int, **media) -> str:
    """Greedy reply to `prompt` with media attached, interruptible between tokens by live.stop()
    (the model runs on its engine's thread, beside any other caller's requests)."""
    from .runtime.generation import SamplingOptions, stream_generate

    pieces = []
    for response in stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, sampling=SamplingOptions(temperature=0.0), **media
    ):
        pieces.append(response.text)
        live._check_abort()
    return "".join(pieces).strip()


# --------------------------------------------------------------------------------------
# Speech
# --------------------------------------------------------------------------------------


class _ArrivalClock:
    """When (monotonic seconds) each stream time reached us: for each chunk read we know that the
    live edge was `backlog` seconds past its end, so its last sample arrived `backlog` ago."""

    def __init__(self, keep_seconds: float = 90.0):
        self.keep = keep_seconds
        self._ends: deque[float] = deque()
        self._walls: deque[float] = deque()

    def record(self, end: float, backlog: float, now: float) -> None:
        self._ends.append(end)
        self._walls.append(now - backlog)
        while self._ends and self._ends[0] < end - self.keep:
            self._ends.popleft()
            self._walls.popleft()

    def arrival(self, t: float) -> float:
        ends, walls = self._ends, self._walls
        i = bisect.bisect_left(ends, t)
        if i >= len(ends):
            return walls[-1] if walls else time.monotonic()
        if i == 0:
            return walls[0] - (ends[0] - t)
        # interpolate inside the chunk that holds t
        e0, e1, w0, w1 = ends[i - 1], ends[i], walls[i - 1], walls[i]
        return w0 + (w1 - w0) * (t - e0) / (e1 - e0) if e1 > e0 else w1


class LiveTranscriber(_LiveLoop):
    """Speech from a live audio source, as `Partial` and `Final` transcripts with timestamps.

    `source`: an `AudioSource` (MicrophoneSource, FileAudioSource); the transcriber starts and
    stops it. Utterances are cut by `segmenter` (a `VoiceActivitySegmenter`, default settings
    when None), and each finished one is transcribed, or translated into `translate_to`
    (`language` names the spoken language, optional). While one is being spoken, its audio so
    far is transcribed each time it has grown by `partial_every` seconds (None: no partials),
    unless the transcriber is behind by more than `max_partial_lag` seconds. `max_tokens`
    bounds each reply. `on_event(event)` and `on_audio(chunk)` are called on the loop's thread
    with each event and each chunk read (a level meter, a recorder). `transcribe_fn(samples) ->
    str` replaces the model (then `model` and `tokenizer` may be None).
    """

    def __init__(
        self,
        model,
        tokenizer,
        source: AudioSource,
        *,
        language: str | None = None,
        translate_to: str | None = None,
        max_tokens: int = 128,
        partial_every: float | None = 1.0,
        max_partial_lag: float = 0.3,
        segmenter: VoiceActivitySegmenter | None = None,
        on_event: Callable | None = None,
        on_audio: Callable | None = None,
        transcribe_fn: Callable[[np.ndarray], str] | None = None,
        max_events: int = 10_000,
    ):
        super().__init__(source, on_event, max_events)
        if transcribe_fn is None and (model is None or tokenizer is None):
            raise InputError("LiveTranscriber needs a model and its tokenizer (or a transcribe_fn).")
        if partial_every is not None and not partial_every > 0:
            raise InputError(f"partial_every must be a positive number of seconds or None, got {partial_every!r}.")
        from .transcription import instruction

        self.model, self.tokenizer = model, tokenizer
        self.language, self.translate_to = language, translate_to
        self.prompt = instruction(language, translate_to)
        self.max_tokens = max_tokens
        self.partial_every = partial_every
        self.max_partial_lag = max_partial_lag
        self.segmenter = segmenter or VoiceActivitySegmenter()
        self.on_audio = on_audio
        self.transcribe_fn = transcribe_fn
        self.stats = TranscriberStats()
        self._clock = _ArrivalClock()
        self._partial_mark: tuple[int, int] | None = None  # (utterance start, samples at the last partial)

    @property
    def lag(self) -> float:
        """Seconds of audio that have arrived but are not yet read: how far behind the live edge."""
        return self.source.backlog

    def _loop(self) -> None:
        self.source.start()
        try:
            self._listen()
        except SourceError:  # the device went away: what it delivered is still transcribed
            if not self._abort.is_set():
                self._flush()
            raise
        self._check_abort()
        self._flush()

    def _listen(self) -> None:
        source, stats = self.source, self.stats
        # A replay at `speed` x delivers a second of audio in 1 / speed s; one not in real time
        # delivers everything at once, so a chunk counts as arriving when it is read.
        wall_per_second = 1.0 / getattr(source, "speed", 1.0) if getattr(source, "realtime", True) else 0.0
        while (chunk := source.read()) is not None:
            self._check_abort()
            now = time.monotonic()
            backlog = source.backlog
            self._clock.record(chunk.end, backlog * wall_per_second, now)
            stats.samples += len(chunk.samples)
            stats.lag, stats.max_lag = backlog, max(stats.max_lag, backlog)
            self._count_losses()
            if chunk.gap:
                stats.gaps += 1
                self._emit(Gap(chunk.start, chunk.gap / SAMPLE_RATE))
            if self.on_audio is not None:
                self.on_audio(chunk)
            for utterance in self.segmenter.feed(chunk):
                self._final(utterance)
            self._maybe_partial()

    def _flush(self) -> None:
        self._count_losses()
        for utterance in self.segmenter.flush():
            self._final(utterance)

    def _count_losses(self) -> None:
        self.stats.lost_samples = self.source.dropped
        self.stats.device_overflows = getattr(self.source, "device_overflows", 0)

    def _model(self, samples: np.ndarray) -> str:
        if np.sqrt(np.mean(np.square(samples, dtype=np.float64))) < SILENCE_RMS:
            return ""
        began = time.monotonic()
        try:
            if self.transcribe_fn is not None:
                return self.transcribe_fn(samples)
            return _generate_text(self, self.model, self.tokenizer, self.prompt, self.max_tokens, audio=[samples])
        finally:
            self.stats.model_seconds += time.monotonic() - began
            self._check_abort()

    def _final(self, utterance: Utterance) -> None:
        self._partial_mark = None
        text = self._model(utterance.samples)
        now = time.monotonic()
        stats = self.stats
        stats.utterances += 1
        stats.finals += 1
        stats.speech_seconds += utterance.duration
        self._emit(
            Final(text, utterance.start, utterance.end, now - self._clock.arrival(utterance.end), self.lag, utterance.cut)
        )

    def _maybe_partial(self) -> None:
        if self.partial_every is None:
            return
        pending = self.segmenter.pending()
        if pending is None:
            return
        start, samples = pending
        step = round(self.partial_every * SAMPLE_RATE)
        last = self._partial_mark[1] if self._partial_mark and self._partial_mark[0] == start else 0
        if len(samples) - last < step:
            return
        self._partial_mark = (start, len(samples))
        if self.lag > self.max_partial_lag:  # behind: the model's time goes to finals
            self.stats.partials_skipped += 1
            return
        text = self._model(samples)
        end = (start + len(samples)) / SAMPLE_RATE
        self.stats.partials += 1
        self._emit(Partial(text, start / SAMPLE_RATE, end, time.monotonic() - self._clock.arrival(end), self.lag))


# --------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------

_THUMB = (32, 32)


def _thumbnail(image: Image.Image) -> np.ndarray:
    """A small grey copy for a cheap change test: noise averages out, a moved object does not."""
    return np.asarray(image.convert("L").resize(_THUMB, Image.BILINEAR), dtype=np.float32) / 255.0


def frame_difference(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Mean absolute difference of two pictures' 32x32 grey thumbnails, from 0 (same) to 1."""
    ta = a if isinstance(a, np.ndarray) else _thumbnail(a)
    tb = b if isinstance(b, np.ndarray) else _thumbnail(b)
    return float(np.mean(np.abs(ta - tb)))


class LiveDescriber(_LiveLoop):
    """Running descriptions of live video: the newest frame, every `every` seconds or on change.

    `source`: a `FrameSource` (CameraSource, VideoFileSource, FolderSource); the describer
    starts and stops it. A frame is described when it is the first, when `every` seconds of
    stream time (None: never) have passed since the last described frame, or when it differs
    from that frame by at least `change_threshold` (see `frame_difference`; None: never). A
    live source is looked at every `check_every` seconds; the frames in between, and those
    that arrive while the model works, are skipped by the source, never queued. `prompt` and
    `max_tokens` go to the model; `describe_fn(image) -> str` replaces it (then `model` and
    `tokenizer` may be None). `on_event(description)` is called on the loop's thread.
    """

    def __init__(
        self,
        model,
        tokenizer,
        source: FrameSource,
        *,
        prompt: str = "Describe this scene in one sentence.",
        every: float | None = 5.0,
        change_threshold: float | None = 0.08,
        check_every: float = 0.2,
        max_tokens: int = 64,
        max_descriptions: int | None = None,
        on_event: Callable | None = None,
        describe_fn: Callable[[Image.Image], str] | None = None,
        max_events: int = 10_000,
    ):
        super().__init__(source, on_event, max_events)
        if describe_fn is None and (model is None or tokenizer is None):
            raise InputError("LiveDescriber needs a model and its tokenizer (or a describe_fn).")
        if every is None and change_threshold is None:
            raise InputError("Give `every` (seconds), `change_threshold`, or both: otherwise only the first frame is described.")
        if every is not None and not every >= 0:
            raise InputError(f"every must be a number of seconds >= 0 or None, got {every!r}.")
        self.model, self.tokenizer = model, tokenizer
        self.prompt, self.max_tokens = prompt, max_tokens
        self.every, self.change_threshold, self.check_every = every, change_threshold, check_every
        self.max_descriptions = max_descriptions
        self.describe_fn = describe_fn
        self.stats = DescriberStats()

    def _reason(self, frame, thumb, last_time, last_thumb) -> str | None:
        if last_thumb is None:
            return "first"
        if self.every is not None and frame.time - last_time >= self.every:
            return "interval"
        if self.change_threshold is not None and frame_difference(thumb, last_thumb) >= self.change_threshold:
            return "change"
        return None

    def _loop(self) -> None:
        source, stats = self.source, self.stats
        live = getattr(source, "realtime", True)  # a replay with realtime=False hands out every frame
        stats.started = time.monotonic()
        source.start()
        last_time, last_thumb = 0.0, None
        try:
            while self.max_descriptions is None or stats.described < self.max_descriptions:
                frame = source.read()
                self._check_abort()
                if frame is None:
                    break
                picked = time.monotonic()
                stats.seen += 1
                stats.dropped = source.dropped
                thumb = _thumbnail(frame.image)
                reason = self._reason(frame, thumb, last_time, last_thumb)
                if reason is None:
                    stats.unchanged += 1
                    if live and self._abort.wait(self.check_every):
                        raise _Stopped
                    continue
                text = self._describe(frame.image)
                stats.described += 1
                stats.dropped = source.dropped
                self._emit(Description(text, frame.time, frame.index, time.monotonic() - picked, reason, source.dropped))
                last_time, last_thumb = frame.time, thumb
        finally:
            stats.ended = time.monotonic()
            stats.dropped = source.dropped

    def _describe(self, image: Image.Image) -> str:
        began = time.monotonic()
        try:
            if self.describe_fn is not None:
                return self.describe_fn(image)
            return _generate_text(self, self.model, self.tokenizer, self.prompt, self.max_tokens, images=[image])
        finally:
            self.stats.model_seconds += time.monotonic() - began
            self._check_abort()
