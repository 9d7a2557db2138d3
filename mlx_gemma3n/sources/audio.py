"""Audio sources: a microphone (sounddevice) and a file replayed as if it were one.

Both yield `AudioChunk`s of float32 mono 16 kHz samples, `chunk_seconds` long (the last
one, and one before a gap, may be shorter), stamped with their position in the stream:
`offset` counts samples since the start and `start = offset / 16000`. Stamps come from
the sample count, not from a clock, so they are exact and strictly increasing; when
audio had to be dropped the next chunk's `gap` says how many samples are missing and its
stamp jumps by as much.

The microphone's PortAudio callback only copies samples into a ring buffer
(`buffer_seconds` long, two minutes by default); the consumer resamples (when the device
would not capture at 16 kHz) and cuts chunks in its own thread. A device that vanishes
ends the iteration with a SourceError, as does one that falls silent for `stall_timeout`
seconds.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from ..errors import InputError
from ..processing.audio import SAMPLE_RATE, load_audio
from . import Source, SourceError, SourceOverflowWarning

# Rates to try, in order, when a device refuses 16 kHz (after its own default rate).
_FALLBACK_RATES = (48000, 44100, 32000, 24000, 22050, 96000)


@dataclass(frozen=True, eq=False)
class AudioChunk:
    """Consecutive float32 mono samples at `sample_rate` (16 kHz) from a live stream.

    `start` is in seconds since the stream started (`offset / sample_rate`); `gap` is the
    number of samples lost just before this chunk (0 unless the consumer fell behind).
    """

    samples: np.ndarray
    start: float
    offset: int = 0
    sample_rate: int = SAMPLE_RATE
    gap: int = 0

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def end(self) -> float:
        return (self.offset + len(self.samples)) / self.sample_rate


class AudioSource(Source[AudioChunk]):
    """A stream of `AudioChunk`s of `chunk_seconds` each at 16 kHz."""

    sample_rate = SAMPLE_RATE

    def __init__(self, chunk_seconds: float = 0.1):
        super().__init__()
        if not (isinstance(chunk_seconds, (int, float)) and chunk_seconds > 0):
            raise InputError(f"chunk_seconds must be a positive number of seconds, got {chunk_seconds!r}.")
        self.chunk_seconds = float(chunk_seconds)
        self.chunk_size = max(1, round(chunk_seconds * SAMPLE_RATE))

    @property
    def backlog(self) -> float:
        """Seconds of audio that have arrived but not been read yet."""
        return 0.0


# --------------------------------------------------------------------------------------
# The ring buffer between a device thread and the consumer
# --------------------------------------------------------------------------------------


class _SampleRing:
    """A bounded FIFO of samples, written by a device thread without ever blocking it.

    Positions are absolute sample indices since the stream started. When a write would
    overflow, the oldest unread samples are dropped (and counted in `overflow`), so the
    reader sees a jump in position, never a silent splice.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._buf = np.zeros(capacity, dtype=np.float32)
        self._read = 0  # absolute position of the next sample to read
        self._written = 0  # absolute position after the last sample written
        self._cond = threading.Condition(threading.Lock())
        self.overflow = 0
        self.closed = False
        self.error: BaseException | None = None
        self.last_write = time.monotonic()

    def write(self, x: np.ndarray) -> None:
        n = len(x)
        with self._cond:
            if self.closed:
                return
            if n > self.capacity:  # more than the whole buffer at once: only the newest fit
                self._written += n - self.capacity
                x, n = x[-self.capacity :], self.capacity
            start = self._written % self.capacity
            first = min(n, self.capacity - start)
            self._buf[start : start + first] = x[:first]
            self._buf[: n - first] = x[first:]
            self._written += n
            excess = self._written - self._read - self.capacity
            if excess > 0:  # the oldest unread samples were overwritten
                self._read += excess
                self.overflow += excess
            self.last_write = time.monotonic()
            self._cond.notify()

    def read(self, max_n: int, timeout: float) -> tuple[int, np.ndarray] | None:
        """(position, samples) of up to max_n unread samples; None on timeout or when closed and empty."""
        with self._cond:
            if self._written == self._read and not self.closed:
                self._cond.wait(timeout)
            n = min(max_n, self._written - self._read)
            if n == 0:
                return None
            pos = self._read
            start = pos % self.capacity
            first = min(n, self.capacity - start)
            out = np.concatenate([self._buf[start : start + first], self._buf[: n - first]])
            self._read += n
            return pos, out

    def close(self, error: BaseException | None = None) -> None:
        with self._cond:
            if not self.closed:
                self.closed = True
                self.error = error
            self._cond.notify_all()

    @property
    def available(self) -> int:
        with self._cond:
            return self._written - self._read


class _Chunker:
    """Device-rate pieces (with their positions) -> 16 kHz AudioChunks of a fixed size."""

    def __init__(self, rate: int, chunk_size: int):
        self.rate = rate
        self.chunk_size = chunk_size
        self.ready: list[AudioChunk] = []
        self._parts: list[np.ndarray] = []
        self._len = 0
        self._offset = 0  # 16 kHz index of the first pending sample
        self._next_pos = 0  # device-rate position we expect next
        self._gap = 0  # 16 kHz samples missing before the pending samples
        self._resampler = self._new_resampler()

    def _new_resampler(self):
        if self.rate == SAMPLE_RATE:
            return None
        import soxr

        return soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def push(self, pos: int, x: np.ndarray) -> int:
        """Add samples that start at device position `pos`; returns the 16 kHz samples skipped before them."""
        skipped = 0
        if pos != self._next_pos:  # the ring dropped samples: close what we have, restart after the hole
            self._flush_resampler()
            self._cut(everything=True)
            new_offset = round(pos * SAMPLE_RATE / self.rate)
            skipped = max(0, new_offset - (self._offset + self._len))
            self._offset, self._gap = new_offset, self._gap + skipped
            self._resampler = self._new_resampler()
        self._next_pos = pos + len(x)
        self._append(x if self._resampler is None else self._resampler.resample_chunk(x))
        self._cut(everything=False)
        return skipped

    def finish(self) -> None:
        self._flush_resampler()
        self._cut(everything=True)

    @property
    def pending(self) -> int:
        return self._len

    def _flush_resampler(self) -> None:
        if self._resampler is not None:
            self._append(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
            self._resampler = self._new_resampler()

    def _append(self, y: np.ndarray) -> None:
        if len(y):
            self._parts.append(np.asarray(y, dtype=np.float32))
            self._len += len(y)

    def _cut(self, everything: bool) -> None:
        if self._len == 0 or (self._len < self.chunk_size and not everything):
            return
        data = np.concatenate(self._parts)
        n_full = len(data) // self.chunk_size
        cuts = [i * self.chunk_size for i in range(n_full + 1)]
        if everything and cuts[-1] < len(data):
            cuts.append(len(data))
        for a, b in pairwise(cuts):
            offset = self._offset + a
            self.ready.append(
                AudioChunk(data[a:b].copy(), offset / SAMPLE_RATE, offset, SAMPLE_RATE, self._gap)
            )
            self._gap = 0
        rest = data[cuts[-1] :]
        self._offset += cuts[-1]
        self._parts, self._len = ([rest] if len(rest) else []), len(rest)


# --------------------------------------------------------------------------------------
# Microphone
# --------------------------------------------------------------------------------------


def _import_sounddevice():
    try:
        import sounddevice
    except ImportError:
        raise SourceError(
            "MicrophoneSource needs the sounddevice package; install it with `pip install sounddevice`."
        ) from None
    except OSError as e:  # sounddevice raises OSError when the PortAudio library is missing
        raise SourceError(
            f"sounddevice cannot load PortAudio ({e}); install it (Debian/Ubuntu: apt-get install "
            "libportaudio2, macOS: it ships inside the sounddevice wheel, reinstall sounddevice)."
        ) from None
    return sounddevice


def _device_label(info: dict) -> str:
    return f"{info['index']} '{info['name']}'"


def _input_devices(sd) -> list[dict]:
    try:
        devices = sd.query_devices()
    except sd.PortAudioError as e:
        raise SourceError(f"PortAudio cannot list the audio devices ({e}); check the sound system.") from None
    return [dict(d, index=i) for i, d in enumerate(devices) if d["max_input_channels"] > 0]


def list_input_devices() -> list[dict]:
    """The audio inputs PortAudio sees: dicts with index, name, channels, default_samplerate, default."""
    sd = _import_sounddevice()
    default = sd.default.device[0]
    return [
        {
            "index": d["index"],
            "name": d["name"],
            "channels": d["max_input_channels"],
            "default_samplerate": d["default_samplerate"],
            "default": d["index"] == default,
        }
        for d in _input_devices(sd)
    ]


def _resolve_device(sd, device) -> dict:
    inputs = _input_devices(sd)
    if not inputs:
        raise SourceError(
            "No audio input device was found; connect a microphone (or start the sound server) and try again."
        )
    choices = ", ".join(_device_label(d) for d in inputs)
    if device is None:
        default = sd.default.device[0]
        return next((d for d in inputs if d["index"] == default), inputs[0])
    if isinstance(device, (int, np.integer)) and not isinstance(device, bool):
        for d in inputs:
            if d["index"] == device:
                return d
        raise SourceError(f"There is no audio input device with index {device}; the inputs are: {choices}.")
    if isinstance(device, str):
        wanted = device.strip().lower()
        exact = [d for d in inputs if d["name"].lower() == wanted]
        matches = exact or [d for d in inputs if wanted in d["name"].lower()]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise SourceError(f"No audio input device matches {device!r}; the inputs are: {choices}.")
        raise SourceError(
            f"{device!r} matches several audio inputs ({', '.join(_device_label(d) for d in matches)}); "
            "give more of the name, or the index."
        )
    raise SourceError(f"device must be an input's index or (part of) its name, got {device!r}.")


def _choose_settings(sd, info: dict, requested_rate: int | None) -> tuple[int, int]:
    """(rate, channels) the device accepts: 16 kHz mono if it can, else its own rate, resampled later."""
    if requested_rate is not None:
        rates = [int(requested_rate)]
    else:
        rates = list(dict.fromkeys([SAMPLE_RATE, int(info["default_samplerate"]), *_FALLBACK_RATES]))
    channels = list(dict.fromkeys([1, min(2, info["max_input_channels"]), info["max_input_channels"]]))
    reason = None
    for rate in rates:
        for ch in channels:
            try:
                sd.check_input_settings(device=info["index"], channels=ch, dtype="float32", samplerate=rate)
                return rate, ch
            except sd.PortAudioError as e:
                reason = reason or str(e)
            except ValueError as e:
                reason = reason or str(e)
    if requested_rate is not None:
        raise SourceError(
            f"The audio input {_device_label(info)} refuses to capture at {requested_rate} Hz ({reason}); "
            "leave device_rate unset to use a rate it supports."
        )
    raise SourceError(
        f"The audio input {_device_label(info)} accepts none of the usual sample rates ({reason}); "
        "choose another device."
    )


class MicrophoneSource(AudioSource):
    """Live audio from an input device, as 16 kHz mono `AudioChunk`s.

    `device`: None for the default input, an index, or (part of) a device's name, case
    ignored (see `list_input_devices()`). The device is opened at 16 kHz mono when it
    accepts that, else at `device_rate` or its own default rate, and resampled here.
    `buffer_seconds` bounds the audio kept for a busy consumer; `stall_timeout` (seconds,
    None for never) is how long a running device may deliver nothing before the stream is
    declared dead. Counters: `dropped` (16 kHz samples lost to a full buffer),
    `device_overflows` (callbacks in which the driver itself reported lost input).
    """

    def __init__(
        self,
        device: int | str | None = None,
        *,
        chunk_seconds: float = 0.1,
        buffer_seconds: float = 120.0,
        device_rate: int | None = None,
        blocksize: int = 0,
        latency: str | float = "high",
        stall_timeout: float | None = 5.0,
    ):
        super().__init__(chunk_seconds)
        self.device = device
        self.buffer_seconds = float(buffer_seconds)
        self.requested_rate = device_rate
        self.blocksize = blocksize
        self.latency = latency
        self.stall_timeout = stall_timeout
        self.device_overflows = 0
        self.device_info: dict | None = None
        self.device_rate: int | None = None
        self.channels: int | None = None
        self._stream = None
        self._ring: _SampleRing | None = None
        self._chunker: _Chunker | None = None
        self._warned_overflows = 0
        self._failure: SourceError | None = None

    @property
    def backlog(self) -> float:
        if self._ring is None:
            return 0.0
        return self._ring.available / self.device_rate + self._chunker.pending / SAMPLE_RATE

    def _open(self) -> None:
        sd = _import_sounddevice()
        info = _resolve_device(sd, self.device)
        rate, channels = _choose_settings(sd, info, self.requested_rate)
        self.device_info, self.device_rate, self.channels = info, rate, channels
        self._ring = _SampleRing(max(1, round(self.buffer_seconds * rate)))
        self._chunker = _Chunker(rate, self.chunk_size)
        try:
            self._stream = sd.InputStream(
                device=info["index"],
                samplerate=rate,
                channels=channels,
                dtype="float32",
                blocksize=self.blocksize,
                latency=self.latency,
                callback=self._callback,
                finished_callback=self._finished,
            )
            self._stream.start()
        except (sd.PortAudioError, ValueError) as e:
            self._close_stream()
            raise SourceError(
                f"Cannot open the audio input {_device_label(info)} ({e}); check that no other program holds "
                "it and that this program may use the microphone (macOS: System Settings > Privacy & "
                "Security > Microphone)."
            ) from None
        self._ring.last_write = time.monotonic()

    def _callback(self, indata, frames, time_info, status) -> None:
        # PortAudio's thread: copy and go. Nothing here may block, allocate much, or log.
        if status.input_overflow:
            self.device_overflows += 1
        self._ring.write(indata[:, 0] if indata.shape[1] == 1 else indata.mean(axis=1))

    def _finished(self) -> None:
        # Called by PortAudio when the stream ends: after our stop(), or because the device went away.
        if not self._stopped.is_set():
            self._ring.close(
                SourceError(
                    f"The audio input {_device_label(self.device_info)} stopped delivering audio (it was "
                    "disconnected, or its sound server stopped); reconnect it and start a new source."
                )
            )

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:  # a stream whose device vanished may fail to stop: it is gone either way
            with contextlib.suppress(Exception):
                stream.abort()
            with contextlib.suppress(Exception):
                stream.close()

    def _close(self) -> None:
        self._close_stream()
        if self._ring is not None:
            self._ring.close()

    def read(self) -> AudioChunk | None:
        if not self._started:
            self.start()
        chunker, ring = self._chunker, self._ring
        while not chunker.ready:
            if self._failure is not None:
                raise self._failure
            got = ring.read(8 * self.chunk_size, timeout=0.25)
            if got is not None:
                skipped = chunker.push(*got)
                if skipped:
                    self.dropped += skipped
                    warnings.warn(
                        SourceOverflowWarning(
                            f"The consumer fell behind the microphone and {skipped / SAMPLE_RATE:.2f} s of audio "
                            f"were dropped ({self.dropped} samples so far); read faster or raise buffer_seconds."
                        ),
                        stacklevel=2,
                    )
                continue
            if ring.closed:
                chunker.finish()
                if not chunker.ready:
                    if ring.error is not None:
                        self._fail(ring.error)
                    return None
                break
            stalled = time.monotonic() - ring.last_write
            if self.stall_timeout is not None and stalled > self.stall_timeout:
                self._fail(
                    SourceError(
                        f"The audio input {_device_label(self.device_info)} delivered no audio for "
                        f"{stalled:.1f} s; check that it is still connected (or raise stall_timeout)."
                    )
                )
        if self.device_overflows > self._warned_overflows:
            self._warned_overflows = self.device_overflows
            warnings.warn(
                SourceOverflowWarning(
                    f"The audio driver reported lost input {self.device_overflows} time(s); the machine "
                    "may be too busy, or the blocksize too small."
                ),
                stacklevel=2,
            )
        return chunker.ready.pop(0)

    def _fail(self, error: SourceError):
        self._failure = error
        self.stop()
        raise error


# --------------------------------------------------------------------------------------
# File replay
# --------------------------------------------------------------------------------------


class FileAudioSource(AudioSource):
    """A recording replayed like a microphone: chunks arrive when they would have been heard.

    `source` is anything `load_audio` reads (a path, bytes, a file object, or an array with
    its `sample_rate`). At `speed=1.0` a chunk is handed out once its last sample would
    have been spoken; `speed=4.0` replays four times as fast; `realtime=False` hands out
    chunks as fast as they are read. Timestamps are positions in the recording. Nothing is
    dropped: a slow consumer simply finds the next chunks already waiting. `stop()` ends the
    stream after the audio that had arrived by then.
    """

    def __init__(
        self,
        source,
        *,
        chunk_seconds: float = 0.1,
        speed: float = 1.0,
        realtime: bool = True,
        sample_rate: int | None = None,
    ):
        super().__init__(chunk_seconds)
        if not (isinstance(speed, (int, float)) and speed > 0):
            raise InputError(f"speed must be a positive number (1.0 is real time), got {speed!r}.")
        self.samples = load_audio(source, sample_rate)
        self.speed = float(speed)
        self.realtime = bool(realtime)
        self._pos = 0
        self._limit = len(self.samples)
        self._t0 = 0.0

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    def _arrived(self, now: float) -> int:
        """Samples that had 'arrived' by `now`."""
        if not self.realtime:
            return len(self.samples)
        return min(len(self.samples), int((now - self._t0) * self.speed * SAMPLE_RATE))

    @property
    def backlog(self) -> float:
        if not self._started:
            return 0.0
        return max(0, min(self._limit, self._arrived(time.monotonic())) - self._pos) / SAMPLE_RATE

    def _open(self) -> None:
        self._t0 = time.monotonic()

    def _close(self) -> None:
        self._limit = min(self._limit, max(self._pos, self._arrived(time.monotonic())))

    def read(self) -> AudioChunk | None:
        if not self._started:
            self.start()
        pos = self._pos
        end = min(pos + self.chunk_size, self._limit)
        if end <= pos:
            return None
        if self.realtime:
            due = self._t0 + end / (SAMPLE_RATE * self.speed)
            wait = due - time.monotonic()
            if wait > 0 and self._stopped.wait(wait):  # stopped while waiting: end with what had arrived
                end = min(end, self._limit)
                if end <= pos:
                    return None
        self._pos = end
        return AudioChunk(self.samples[pos:end].copy(), pos / SAMPLE_RATE, pos, SAMPLE_RATE, 0)
