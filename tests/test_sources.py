"""Live sources: microphone, file replay, camera/video replay, and utterance segmentation.

The microphone tests capture through the real stack (sounddevice -> PortAudio -> ALSA's
pulse plugin -> a private PulseAudio daemon) from a virtual microphone that the test feeds
with speech from espeak-ng (see virtual_audio.py; they skip, saying which packages to
install, where that stack is missing). Error paths that no real device can be made to
take on demand use a small stand-in for the sounddevice module.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
import types
import warnings
from itertools import pairwise

import numpy as np
import pytest
import virtual_audio
from PIL import Image

from mlx_gemma3n.processing.audio import SAMPLE_RATE, load_audio
from mlx_gemma3n.processing.video import VideoError
from mlx_gemma3n.sources import (
    AudioChunk,
    CameraSource,
    FileAudioSource,
    FolderSource,
    MicrophoneSource,
    SourceError,
    SourceOverflowWarning,
    VideoFileSource,
    VoiceActivitySegmenter,
    split_on_silence,
)

SR = SAMPLE_RATE
PHRASES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella.",
    "Ask her to bring these things.",
]
PAUSE_S = 1.5


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phrases() -> list[np.ndarray]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng to synthesise speech (apt-get install -y espeak-ng)")
    return [virtual_audio.speech(p) for p in PHRASES]


def voiced_span(x: np.ndarray, offset: int = 0) -> tuple[float, float]:
    """(first, last) second at which the clip is audibly non-silent."""
    loud = np.flatnonzero(np.abs(x) > 0.01)
    return (offset + loud[0]) / SR, (offset + loud[-1] + 1) / SR


def speech_with_pauses(phrases, pause_s=PAUSE_S, lead_s=0.5, tail_s=1.0, noise_db=None, seed=0):
    """The phrases separated by pauses: (signal, [(speech_start_s, speech_end_s), ...])."""
    parts, spans, pos = [np.zeros(int(lead_s * SR), np.float32)], [], int(lead_s * SR)
    for i, p in enumerate(phrases):
        spans.append(voiced_span(p, pos))
        parts.append(p)
        pos += len(p)
        gap = np.zeros(int((pause_s if i < len(phrases) - 1 else tail_s) * SR), np.float32)
        parts.append(gap)
        pos += len(gap)
    x = np.concatenate(parts)
    if noise_db is not None:
        rms = 10 ** (noise_db / 20)
        x = x + np.random.default_rng(seed).normal(0, rms, len(x)).astype(np.float32)
    return x.astype(np.float32), spans


def align(captured: np.ndarray, reference: np.ndarray) -> int:
    """The offset in `captured` at which `reference` starts (by cross-correlation)."""
    n = 1 << int(np.ceil(np.log2(len(captured) + len(reference))))
    cc = np.fft.irfft(np.fft.rfft(captured, n) * np.conj(np.fft.rfft(reference, n)), n)
    return int(np.argmax(cc[: len(captured)]))


def assert_contiguous(chunks: list[AudioChunk]) -> None:
    """Every chunk starts where the previous ended, and its start is its sample offset."""
    position = chunks[0].offset
    for c in chunks:
        assert c.gap == 0 and c.offset == position, f"chunk at {c.offset} should start at {position}"
        assert c.start == c.offset / SR and c.sample_rate == SR and c.samples.dtype == np.float32
        position += len(c.samples)


def run_with_deadline(fn, timeout: float):
    """fn() in a thread; (finished, result or exception). The test itself can never hang."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), box.get("error", box.get("result"))


# --------------------------------------------------------------------------------------
# Microphone through a real (virtual) audio device
# --------------------------------------------------------------------------------------


def capture_while_playing(mic: MicrophoneSource, vm, signal: np.ndarray, busy_s: float = 0.0):
    """Chunks captured from `mic` while `signal` plays into the virtual microphone, and 0.5 s after.

    After the first chunk the consumer pretends to be busy (a model running) for `busy_s`.
    """
    chunks, player, quiet_after = [], None, None
    with mic:
        for chunk in mic:
            chunks.append(chunk)
            if player is None:
                player = vm.play(signal)  # the stream is flowing: start the speech
                time.sleep(busy_s)
            elif player.poll() is not None:
                quiet_after = quiet_after or chunk.end + 0.5
                if chunk.end >= quiet_after:
                    break
            assert chunk.end < 60, "the virtual microphone never finished playing"
    assert player.wait() == 0, vm.log("paplay.log")
    return chunks


@pytest.fixture(scope="module")
def live_capture(virtual_mic, phrases):
    """Speech, 1.5 s pauses, speech, ... played into the virtual microphone and captured at 16 kHz."""
    signal, spans = speech_with_pauses(phrases, noise_db=-70)
    mic = MicrophoneSource(virtual_audio.ALSA_DEVICE, chunk_seconds=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SourceOverflowWarning)
        chunks = capture_while_playing(mic, virtual_mic, signal, busy_s=1.0)
    captured = np.concatenate([c.samples for c in chunks])
    lag = align(captured, signal)
    return types.SimpleNamespace(
        mic=mic, chunks=chunks, captured=captured, signal=signal, spans=spans, lag=lag
    )


def test_microphone_captures_16khz_mono_without_resampling_when_the_device_accepts_it(live_capture):
    assert live_capture.mic.device_rate == SR and live_capture.mic.channels == 1


def test_microphone_loses_and_duplicates_no_sample_while_the_consumer_is_busy(live_capture):
    cap = live_capture
    assert cap.mic.dropped == 0
    heard = cap.captured[cap.lag : cap.lag + len(cap.signal)]
    assert len(heard) == len(cap.signal), "the capture ended before the whole signal arrived"
    worst = np.abs(heard - cap.signal).max()
    assert worst < 1e-6, f"captured audio differs from what was played by up to {worst}"


def test_microphone_chunks_are_contiguous_with_monotonic_timestamps(live_capture):
    chunks = live_capture.chunks
    assert_contiguous(chunks)
    assert chunks[0].offset == 0
    assert all(b.start > a.start for a, b in pairwise(chunks))
    assert all(len(c.samples) == 1600 for c in chunks)


def test_utterances_of_live_speech_end_and_start_inside_the_pauses(live_capture):
    cap = live_capture
    utterances = list(VoiceActivitySegmenter().segment(cap.chunks))
    spans = [(a + cap.lag / SR, b + cap.lag / SR) for a, b in cap.spans]
    virtual_audio.assert_inside_the_pauses(utterances, spans)
    for u in utterances:
        assert np.array_equal(u.samples, cap.captured[round(u.start * SR) : round(u.end * SR)])


def test_microphone_resamples_when_the_device_refuses_16khz(
    virtual_mic, phrases, monkeypatch, no_leftover_threads
):
    import sounddevice as sd

    real_check = sd.check_input_settings

    def refuse_16k(*args, samplerate=None, **kw):
        if samplerate == SR:
            raise sd.PortAudioError("Invalid sample rate [PaErrorCode -9997]")
        return real_check(*args, samplerate=samplerate, **kw)

    monkeypatch.setattr(sd, "check_input_settings", refuse_16k)
    signal = np.concatenate([phrases[1], np.zeros(SR // 2, np.float32)])
    mic = MicrophoneSource(virtual_audio.ALSA_DEVICE, chunk_seconds=0.1)
    chunks = capture_while_playing(mic, virtual_mic, signal)
    assert mic.device_rate != SR
    assert_contiguous(chunks)
    captured = np.concatenate([c.samples for c in chunks])
    lag = align(captured, signal)
    heard = captured[lag : lag + len(signal)]
    correlation = np.dot(heard, signal) / np.sqrt(np.dot(heard, heard) * np.dot(signal, signal))
    assert correlation > 0.99, f"resampled capture correlates with the original only {correlation:.4f}"


def test_microphone_that_disappears_ends_iteration_with_a_clear_error(phrases, no_leftover_threads):
    reason = virtual_audio.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with virtual_audio.VirtualMicrophone() as vm:
        mic = MicrophoneSource(virtual_audio.ALSA_DEVICE, stall_timeout=3.0)
        seen = []

        def consume():
            for chunk in mic:
                seen.append(chunk)
                if len(seen) == 1:
                    vm.play(phrases[0])
                if len(seen) == 5:
                    vm.kill()

        finished, outcome = run_with_deadline(consume, timeout=15.0)
        assert finished, "iteration hung after the device disappeared"
        assert isinstance(outcome, SourceError), f"expected a SourceError, got {outcome!r}"
        assert "stopped delivering audio" in str(outcome) or "delivered no audio" in str(outcome)
        assert len(seen) >= 5 and not mic.running


# --------------------------------------------------------------------------------------
# Microphone error paths, through a stand-in for the sounddevice module
# --------------------------------------------------------------------------------------


class FakeSoundDevice(types.ModuleType):
    """Just enough of sounddevice's API: a device list, settings checks, and an input stream
    whose callback the test drives by hand."""

    class PortAudioError(Exception):
        pass

    def __init__(self, devices, default_input=0, refused_rates=(), open_error=None):
        super().__init__("sounddevice")
        self.devices = [
            {"name": n, "max_input_channels": ch, "max_output_channels": 2, "default_samplerate": r}
            for n, ch, r in devices
        ]
        self.default = types.SimpleNamespace(device=[default_input if devices else -1, -1])
        self.refused_rates = set(refused_rates)
        self.open_error = open_error
        self.streams = []
        fake = self

        class InputStream:
            def __init__(self, *, device, samplerate, channels, callback, finished_callback, **kw):
                if fake.open_error:
                    raise fake.PortAudioError(fake.open_error)
                self.samplerate, self.channels = samplerate, channels
                self.callback, self.finished_callback = callback, finished_callback
                self.active = False
                fake.streams.append(self)

            def start(self):
                self.active = True

            def abort(self):
                if self.active:
                    self.active = False
                    self.finished_callback()

            def close(self):
                self.abort()

            def feed(self, samples, overflow=False):
                block = np.repeat(np.asarray(samples, np.float32)[:, None], self.channels, axis=1)
                self.callback(block, len(block), None, types.SimpleNamespace(input_overflow=overflow))

            def vanish(self):  # what PortAudio does when the device goes away
                self.active = False
                self.finished_callback()

        self.InputStream = InputStream

    def query_devices(self):
        return list(self.devices)

    def check_input_settings(self, device=None, channels=None, dtype=None, samplerate=None):
        if samplerate in self.refused_rates:
            raise self.PortAudioError("Invalid sample rate [PaErrorCode -9997]")


@pytest.fixture
def fake_sd(monkeypatch):
    def install(*args, **kw):
        fake = FakeSoundDevice(*args, **kw)
        monkeypatch.setitem(sys.modules, "sounddevice", fake)
        return fake

    return install


LAPTOP = [
    ("Built-in Microphone", 1, 48000.0),
    ("Built-in Output", 0, 48000.0),
    ("USB Headset Mic", 1, 44100.0),
]


def test_no_input_device_is_a_clear_error(fake_sd):
    fake_sd([("HDMI Output", 0, 48000.0)])
    with pytest.raises(SourceError, match="No audio input device was found"):
        MicrophoneSource().start()


def test_unknown_device_name_or_index_is_a_clear_error_that_lists_the_inputs(fake_sd):
    fake_sd(LAPTOP)
    with pytest.raises(
        SourceError,
        match=r"No audio input device matches 'Blue Yeti'.*0 'Built-in Microphone'.*2 'USB Headset Mic'",
    ):
        MicrophoneSource("Blue Yeti").start()
    with pytest.raises(SourceError, match="no audio input device with index 1"):
        MicrophoneSource(1).start()  # an output


def test_device_is_chosen_by_case_insensitive_part_of_its_name_or_by_index(fake_sd):
    fake_sd(LAPTOP)
    with MicrophoneSource("usb headset") as mic:
        assert mic.device_info["index"] == 2
    with MicrophoneSource(0) as mic:
        assert mic.device_info["name"] == "Built-in Microphone"
    with pytest.raises(SourceError, match="matches several"):
        MicrophoneSource("mic").start()


def test_device_that_refuses_16khz_is_opened_at_its_own_rate(fake_sd):
    fake = fake_sd(LAPTOP, refused_rates={16000})
    with MicrophoneSource() as mic:
        assert mic.device_rate == 48000 and fake.streams[0].samplerate == 48000
        fake.streams[0].feed(np.sin(np.arange(48000) * 0.01).astype(np.float32))
        mic.stop()
        total = sum(len(c.samples) for c in mic)
    assert total == 16000


def test_a_rate_the_device_refuses_is_a_clear_error(fake_sd):
    fake_sd(LAPTOP, refused_rates={12345})
    with pytest.raises(SourceError, match="refuses to capture at 12345 Hz"):
        MicrophoneSource(device_rate=12345).start()


def test_a_stream_that_cannot_open_is_a_clear_error_that_mentions_permission(fake_sd):
    fake_sd(LAPTOP, open_error="Unanticipated host error [PaErrorCode -9999]: 'Permission denied'")
    with pytest.raises(
        SourceError,
        match=r"Cannot open the audio input 0 'Built-in Microphone'.*Permission denied.*Microphone",
    ):
        MicrophoneSource().start()


def test_missing_sounddevice_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)
    with pytest.raises(SourceError, match="pip install sounddevice"):
        MicrophoneSource().start()


def test_overflow_drops_the_oldest_audio_counts_it_and_warns(fake_sd):
    fake = fake_sd(LAPTOP)
    mic = MicrophoneSource(buffer_seconds=1.0, chunk_seconds=0.5).start()
    ramp = np.arange(3 * SR, dtype=np.float32) / SR  # each sample says when it was recorded
    for block in np.split(ramp, 30):
        fake.streams[0].feed(block)  # 3 s arrive while the consumer is busy: 2 s must go
    with pytest.warns(SourceOverflowWarning, match="2.00 s of audio were dropped"):
        first = mic.read()
    assert mic.dropped == 2 * SR
    assert first.gap == 2 * SR and first.offset == 2 * SR and first.start == 2.0
    assert np.array_equal(first.samples, ramp[2 * SR : 2 * SR + SR // 2])  # the newest audio was kept
    mic.stop()
    rest = list(mic)
    assert sum(len(c.samples) for c in rest) == SR // 2 and rest[0].offset == first.offset + SR // 2


def test_device_lost_mid_stream_delivers_what_was_captured_then_raises(fake_sd, no_leftover_threads):
    fake = fake_sd(LAPTOP)
    mic = MicrophoneSource(chunk_seconds=0.1).start()
    fake.streams[0].feed(np.zeros(SR // 4, np.float32))
    fake.streams[0].vanish()
    got = []
    with pytest.raises(SourceError, match="stopped delivering audio"):
        for chunk in mic:
            got.append(chunk)
    assert sum(len(c.samples) for c in got) == SR // 4 and not mic.running


def test_device_that_falls_silent_ends_iteration_after_the_stall_timeout(fake_sd, no_leftover_threads):
    fake_sd(LAPTOP)
    mic = MicrophoneSource(stall_timeout=0.3)
    finished, outcome = run_with_deadline(lambda: list(mic), timeout=5.0)
    assert finished and isinstance(outcome, SourceError) and "delivered no audio" in str(outcome)


# --------------------------------------------------------------------------------------
# File replay
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wav_file(tmp_path_factory):
    import soundfile as sf

    rng = np.random.default_rng(1)
    x = (0.1 * rng.standard_normal(int(2.345 * 44100))).astype(np.float32)
    path = tmp_path_factory.mktemp("audio") / "noise.wav"
    sf.write(str(path), x, 44100, subtype="FLOAT")
    return path


def test_file_replay_yields_every_sample_with_exact_timestamps(wav_file):
    expected = load_audio(wav_file)
    chunks = list(FileAudioSource(wav_file, chunk_seconds=0.25, realtime=False))
    assert_contiguous(chunks)
    assert np.array_equal(np.concatenate([c.samples for c in chunks]), expected)
    assert [len(c.samples) for c in chunks[:-1]] == [4000] * (len(chunks) - 1)
    assert chunks[-1].end == len(expected) / SR


def test_file_replay_hands_out_no_chunk_before_its_audio_would_have_been_heard(wav_file):
    source = FileAudioSource(wav_file, chunk_seconds=0.2, speed=8.0)
    late = []
    with source:
        t0 = time.monotonic()
        for chunk in source:
            late.append(time.monotonic() - t0 - chunk.end / 8.0)
    assert min(late) >= -0.01, f"a chunk came {-min(late):.3f} s before it was due"


def test_file_replay_faster_than_real_time_finishes_before_the_recording_would(wav_file):
    source = FileAudioSource(wav_file, chunk_seconds=0.1, speed=20.0)
    t0 = time.monotonic()
    n = sum(len(c.samples) for c in source)
    assert n == len(source.samples) and time.monotonic() - t0 < source.duration


def test_stopping_a_replay_from_another_thread_ends_iteration(wav_file, no_leftover_threads):
    source = FileAudioSource(wav_file, chunk_seconds=0.1, speed=0.5)
    threading.Timer(0.3, source.stop).start()
    finished, chunks = run_with_deadline(lambda: list(source), timeout=3.0)
    assert finished and 0 < sum(len(c.samples) for c in chunks) < len(source.samples)


# --------------------------------------------------------------------------------------
# Frames: folder, video file, camera
# --------------------------------------------------------------------------------------


def colour(i: int) -> tuple[int, int, int]:
    return (i * 5 % 256, 255 - i * 5 % 256, (i * 40) % 256)


@pytest.fixture(scope="module")
def frame_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    for i in range(30):
        Image.new("RGB", (16, 16), colour(i)).save(folder / f"frame{i}.png")
    return folder


def consume_slowly(source, fps, n_frames, pause_s=0.12):
    """Read every frame with a pause after each: [(frame, index due before the call, index due after)]."""
    out = []

    def due():
        return min(int(source.clip_time() * fps + 1e-9), n_frames - 1)

    with source:
        while True:
            before = due()
            frame = source.read()
            if frame is None:
                return out
            out.append((frame, before, due()))
            time.sleep(pause_s)


def test_slow_consumer_of_a_folder_gets_the_newest_frame_and_the_skipped_ones_are_counted(frame_folder):
    source = FolderSource(frame_folder, fps=20, speed=1.0)
    reads = consume_slowly(source, fps=20, n_frames=30)
    indices = [f.index for f, _, _ in reads]
    for frame, before, after in reads:
        assert before <= frame.index <= after, (
            f"frame {frame.index} handed out when {before}..{after} was due"
        )
        assert frame.image.getpixel((3, 3)) == colour(frame.index)
        assert frame.time == frame.index / 20
    assert indices == sorted(set(indices)) and indices[-1] == 29
    assert source.dropped == 30 - len(reads) > 0 and source.delivered == len(reads)


def test_folder_replay_not_in_real_time_hands_out_every_frame_in_order(frame_folder):
    frames = list(FolderSource(frame_folder, fps=20, realtime=False))
    assert [f.index for f in frames] == list(range(30))


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    av = pytest.importorskip("av", reason="VideoFileSource needs PyAV (pip install av)")
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(25):
            image = Image.new("RGB", (32, 32), colour(i))
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_slow_consumer_of_a_video_file_gets_the_newest_frame(video_file):
    source = VideoFileSource(video_file, speed=2.0)
    reads = consume_slowly(source, fps=25, n_frames=25, pause_s=0.1)
    for frame, before, after in reads:
        assert before <= frame.index <= after
        assert frame.time == pytest.approx(frame.index / 25)
        r, g, b = np.asarray(frame.image, dtype=float)[8:24, 8:24].mean(axis=(0, 1))
        assert np.allclose((r, g, b), colour(frame.index), atol=12), f"frame {frame.index} shows {r, g, b}"
    assert source.dropped == 25 - len(reads) > 0


def test_video_file_replay_not_in_real_time_hands_out_every_frame(video_file):
    frames = list(VideoFileSource(video_file, realtime=False))
    assert [f.index for f in frames] == list(range(25))


def test_missing_video_or_folder_is_a_clear_error(tmp_path):
    with pytest.raises(VideoError, match="Video not found"):
        VideoFileSource(tmp_path / "nope.mp4")
    with pytest.raises(VideoError, match="holds no image files"):
        FolderSource(tmp_path)


class FakeCapture:
    """cv2.VideoCapture of a camera making 100 BGR frames a second; pixel [0, 0] holds the frame number."""

    def __init__(self, device, opens=True, dies_after=None):
        self.opened, self.dies_after = opens, dies_after
        self.made = 0
        self.released = False

    def isOpened(self):
        return self.opened

    def set(self, prop, value):
        return True

    def get(self, prop):
        return {3: 64.0, 4: 48.0, 5: 100.0}[prop]

    def read(self):
        time.sleep(0.01)
        if self.dies_after is not None and self.made >= self.dies_after:
            return False, None
        pixels = np.zeros((48, 64, 3), np.uint8)
        pixels[..., 0] = 200  # blue, in OpenCV's BGR order
        pixels[0, 0] = (self.made % 256, self.made // 256, 0)
        self.made += 1
        return True, pixels

    def release(self):
        self.released = True


@pytest.fixture
def fake_cv2(monkeypatch):
    def install(**kw):
        captures = []

        def VideoCapture(device):
            captures.append(FakeCapture(device, **kw))
            return captures[-1]

        module = types.SimpleNamespace(
            VideoCapture=VideoCapture, CAP_PROP_FRAME_WIDTH=3, CAP_PROP_FRAME_HEIGHT=4, CAP_PROP_FPS=5
        )
        monkeypatch.setitem(sys.modules, "cv2", module)
        return captures

    return install


def test_slow_consumer_of_a_camera_gets_the_newest_frame_and_stale_ones_are_dropped(
    fake_cv2, no_leftover_threads
):
    captures = fake_cv2()
    indices = []
    with CameraSource(0, width=64, height=48, fps=100) as camera:
        while len(indices) < 6:
            time.sleep(0.06)  # the model is busy; the camera makes ~6 frames meanwhile
            newest_before_the_call = captures[0].made - 1
            frame = camera.read()
            _, green, blue = frame.image.getpixel((0, 0))  # OpenCV's BGR came back as RGB
            assert blue + 256 * green == frame.index and frame.image.getpixel((5, 5)) == (0, 0, 200)
            # The newest frame made before the call may still be on its way into the slot, not older.
            assert frame.index >= newest_before_the_call - 1, "a stale frame was handed out"
            indices.append(frame.index)
    assert indices == sorted(set(indices))
    assert camera.dropped >= indices[-1] + 1 - len(indices) > 0
    assert captures[0].released and camera.width == 64 and camera.fps == 100


def test_missing_opencv_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(SourceError, match="pip install opencv-python"):
        CameraSource(0).start()


def test_camera_that_cannot_open_is_a_clear_error(fake_cv2):
    fake_cv2(opens=False)
    with pytest.raises(SourceError, match="Cannot open camera 3"):
        CameraSource(3).start()


def test_camera_that_disappears_ends_iteration_with_a_clear_error(fake_cv2, no_leftover_threads):
    captures = fake_cv2(dies_after=5)
    camera = CameraSource(0, read_timeout=0.3)
    finished, outcome = run_with_deadline(lambda: list(camera), timeout=5.0)
    assert finished and isinstance(outcome, SourceError) and "delivered no frame" in str(outcome)
    assert captures[0].released and not camera.running


# --------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------


def chunks_of(x: np.ndarray, seconds: float) -> list[AudioChunk]:
    n = round(seconds * SR)
    return [AudioChunk(x[i : i + n], i / SR, i) for i in range(0, len(x), n)]


@pytest.mark.parametrize("noise_db", [None, -60, -40], ids=["digital-silence", "quiet-room", "noisy-room"])
def test_vad_cuts_speech_into_utterances_at_the_pauses(phrases, noise_db):
    x, spans = speech_with_pauses(phrases, noise_db=noise_db, lead_s=2.0)
    utterances = list(VoiceActivitySegmenter().segment(chunks_of(x, 0.1)))
    assert [u.cut for u in utterances] == [False] * len(spans), [(u.start, u.end) for u in utterances]
    for i, (u, (a, b)) in enumerate(zip(utterances, spans)):
        previous_end = spans[i - 1][1] if i else 0.0
        next_start = spans[i + 1][0] if i + 1 < len(spans) else np.inf
        assert previous_end < u.start <= a + 0.05 and b - 0.05 <= u.end < next_start, (
            i,
            u.start,
            u.end,
            a,
            b,
        )


def test_vad_gives_the_same_utterances_whatever_the_chunk_size(phrases):
    x, _ = speech_with_pauses(phrases, noise_db=-50)
    a = list(VoiceActivitySegmenter().segment(chunks_of(x, 0.1)))
    b = list(VoiceActivitySegmenter().segment(chunks_of(x, 0.37)))
    assert [(u.start, u.end) for u in a] == [(u.start, u.end) for u in b]


def test_vad_cuts_an_utterance_longer_than_the_maximum_in_a_pause_near_the_limit(phrases):
    # Phrases with short breaths (with espeak's own trailing silence, under min_silence): ~9 s of speech.
    x, spans = speech_with_pauses(phrases * 2, pause_s=0.05, lead_s=0.5)
    utterances = list(
        VoiceActivitySegmenter(max_seconds=4.0, cut_search_seconds=2.0).segment(chunks_of(x, 0.1))
    )
    assert all(u.duration <= 4.0 + 1e-9 for u in utterances)
    assert [u.cut for u in utterances] == [True] * (len(utterances) - 1) + [False]
    for u, v in pairwise(utterances):
        assert u.end == v.start  # cut, not a pause: nothing in between is lost
        in_a_breath = any(b <= u.end <= a for (_, b), (a, _) in pairwise(spans))
        assert in_a_breath, f"cut at {u.end:.2f} s is not in a breath: {spans}"
    assert np.array_equal(
        np.concatenate([u.samples for u in utterances]),
        x[round(utterances[0].start * SR) : round(utterances[-1].end * SR)],
    )


def test_vad_closes_an_utterance_at_a_gap_in_the_stream(phrases):
    x = np.concatenate([phrases[0], phrases[1]])
    half = len(phrases[0]) // 2
    head = AudioChunk(x[:half], 0.0, 0)
    tail = AudioChunk(x[half + SR :], (half + SR) / SR, half + SR, gap=SR)  # one second was dropped
    utterances = list(VoiceActivitySegmenter().segment([head, tail]))
    assert utterances[0].end <= half / SR < utterances[1].start


def test_split_on_silence_keeps_a_short_recording_whole():
    assert split_on_silence(np.zeros(SR * 12, np.float32), SR) == [(0.0, 12.0)]


@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_split_on_silence_cuts_a_long_recording_in_its_pauses_into_clips_of_at_most_30s(phrases, overlap):
    x, spans = speech_with_pauses(phrases * 12, pause_s=0.8, noise_db=-55)  # about 80 s
    clips = split_on_silence(x, SR, max_seconds=30.0, overlap_seconds=overlap)
    assert len(clips) >= 3 and clips[0][0] == 0.0 and clips[-1][1] == len(x) / SR
    assert all(0 < b - a <= 30.0 for a, b in clips)
    for (a0, b0), (a1, b1) in pairwise(clips):
        assert a1 == pytest.approx(b0 - overlap)
        assert any(end < b0 < start for (_, end), (start, _) in pairwise(spans)), f"cut at {b0} is in speech"


def test_split_on_silence_covers_a_recording_without_pauses_in_clips_of_at_most_the_maximum():
    x = np.random.default_rng(0).normal(0, 0.1, SR * 70).astype(np.float32)
    clips = split_on_silence(x, SR, max_seconds=30.0, overlap_seconds=1.0)
    assert clips[0][0] == 0.0 and clips[-1][1] == 70.0 and all(b - a <= 30.0 for a, b in clips)
    assert all(a1 < b0 for (_, b0), (a1, _) in pairwise(clips))
