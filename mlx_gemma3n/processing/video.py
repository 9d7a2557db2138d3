"""Video input: a clip becomes a few sampled frames with their timestamps.

Gemma 3n sees a video as a handful of still images. We sample `fps` frames per
second of clip, at 0, 1/fps, 2/fps, ... seconds; when that would give more than
`max_frames`, we take `max_frames` times spread evenly over the whole clip
instead (transformers' default video sampling spreads frames the same way). Each
sample time shows the frame on screen at that moment; a frame on screen across
several sample times is returned once.

Sources:
- a video file, decoded with PyAV (`pip install av`, an optional extra);
- an animated GIF, WebP or PNG, read with pillow (a still image is a one-frame clip);
- a folder of frames (any image files, in natural name order: 2.png before 10.png),
  taken to be `folder_fps` frames per second.
"""

from __future__ import annotations

import bisect
import math
import re
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from .image import ImageError, load_image, to_rgb

# Browsers show GIF frames without a (usable) delay for 0.1 s; so do we.
DEFAULT_FRAME_DURATION_S = 0.1


class VideoError(InputError):
    """A video source that cannot be read; the message says why and what to do."""


def load_video_frames(
    source, fps: float = 1.0, max_frames: int = 8, *, folder_fps: float = 1.0
) -> list[tuple[float, Image.Image]]:
    """Sample frames from a clip: [(timestamp in seconds, RGB image), ...] in time order."""
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise VideoError(f"fps must be a positive number of frames per second, got {fps!r}.")
    if not (isinstance(max_frames, int) and max_frames >= 1):
        raise VideoError(f"max_frames must be a whole number of at least 1, got {max_frames!r}.")
    path = Path(source)
    if not path.exists():
        raise VideoError(f"Video not found: {path}.")
    if path.is_dir():
        if not (math.isfinite(folder_fps) and folder_fps > 0):
            raise VideoError(f"folder_fps must be a positive number of frames per second, got {folder_fps!r}.")
        return _read_folder(path, fps, max_frames, folder_fps)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UnidentifiedImageError:
        return _read_with_pyav(path, fps, max_frames)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise VideoError(f"{path} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels a frame).") from e
    except OSError as e:
        raise VideoError(f"Could not read {path} ({e}).") from e
    with image:
        return _read_animation(image, path, fps, max_frames)


def sample_times(duration: float, fps: float, max_frames: int) -> list[float]:
    """The moments to sample in a clip of `duration` seconds (see the module docstring)."""
    count = max(1, math.ceil(duration * fps - 1e-9))
    if count <= max_frames:
        return [k / fps for k in range(count)]
    return [k * duration / max_frames for k in range(max_frames)]


def _frames_at(starts: list[float], times: list[float]) -> list[int]:
    """Index of the frame on screen at each time (frames given by their start times), once each."""
    picked: list[int] = []
    for t in times:
        index = max(bisect.bisect_right(starts, t + 1e-9) - 1, 0)
        if not picked or picked[-1] != index:
            picked.append(index)
    return picked


def _read_folder(folder: Path, fps, max_frames, folder_fps):
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions),
        key=_natural_key,
    )
    if not files:
        raise VideoError(f"The folder {folder} holds no image files to use as video frames.")
    starts = [i / folder_fps for i in range(len(files))]
    picked = _frames_at(starts, sample_times(len(files) / folder_fps, fps, max_frames))
    frames = []
    for i in picked:
        try:
            frames.append((starts[i], load_image(files[i])))
        except ImageError as e:
            raise VideoError(f"Frame {files[i].name} of {folder}: {e}") from e
    return frames


def _read_animation(image: Image.Image, path: Path, fps, max_frames):
    try:
        starts, clock = [], 0.0
        for i in range(getattr(image, "n_frames", 1)):
            image.seek(i)
            starts.append(clock)
            duration_ms = image.info.get("duration") or 0
            clock += duration_ms / 1000 if duration_ms > 10 else DEFAULT_FRAME_DURATION_S
        frames = []
        for i in _frames_at(starts, sample_times(clock, fps, max_frames)):
            image.seek(i)
            frames.append((starts[i], to_rgb(image)))
        return frames
    except (ImageError, OSError, EOFError, ValueError, SyntaxError) as e:
        raise VideoError(f"Could not decode the frames of {path} ({e}): the file may be truncated or corrupt.") from e


def _read_with_pyav(path: Path, fps, max_frames):
    try:
        import av
    except ImportError:
        raise VideoError(
            f"Cannot read {path} as a video: it is not an image sequence, and decoding video files needs "
            "PyAV (pip install av); a folder of frames or an animated GIF works without it."
        ) from None
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            duration = _pyav_duration(container, stream)
            if duration is None:  # unknown length (e.g. a raw stream): one pass to measure it
                duration = _measure(container, stream)
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            times = sample_times(duration, fps, max_frames)
            frames = _pick_while_decoding(container.decode(stream), times, stream.average_rate)
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(
            f"Cannot read {path} as a video: it is not an image sequence, and PyAV could not decode it ({e})."
        ) from e
    if not frames:
        raise VideoError(f"Cannot read {path} as a video: it holds no frames.")
    return frames


def _video_stream(container, path):
    if not container.streams.video:
        raise VideoError(f"Cannot read {path} as a video: it has no video stream.")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _pyav_duration(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # av.time_base: microseconds
    return None


def _measure(container, stream) -> float:
    first = last = None
    for i, frame in enumerate(container.decode(stream)):
        last = _frame_time(frame, i, stream.average_rate)
        first = last if first is None else first
    if last is None:
        return 0.0
    return last - first + (1 / float(stream.average_rate) if stream.average_rate else 0.0)


def _frame_time(frame, index, rate) -> float:
    if frame.time is not None:
        return float(frame.time)
    return index / float(rate or 1)


def _pick_while_decoding(decoded, times: list[float], rate) -> list[tuple[float, Image.Image]]:
    """Walk the decoded frames once, converting only those on screen at a sample time."""
    frames: list[tuple[float, Image.Image]] = []
    pending, previous, origin = list(times), None, None
    for index, frame in enumerate(decoded):
        t = _frame_time(frame, index, rate)
        origin = t if origin is None else origin  # streams may start late; our clock starts at frame one
        t -= origin
        while pending and previous is not None and pending[0] < t - 1e-9:
            pending.pop(0)
            _append_once(frames, previous)
        if not pending:
            break
        previous = (t, frame)
    if pending and previous is not None:
        _append_once(frames, previous)
    return frames


def _append_once(frames, candidate) -> None:
    t, frame = candidate
    if not frames or frames[-1][0] != t:
        frames.append((t, frame.to_image()))


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]
