"""Video input: which frames are sampled, their timestamps, each kind of source, and clear errors.

Every clip is made here with frames of distinct solid colours, so the colour of a
returned frame says which frame it is.
"""

import sys

import numpy as np
import pytest
from PIL import Image

from mlx_gemma3n.processing.video import VideoError, load_video_frames, sample_times

COLOURS = [
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (128, 0, 0), (0, 128, 0), (0, 0, 128), (128, 128, 0), (128, 0, 128), (0, 128, 128),
]  # fmt: skip


def solid(index, size=(32, 24)):
    return Image.new("RGB", size, COLOURS[index % len(COLOURS)])


def frame_index(image, tolerance=0):
    """Which colour (hence frame) a returned image shows; -1 if none within tolerance."""
    mean = np.asarray(image, np.float64).reshape(-1, 3).mean(0)
    distances = [np.abs(mean - c).max() for c in COLOURS]
    best = int(np.argmin(distances))
    return best if distances[best] <= tolerance else -1


def picked(frames, tolerance=0):
    return [(round(t, 6), frame_index(image, tolerance)) for t, image in frames]


def make_gif(path, durations_ms):
    frames = [solid(i) for i in range(len(durations_ms))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=list(durations_ms), loop=0)
    return path


# --- sampling rule ------------------------------------------------------------------------


def test_sample_times_are_one_over_fps_apart_when_under_the_cap():
    assert sample_times(2.5, fps=1.0, max_frames=8) == [0.0, 1.0, 2.0]


def test_sample_times_spread_evenly_over_the_clip_when_over_the_cap():
    assert sample_times(10.0, fps=2.0, max_frames=4) == [0.0, 2.5, 5.0, 7.5]


def test_a_clip_shorter_than_one_sample_period_still_gives_one_time():
    assert sample_times(0.2, fps=1.0, max_frames=8) == [0.0]


# --- animated GIF (no decoder needed) -------------------------------------------------------


def test_gif_sampled_at_fps(tmp_path):
    gif = make_gif(tmp_path / "clip.gif", [200] * 10)  # 2 s, a frame every 0.2 s
    assert picked(load_video_frames(gif, fps=1.0, max_frames=8)) == [(0.0, 0), (1.0, 5)]


def test_gif_over_the_cap_is_spread_over_the_whole_clip(tmp_path):
    gif = make_gif(tmp_path / "clip.gif", [200] * 10)
    # 4 fps would give 8 frames; 3 allowed -> times 0, 2/3, 4/3 s -> frames 0, 3, 6
    assert picked(load_video_frames(gif, fps=4.0, max_frames=3)) == [(0.0, 0), (0.6, 3), (1.2, 6)]


def test_gif_frame_held_across_sample_times_is_returned_once(tmp_path):
    gif = make_gif(tmp_path / "clip.gif", [3000, 100, 100, 100, 100])  # 3.4 s
    assert picked(load_video_frames(gif, fps=1.0, max_frames=8)) == [(0.0, 0), (3.0, 1)]


def test_gif_frames_without_a_delay_last_a_tenth_of_a_second(tmp_path):
    gif = make_gif(tmp_path / "clip.gif", [0] * 12)  # shown as 12 x 0.1 s = 1.2 s
    assert picked(load_video_frames(gif, fps=1.0, max_frames=8)) == [(0.0, 0), (1.0, 10)]


def test_gif_frames_are_rgb_images_of_the_clip_size(tmp_path):
    gif = make_gif(tmp_path / "clip.gif", [500] * 4)
    frames = load_video_frames(gif, fps=2.0, max_frames=8)
    assert len(frames) == 4
    assert all(image.mode == "RGB" and image.size == (32, 24) for _, image in frames)


def test_still_image_is_a_one_frame_clip(tmp_path):
    path = tmp_path / "still.png"
    solid(4).save(path)
    assert picked(load_video_frames(path)) == [(0.0, 4)]


# --- folder of frames ------------------------------------------------------------------------


def make_folder(tmp_path, count):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(count):
        solid(i).save(folder / f"frame_{i + 1}.png")  # frame_1 .. frame_12: natural, not text, order
    (folder / "notes.txt").write_text("not a frame")
    return folder


def test_folder_frames_in_natural_order_at_folder_fps(tmp_path):
    folder = make_folder(tmp_path, 12)  # at 2 frames per second: 6 s
    frames = load_video_frames(folder, fps=1.0, max_frames=8, folder_fps=2.0)
    assert picked(frames) == [(0.0, 0), (1.0, 2), (2.0, 4), (3.0, 6), (4.0, 8), (5.0, 10)]


def test_folder_over_the_cap(tmp_path):
    folder = make_folder(tmp_path, 12)  # at the default 1 frame per second: 12 s
    assert picked(load_video_frames(folder, fps=1.0, max_frames=4)) == [(0.0, 0), (3.0, 3), (6.0, 6), (9.0, 9)]


def test_empty_folder(tmp_path):
    with pytest.raises(VideoError, match=r"^The folder .* holds no image files to use as video frames\.$"):
        load_video_frames(tmp_path)


def test_folder_with_a_broken_frame_names_it(tmp_path):
    folder = make_folder(tmp_path, 2)
    (folder / "frame_1.png").write_bytes(b"broken")
    with pytest.raises(VideoError, match=r"^Frame frame_1\.png of .*frame_1\.png is not an image file"):
        load_video_frames(folder)


# --- video file through PyAV (optional extra) ---------------------------------------------------


def make_mp4(path, av, seconds=3, rate=10, hold=5, format=None):
    """H.264 clip at `rate` fps; the colour changes every `hold` frames."""
    with av.open(str(path), "w", format=format) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(seconds * rate):
            frame = av.VideoFrame.from_image(solid(i // hold, size=(64, 48)))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_mp4_sampled_at_fps(tmp_path):
    av = pytest.importorskip("av")
    mp4 = make_mp4(tmp_path / "clip.mp4", av)  # colour changes every 0.5 s
    frames = load_video_frames(mp4, fps=2.0, max_frames=8)
    # H.264 is lossy: a solid colour comes back within a few levels.
    assert picked(frames, tolerance=12) == [(0.0, 0), (0.5, 1), (1.0, 2), (1.5, 3), (2.0, 4), (2.5, 5)]
    assert all(image.mode == "RGB" and image.size == (64, 48) for _, image in frames)


def test_mp4_over_the_cap(tmp_path):
    av = pytest.importorskip("av")
    mp4 = make_mp4(tmp_path / "clip.mp4", av, hold=10)  # colour changes every 1 s
    assert picked(load_video_frames(mp4, fps=10.0, max_frames=3), tolerance=12) == [(0.0, 0), (1.0, 1), (2.0, 2)]


def test_mp4_sampled_faster_than_its_frame_rate_returns_each_frame_once(tmp_path):
    av = pytest.importorskip("av")
    mp4 = make_mp4(tmp_path / "clip.mp4", av, seconds=1)  # 10 frames at 10 fps
    frames = load_video_frames(mp4, fps=25.0, max_frames=100)
    assert [t for t, _ in frames] == pytest.approx([i / 10 for i in range(10)])


def test_raw_stream_without_a_duration_is_measured_by_decoding(tmp_path):
    av = pytest.importorskip("av")
    raw = make_mp4(tmp_path / "clip.h264", av, format="h264")  # no container: no duration, no timing
    frames = load_video_frames(raw, fps=2.0, max_frames=8)
    # FFmpeg plays a raw H.264 stream at 25 fps: 30 frames last 1.2 s, and the frames
    # on screen at 0, 0.5 and 1.0 s are frames 0, 12 and 25 (colours 0, 2 and 5).
    assert [t for t, _ in frames] == pytest.approx([0.0, 0.48, 1.0])
    assert [i for _, i in picked(frames, tolerance=12)] == [0, 2, 5]


def test_video_file_without_pyav_says_how_to_get_it(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    with pytest.raises(VideoError, match=r"decoding video files needs PyAV \(pip install av\); a folder of frames"):
        load_video_frames(path)


# --- clear errors ------------------------------------------------------------------------------


def test_unknown_format(tmp_path):
    path = tmp_path / "clip.xyz"
    path.write_text("this is not a video")
    with pytest.raises(VideoError, match=r"^Cannot read .*clip\.xyz as a video: it is not an image sequence, and "):
        load_video_frames(path)


def test_missing_video(tmp_path):
    with pytest.raises(VideoError, match=r"^Video not found: .*gone\.mp4\.$"):
        load_video_frames(tmp_path / "gone.mp4")


@pytest.mark.parametrize("fps", [0, -1.0, float("nan")])
def test_fps_must_be_positive(tmp_path, fps):
    with pytest.raises(VideoError, match=r"^fps must be a positive number"):
        load_video_frames(make_gif(tmp_path / "clip.gif", [100] * 2), fps=fps)


def test_max_frames_must_be_at_least_one(tmp_path):
    with pytest.raises(VideoError, match=r"^max_frames must be a whole number of at least 1"):
        load_video_frames(make_gif(tmp_path / "clip.gif", [100] * 2), max_frames=0)


def test_errors_are_value_errors():
    assert issubclass(VideoError, ValueError)
