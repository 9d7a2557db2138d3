"""Frame sources: a camera (OpenCV), a video file (PyAV) or a folder of frames, as live video.

A model that describes a scene takes far longer per frame than a camera takes to make
one, and a description of a stale frame is worth little. So frame sources never queue:
`latest()` (and iteration) hands out the newest frame not yet handed out, waiting only
when there is none, and `dropped` counts the frames skipped on the way. `Frame.index` is
the frame's number in the source, so skipped frames also show as gaps in the indices.

The camera is read by a thread of its own into a one-frame slot. Replayed files need no
thread: each call works out which frame is on screen now (position = elapsed time x
`speed`) and decodes up to it; `realtime=False` hands out every frame, in order, as fast
as they are asked for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError
from ..processing.image import ImageError, load_image
from ..processing.video import VideoError, _natural_key
from . import Source, SourceError


@dataclass(frozen=True, eq=False)
class Frame:
    """An RGB picture, when it was taken (seconds since the stream started, or the position
    in a replayed file) and its number in the source (gaps = frames skipped)."""

    image: Image.Image
    time: float
    index: int


class FrameSource(Source[Frame]):
    """A stream of video frames of which a slow consumer gets the newest."""

    def __init__(self) -> None:
        super().__init__()
        self.delivered = 0

    def latest(self) -> Frame | None:
        """The newest frame not handed out yet (waiting for one if needed); None at the end."""
        raise NotImplementedError

    def read(self) -> Frame | None:
        frame = self.latest()
        if frame is not None:
            self.delivered += 1
        return frame


# --------------------------------------------------------------------------------------
# Camera
# --------------------------------------------------------------------------------------


class _LatestSlot:
    """A queue of length one that keeps the newest item; `put` says whether it replaced an unread one."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._item = None
        self.closed = False
        self.error: BaseException | None = None

    def put(self, item) -> bool:
        with self._cond:
            replaced = self._item is not None
            self._item = item
            self._cond.notify_all()
            return replaced

    def get(self, timeout: float | None):
        """The newest item (taking it), or None when closed and empty, or on timeout."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self.closed, timeout)
            item, self._item = self._item, None
            return item

    def close(self, error: BaseException | None = None) -> None:
        with self._cond:
            if not self.closed:
                self.closed, self.error = True, error
            self._cond.notify_all()


def _import_cv2():
    try:
        import cv2
    except ImportError:
        raise SourceError(
            "CameraSource needs OpenCV; install it with `pip install opencv-python` "
            "(or opencv-python-headless), or replay a file with VideoFileSource/FolderSource."
        ) from None
    return cv2


class CameraSource(FrameSource):
    """Live frames from a camera through OpenCV's VideoCapture.

    `device` is the camera's index (0 is the first) or a capture URL/path OpenCV accepts.
    `width`, `height` and `fps` are requests; the camera may choose other values, which
    are then in `self.width`, `self.height` and `self.fps` after `start()`. A camera
    that delivers nothing for `read_timeout` seconds ends the stream with a SourceError.
    """

    def __init__(
        self,
        device: int | str = 0,
        *,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
        read_timeout: float = 5.0,
    ):
        super().__init__()
        self.device = device
        self.width, self.height, self.fps = width, height, fps
        self.read_timeout = read_timeout
        self._slot = _LatestSlot()
        self._thread: threading.Thread | None = None
        self._capture = None
        self._t0 = 0.0

    def _open(self) -> None:
        cv2 = _import_cv2()
        capture = cv2.VideoCapture(self.device)
        if not capture.isOpened():
            capture.release()
            raise SourceError(
                f"Cannot open camera {self.device!r}; check that it is connected and not used by another "
                "program, and that this program may use the camera (macOS: System Settings > Privacy & "
                "Security > Camera)."
            )
        for prop, value in (
            (cv2.CAP_PROP_FRAME_WIDTH, self.width),
            (cv2.CAP_PROP_FRAME_HEIGHT, self.height),
            (cv2.CAP_PROP_FPS, self.fps),
        ):
            if value is not None:
                capture.set(prop, value)
        self.width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)) or self.width
        self.height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) or self.height
        self.fps = float(capture.get(cv2.CAP_PROP_FPS)) or self.fps
        self._capture = capture
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._grab, name=f"CameraSource({self.device!r})", daemon=True)
        self._thread.start()

    def _grab(self) -> None:
        """The camera thread: keep only the newest frame; the capture is released here, after the last read."""
        capture, index, last_ok = self._capture, 0, time.monotonic()
        try:
            while not self._stopped.is_set():
                ok, pixels = capture.read()
                now = time.monotonic()
                if not ok or pixels is None:
                    if now - last_ok > self.read_timeout:
                        self._slot.close(
                            SourceError(
                                f"Camera {self.device!r} delivered no frame for {now - last_ok:.1f} s (it was "
                                "disconnected, or another program took it); reconnect it and start a new source."
                            )
                        )
                        return
                    self._stopped.wait(0.01)
                    continue
                last_ok = now
                if self._slot.put((pixels, now - self._t0, index)):
                    self.dropped += 1
                index += 1
        except Exception as e:  # a broken driver must end the stream, not the thread silently
            self._slot.close(SourceError(f"Camera {self.device!r} failed ({e}); start a new source."))
        finally:
            capture.release()
            self._slot.close()

    def _close(self) -> None:
        self._slot.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.read_timeout + 1.0)

    def latest(self) -> Frame | None:
        if not self._started:
            self.start()
        # The camera thread gives up after read_timeout without a frame; the margin covers a read()
        # that never returns at all (a hung driver), which the thread cannot notice.
        item = self._slot.get(timeout=self.read_timeout + 1.0)
        if item is None:
            error = self._slot.error
            if error is None and not self._slot.closed:
                error = SourceError(
                    f"Camera {self.device!r} delivered no frame for {self.read_timeout + 1.0:.1f} s; "
                    "check that it is still connected (or raise read_timeout)."
                )
            if error is not None:
                self.stop()
                raise error
            return None
        pixels, t, index = item
        return Frame(_bgr_to_image(pixels), t, index)


def _bgr_to_image(pixels: np.ndarray) -> Image.Image:
    """OpenCV's BGR(A) or grey uint8 array -> RGB pillow image."""
    if pixels.ndim == 2:
        return Image.fromarray(pixels).convert("RGB")
    return Image.fromarray(np.ascontiguousarray(pixels[..., 2::-1]))


# --------------------------------------------------------------------------------------
# Replayed files
# --------------------------------------------------------------------------------------


class _ReplaySource(FrameSource):
    """Frames of a file handed out as if they came live: the newest due now, the rest skipped."""

    def __init__(self, speed: float, realtime: bool):
        super().__init__()
        if not (isinstance(speed, (int, float)) and speed > 0):
            raise InputError(f"speed must be a positive number (1.0 is real time), got {speed!r}.")
        self.speed, self.realtime = float(speed), bool(realtime)
        self._t0 = 0.0
        self._frames: Iterator | None = None
        self._next = None  # (time, index, payload) of the next frame not yet handed out or skipped

    def _iter_frames(self) -> Iterator[tuple[float, object]]:
        """(time in seconds from the first frame, payload), in order."""
        raise NotImplementedError

    def _image(self, payload) -> Image.Image:
        raise NotImplementedError

    def _open(self) -> None:
        self._frames = ((t, i, p) for i, (t, p) in enumerate(self._iter_frames()))
        self._advance()
        self._t0 = time.monotonic()

    def _advance(self):
        current, self._next = self._next, next(self._frames, None)
        return current

    def _close(self) -> None:
        self._next = None
        if self._frames is not None:
            try:
                self._frames.close()  # releases the decoder
            except (
                ValueError
            ):  # the consumer's thread is decoding right now; it closes it when it sees the stop
                pass

    def clip_time(self) -> float:
        """Where in the file playback is now, in seconds."""
        return (time.monotonic() - self._t0) * self.speed

    def latest(self) -> Frame | None:
        if not self._started:
            self.start()
        if self._next is None or self._stopped.is_set():
            return self._end()
        if not self.realtime:
            t, index, payload = self._advance()
            return Frame(self._image(payload), t, index)
        while (wait := self._next[0] / self.speed - (time.monotonic() - self._t0)) > 0:
            if self._stopped.wait(wait):
                return self._end()
        now = self.clip_time()
        current = self._advance()
        while self._next is not None and self._next[0] <= now:  # stale: a newer frame is already due
            self.dropped += 1
            current = self._advance()
        t, index, payload = current
        return Frame(self._image(payload), t, index)

    def _end(self) -> None:
        if self._frames is not None:
            self._frames.close()


class FolderSource(_ReplaySource):
    """A folder of images (natural name order: 2.png before 10.png) replayed at `fps`."""

    def __init__(self, folder, fps: float = 10.0, *, speed: float = 1.0, realtime: bool = True):
        super().__init__(speed, realtime)
        if not (isinstance(fps, (int, float)) and fps > 0):
            raise InputError(f"fps must be a positive number of frames per second, got {fps!r}.")
        self.folder, self.fps = Path(folder), float(fps)
        if not self.folder.is_dir():
            raise VideoError(f"Frame folder not found: {self.folder}.")
        extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
        self.files = sorted(
            (
                p
                for p in self.folder.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
            ),
            key=_natural_key,
        )
        if not self.files:
            raise VideoError(f"The folder {self.folder} holds no image files to use as video frames.")

    def _iter_frames(self):
        for i, path in enumerate(self.files):
            yield i / self.fps, path

    def _image(self, path: Path) -> Image.Image:
        try:
            return load_image(path)
        except ImageError as e:
            raise VideoError(f"Frame {path.name} of {self.folder}: {e}") from e


class VideoFileSource(_ReplaySource):
    """A video file decoded with PyAV (`pip install av`) and replayed at `speed`."""

    def __init__(self, path, *, speed: float = 1.0, realtime: bool = True):
        super().__init__(speed, realtime)
        self.path = Path(path)
        if not self.path.is_file():
            raise VideoError(f"Video not found: {self.path}.")
        try:
            import av  # noqa: F401
        except ImportError:
            raise VideoError(
                f"Replaying {self.path} needs PyAV (pip install av); a folder of frames (FolderSource) works without it."
            ) from None
        self._container = None

    def _iter_frames(self):
        import av

        try:
            self._container = av.open(str(self.path))
            if not self._container.streams.video:
                raise VideoError(f"{self.path} has no video stream.")
            stream = self._container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate or 0) or 25.0
            origin = None
            for i, frame in enumerate(self._container.decode(stream)):
                t = float(frame.time) if frame.time is not None else i / rate
                origin = t if origin is None else origin  # our clock starts at the first frame
                yield t - origin, frame
        except (av.FFmpegError, OSError) as e:
            raise VideoError(f"Cannot decode {self.path} with PyAV ({e}).") from e
        finally:
            if self._container is not None:
                self._container.close()
                self._container = None

    def _image(self, frame) -> Image.Image:
        return frame.to_image().convert("RGB")
