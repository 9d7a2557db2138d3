"""Live inputs: microphone, camera, and files replayed as if they were live.

Every source has the same small shape:

    with MicrophoneSource() as mic:          # start() ... stop()
        for chunk in mic:                    # AudioChunk(samples, start, offset, ...)
            ...

A device fills a bounded buffer from its own thread; the consumer (the model) reads at its
own pace. Audio is never dropped silently: if the consumer falls so far behind that the
buffer fills, the oldest samples go, `source.dropped` counts them, a
`SourceOverflowWarning` is issued in the consumer's thread and the next chunk's timestamp
jumps over the gap. Video is the opposite: a slow consumer wants the newest picture, so
frame sources hand out the latest frame and count the stale ones they skipped.

- audio: `MicrophoneSource` (sounddevice), `FileAudioSource` (any file `load_audio` reads)
- video: `CameraSource` (OpenCV, optional), `VideoFileSource` (PyAV, optional), `FolderSource`
- segment: `VoiceActivitySegmenter` (stream of chunks -> utterances), `split_on_silence`
  (a long recording -> clips of at most 30 s cut in its pauses)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

from ..errors import SourceError

T = TypeVar("T")


class SourceOverflowWarning(UserWarning):
    """The consumer fell behind a live source and some of its input was dropped."""


class Source(Generic[T]):
    """A stream of timestamped items (audio chunks or video frames) from a device or a file.

    Subclasses implement `_open()`, `_close()` and `read()`. `start()` and `stop()` may be
    called more than once; iteration starts the source if needed and ends when the source
    ends or is stopped; a source that breaks (a device unplugged) raises SourceError from
    its iterator instead of hanging. `dropped` counts what was lost: audio samples that
    overflowed the buffer, or stale video frames skipped to reach the newest.
    """

    def __init__(self) -> None:
        self.dropped = 0
        self._state_lock = threading.Lock()
        self._started = False
        self._stopped = threading.Event()

    @property
    def running(self) -> bool:
        """Started and not yet stopped."""
        return self._started and not self._stopped.is_set()

    def start(self):
        with self._state_lock:
            if self._started:
                return self
            if self._stopped.is_set():
                raise SourceError(f"This {type(self).__name__} was stopped; create a new one to read again.")
            self._open()
            self._started = True
        return self

    def stop(self) -> None:
        with self._state_lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
            if self._started:
                self._close()

    def read(self) -> T | None:
        """The next item, waiting for it if needed; None when the stream has ended."""
        raise NotImplementedError

    def _open(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __iter__(self) -> Iterator[T]:
        self.start()
        while (item := self.read()) is not None:
            yield item

    def __del__(self):
        # A source dropped without stop() must not leave a device open or a thread running.
        with contextlib.suppress(Exception):
            self.stop()


from .audio import AudioChunk, AudioSource, FileAudioSource, MicrophoneSource, list_input_devices
from .segment import Utterance, VoiceActivitySegmenter, split_on_silence
from .video import CameraSource, FolderSource, Frame, FrameSource, VideoFileSource

__all__ = [
    "AudioChunk",
    "AudioSource",
    "CameraSource",
    "FileAudioSource",
    "FolderSource",
    "Frame",
    "FrameSource",
    "MicrophoneSource",
    "Source",
    "SourceError",
    "SourceOverflowWarning",
    "Utterance",
    "VideoFileSource",
    "VoiceActivitySegmenter",
    "list_input_devices",
    "split_on_silence",
]
