"""Live transcription and live scene description, end to end on the tiny random checkpoint.

The microphone runs through the real stack (sounddevice -> PortAudio -> ALSA's pulse plugin
-> a private PulseAudio daemon, see virtual_audio.py) fed with espeak-ng speech separated by
known pauses. The tiny model's text is noise, so the tests check structure and timing: one
final per utterance, boundaries inside the pauses, every sample read once, timestamps that
only go forward, errors that end the stream cleanly. The camera tests replay folders of
frames; where only the scheduling is under test a stand-in `describe_fn` plays a slow model
(the tiny checkpoint's vision tower takes ~20 s a frame on a CPU), and the example script
runs the real model on one frame.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import types
from itertools import pairwise
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile
import virtual_audio
from PIL import Image

from mlx_gemma3n import load
from mlx_gemma3n.live import (
    Description,
    Final,
    Gap,
    LiveDescriber,
    LiveTranscriber,
    Partial,
)
from mlx_gemma3n.processing.audio import SAMPLE_RATE
from mlx_gemma3n.sources import (
    CameraSource,
    FileAudioSource,
    FolderSource,
    MicrophoneSource,
    SourceError,
    VoiceActivitySegmenter,
)
from mlx_gemma3n import transcribe

SR = SAMPLE_RATE
PHRASES = ["The quick brown fox jumps over the lazy dog.", "Please call Stella.", "Ask her to bring these things."]
PAUSE_S = 1.5
MAX_TOKENS = 2
EXAMPLES = Path(__file__).parent.parent / "examples"


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny):
    return load(tiny[0], dtype=mx.float32)


@pytest.fixture(scope="module")
def phrases() -> list[np.ndarray]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng to synthesise speech (apt-get install -y espeak-ng)")
    return [virtual_audio.speech(p) for p in PHRASES]


def speech_with_pauses(phrases, pause_s=PAUSE_S, lead_s=0.5, tail_s=1.0):
    """The phrases separated by pauses, with a -70 dB noise floor: (signal, [(start_s, end_s) of speech])."""
    parts, spans, pos = [np.zeros(int(lead_s * SR), np.float32)], [], int(lead_s * SR)
    for i, p in enumerate(phrases):
        loud = np.flatnonzero(np.abs(p) > 0.01)
        spans.append(((pos + loud[0]) / SR, (pos + loud[-1] + 1) / SR))
        gap = np.zeros(int((pause_s if i < len(phrases) - 1 else tail_s) * SR), np.float32)
        parts += [p, gap]
        pos += len(p) + len(gap)
    x = np.concatenate(parts)
    x = x + np.random.default_rng(0).normal(0, 10 ** (-70 / 20), len(x)).astype(np.float32)
    return x.astype(np.float32), spans


def align(captured: np.ndarray, reference: np.ndarray) -> int:
    """The offset in `captured` at which `reference` starts (by cross-correlation)."""
    n = 1 << int(np.ceil(np.log2(len(captured) + len(reference))))
    cc = np.fft.irfft(np.fft.rfft(captured, n) * np.conj(np.fft.rfft(reference, n)), n)
    return int(np.argmax(cc[: len(captured)]))


def collect(live, timeout: float):
    """All events of `live` (iterated in a thread so the test cannot hang): (finished, events, error)."""
    events, box = [], {}

    def target():
        try:
            events.extend(live)  # (appends each event as it comes)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        live.stop(timeout=5)
    return not t.is_alive(), events, box.get("error")


def of(events, kind):
    return [e for e in events if isinstance(e, kind)]


# --------------------------------------------------------------------------------------
# Speech from a real (virtual) microphone
# --------------------------------------------------------------------------------------


def live_from_microphone(vm, model, tokenizer, signal, *, busy_at=None, busy_s=0.0, **mic_options):
    """Transcribe `signal` played into the virtual microphone (starting once audio flows), until
    0.5 s after it ends. With `busy_at`, the consumer stalls `busy_s` when the stream reaches
    that second. Returns a namespace with the chunks read, the events and the transcriber."""
    mic = MicrophoneSource(virtual_audio.ALSA_DEVICE, chunk_seconds=0.1, **mic_options)
    chunks, state = [], {"player": None, "quiet_after": None, "stalled": False}

    def on_audio(chunk):
        chunks.append(chunk)
        if state["player"] is None:
            state["player"] = vm.play(signal)  # the stream is flowing: start the speech
        elif busy_at is not None and not state["stalled"] and chunk.end >= busy_at:
            state["stalled"] = True
            time.sleep(busy_s)
        elif state["player"].poll() is not None:
            state["quiet_after"] = state["quiet_after"] or chunk.end + 0.5
            if chunk.end >= state["quiet_after"]:
                live.finish(timeout=0)  # from the loop's own thread: returns at once
        if chunk.end > 60:
            live.stop(timeout=0)

    live = LiveTranscriber(model, tokenizer, mic, max_tokens=MAX_TOKENS, partial_every=1.0, on_audio=on_audio)
    finished, events, error = collect(live, timeout=60)
    assert finished and error is None, f"live transcription failed: {error!r}"
    assert state["player"].wait() == 0, vm.log("paplay.log")
    captured = np.concatenate([c.samples for c in chunks])
    return types.SimpleNamespace(live=live, mic=mic, chunks=chunks, events=events, captured=captured)


@pytest.fixture(scope="module")
def mic_run(virtual_mic, phrases, loaded):
    signal, spans = speech_with_pauses(phrases)
    run = live_from_microphone(virtual_mic, *loaded, signal)
    run.signal = signal
    run.lag = align(run.captured, signal) + run.chunks[0].offset
    run.spans = [(a + run.lag / SR, b + run.lag / SR) for a, b in spans]  # in stream seconds
    finals = of(run.events, Final)
    s = run.live.stats
    print(
        f"\nlive microphone: {s.audio_seconds:.1f} s audio, RTF {s.real_time_factor:.3f}, max lag {s.max_lag:.2f} s; "
        f"final latency (utterance end -> text) {[round(f.latency, 3) for f in finals]}; speech end -> text "
        f"{[round(f.latency + (f.end - b), 3) for f, (_, b) in zip(finals, run.spans)]}; "
        f"partials {s.partials} (skipped {s.partials_skipped})"
    )
    return run


def test_live_microphone_loses_and_duplicates_no_sample(mic_run):
    chunks, live = mic_run.chunks, mic_run.live
    position = chunks[0].offset
    for c in chunks:
        assert c.gap == 0 and c.offset == position, f"chunk at {c.offset} should start at {position}"
        position += len(c.samples)
    assert live.stats.samples == position - chunks[0].offset == len(mic_run.captured)
    assert live.stats.lost_samples == mic_run.mic.dropped == 0 and not of(mic_run.events, Gap)
    heard = mic_run.captured[mic_run.lag - chunks[0].offset :][: len(mic_run.signal)]
    assert len(heard) == len(mic_run.signal), "the stream ended before the whole signal arrived"
    worst = np.abs(heard - mic_run.signal).max()
    assert worst < 1e-6, f"what the transcriber read differs from what was played by up to {worst}"


def test_live_microphone_gives_one_final_per_utterance_with_boundaries_in_the_pauses(mic_run):
    finals, spans = of(mic_run.events, Final), mic_run.spans
    assert len(spans) == len(PHRASES)
    virtual_audio.assert_inside_the_pauses(finals, spans)
    for f in finals:
        assert f.text and not f.cut  # every utterance went through the model


def test_live_microphone_timestamps_only_go_forward(mic_run):
    events = [e for e in mic_run.events if isinstance(e, (Partial, Final))]
    finals = of(events, Final)
    assert all(a.end <= b.start for a, b in pairwise(finals)), "finals overlap or go back in time"
    assert all(a.end <= b.end for a, b in pairwise(events)), "an event ends before the one before it"
    # Partials belong to the utterance their final closes: same start, growing ends, none past the final.
    for e, f in zip(events, [next(f for f in events[i:] if isinstance(f, Final)) for i in range(len(events))]):
        assert e.start == f.start and e.end <= f.end
    assert of(events, Partial), "the model keeps up here, so partials should have been made"


def test_live_microphone_reports_latency_lag_and_real_time_factor(mic_run):
    s = mic_run.live.stats
    finals = of(mic_run.events, Final)
    assert all(0 < f.latency < 60 and f.lag >= 0 for f in finals)
    assert 0 < s.real_time_factor and s.model_seconds > 0 and s.finals == len(finals)
    assert s.speech_seconds == pytest.approx(sum(f.end - f.start for f in finals))


@pytest.mark.filterwarnings("ignore::mlx_gemma3n.sources.SourceOverflowWarning")  # expected here
def test_a_consumer_slower_than_the_microphone_loses_audio_and_reports_where(
    virtual_mic, phrases, loaded, no_leftover_threads
):
    # A 0.5 s buffer and a consumer that stalls 1.5 s in the middle of the speech: about 1 s is lost.
    signal = np.concatenate([phrases[0], np.zeros(SR, np.float32)])
    run = live_from_microphone(
        virtual_mic, *loaded, signal, busy_at=1.5, busy_s=1.5, buffer_seconds=0.5, stall_timeout=None
    )
    s, gaps = run.live.stats, of(run.events, Gap)
    print(f"\noverflow under load: {s.lost_seconds:.2f} s lost in {s.gaps} gap(s), {s.device_overflows} driver overflows")
    assert len(gaps) == s.gaps >= 1 and s.lost_samples == run.mic.dropped > 0
    assert sum(g.seconds for g in gaps) == pytest.approx(s.lost_seconds)
    end = run.chunks[-1].offset + len(run.chunks[-1].samples)
    assert s.samples + s.lost_samples == end - run.chunks[0].offset, "read + lost should be the whole stream"
    for f in of(run.events, Final):  # no utterance spans a hole
        assert all(f.end <= g.start - g.seconds + 1e-9 or f.start >= g.start for g in gaps), (f, gaps)


def test_a_microphone_that_disappears_ends_the_stream_with_a_clear_error_after_the_last_final(
    phrases, loaded, no_leftover_threads
):
    reason = virtual_audio.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with virtual_audio.VirtualMicrophone() as vm:
        mic = MicrophoneSource(virtual_audio.ALSA_DEVICE, stall_timeout=2.0)
        read = []

        def on_audio(chunk):
            read.append(chunk)
            if len(read) == 1:
                vm.play(phrases[0])
            if sum(np.abs(c.samples).max() > 0.1 for c in read) == 10:  # a second into the speech
                vm.kill()

        live = LiveTranscriber(*loaded, mic, max_tokens=MAX_TOKENS, partial_every=None, on_audio=on_audio)
        finished, events, error = collect(live, timeout=20)
    assert finished, "the transcriber hung after the device disappeared"
    assert isinstance(error, SourceError), f"expected a SourceError, got {error!r}"
    assert "stopped delivering audio" in str(error) or "delivered no audio" in str(error)
    assert len(of(events, Final)) == 1, "the speech heard before the device vanished should still be transcribed"
    assert not live.running and not mic.running


# --------------------------------------------------------------------------------------
# Error paths no real device takes on demand: a stand-in for the sounddevice module
# --------------------------------------------------------------------------------------


class FakeSoundDevice(types.ModuleType):
    """A device list and settings checks; opening a stream is never reached in these tests."""

    class PortAudioError(Exception):
        pass

    def __init__(self, inputs, refused_rates=()):
        super().__init__("sounddevice")
        self.devices = [{"name": n, "max_input_channels": 1, "max_output_channels": 0, "default_samplerate": r} for n, r in inputs]
        self.devices.append({"name": "HDMI", "max_input_channels": 0, "max_output_channels": 2, "default_samplerate": 48000.0})
        self.default = types.SimpleNamespace(device=[0 if inputs else -1, -1])
        self.refused_rates = set(refused_rates)

    def query_devices(self):
        return list(self.devices)

    def check_input_settings(self, device=None, channels=None, dtype=None, samplerate=None):
        if samplerate in self.refused_rates:
            raise self.PortAudioError("Invalid sample rate [PaErrorCode -9997]")

    def InputStream(self, **kw):
        raise AssertionError("no stream should be opened")


@pytest.mark.parametrize(
    "inputs, refused, options, message",
    [
        ([], (), {}, "No audio input device was found"),
        ([("Built-in Microphone", 48000.0)], (44100,), {"device_rate": 44100}, "refuses to capture at 44100 Hz"),
        ([("Built-in Microphone", 48000.0)], (), {"device": "USB"}, "No audio input device matches 'USB'"),
    ],
    ids=["no-device", "refused-rate", "unknown-device"],
)
def test_a_microphone_that_cannot_start_ends_the_transcriber_with_its_clear_error(
    monkeypatch, no_leftover_threads, inputs, refused, options, message
):
    monkeypatch.setitem(sys.modules, "sounddevice", FakeSoundDevice(inputs, refused))
    live = LiveTranscriber(None, None, MicrophoneSource(**options), transcribe_fn=lambda x: "")
    finished, events, error = collect(live, timeout=10)
    assert finished and events == []
    assert isinstance(error, SourceError) and message in str(error), repr(error)
    assert not live.running


def test_leaving_the_with_block_raises_the_error_that_ended_the_stream(monkeypatch, no_leftover_threads):
    monkeypatch.setitem(sys.modules, "sounddevice", FakeSoundDevice([]))
    live = LiveTranscriber(None, None, MicrophoneSource(), transcribe_fn=lambda x: "")
    with pytest.raises(SourceError, match="No audio input device"), live:
        while live.running:  # the loop meets the error on its own thread; nobody looks at it here
            time.sleep(0.01)
    assert not live.running


# --------------------------------------------------------------------------------------
# Speech from a replayed file
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def talk(phrases):
    return speech_with_pauses(phrases)[0]


@pytest.mark.parametrize("translate_to", [None, "Spanish"])
def test_replayed_file_gives_the_offline_utterances_and_the_offline_text(loaded, talk, translate_to):
    model, tokenizer = loaded
    source = FileAudioSource(talk, sample_rate=SR, realtime=False)
    live = LiveTranscriber(model, tokenizer, source, max_tokens=MAX_TOKENS, translate_to=translate_to)
    finals = [e for e in live if isinstance(e, Final)]
    expected = list(VoiceActivitySegmenter().segment(FileAudioSource(talk, sample_rate=SR, realtime=False)))
    assert [(f.start, f.end) for f in finals] == [(u.start, u.end) for u in expected]
    assert [f.text for f in finals] == [
        transcribe(model, tokenizer, u.samples, translate_to=translate_to, max_tokens_per_clip=MAX_TOKENS).text
        for u in expected
    ]
    assert live.stats.samples == len(talk) and live.stats.lost_samples == 0


def test_partials_are_skipped_while_the_transcriber_is_behind(talk):
    # A replay not in real time has the whole file waiting: the transcriber is always behind.
    calls = []
    source = FileAudioSource(talk, sample_rate=SR, realtime=False)
    live = LiveTranscriber(None, None, source, transcribe_fn=lambda x: calls.append(len(x)) or "x", partial_every=0.5)
    events = list(live)
    assert not of(events, Partial) and live.stats.partials_skipped > 0
    assert len(calls) == len(of(events, Final)) == len(PHRASES)


@pytest.mark.parametrize("how, finals_expected", [("finish", 1), ("stop", 0)])
def test_finish_transcribes_what_was_heard_and_stop_drops_it(talk, no_leftover_threads, how, finals_expected):
    source = FileAudioSource(talk, sample_rate=SR, speed=4.0)

    def on_audio(chunk):
        if chunk.end >= 1.5:  # in the middle of the first phrase
            getattr(live, how)(timeout=0)

    live = LiveTranscriber(None, None, source, transcribe_fn=lambda x: "heard", partial_every=None, on_audio=on_audio)
    finished, events, error = collect(live, timeout=10)
    assert finished and error is None
    finals = of(events, Final)
    assert len(finals) == finals_expected
    assert live.stats.samples < len(talk) / 2 and not live.running and not source.running
    if finals:
        assert finals[0].start < 1.5 <= finals[0].end + 0.2 and finals[0].text == "heard"


def test_callbacks_receive_the_same_events_as_the_iterator(talk):
    seen = []
    source = FileAudioSource(talk, sample_rate=SR, realtime=False)
    live = LiveTranscriber(None, None, source, transcribe_fn=lambda x: f"{len(x)}", on_event=seen.append)
    assert list(live) == seen and len(of(seen, Final)) == len(PHRASES)


def test_run_works_in_the_calling_thread_with_a_callback(talk, no_leftover_threads):
    seen = []
    source = FileAudioSource(talk, sample_rate=SR, realtime=False)
    LiveTranscriber(None, None, source, transcribe_fn=lambda x: "x", on_event=seen.append).run()
    assert [type(e) for e in seen] == [Final] * len(PHRASES) and not source.running


def test_stop_from_another_thread_ends_the_stream_promptly(talk, no_leftover_threads):
    live = LiveTranscriber(None, None, FileAudioSource(talk, sample_rate=SR), transcribe_fn=lambda x: "x")
    live.start()
    time.sleep(0.3)
    assert live.stop(timeout=5), "the loop did not end after stop()"
    assert list(live) == [] and not live.source.running  # nothing was finished in 0.3 s, nothing pending


# --------------------------------------------------------------------------------------
# Camera: replayed frames
# --------------------------------------------------------------------------------------


def write_frames(folder: Path, colours) -> Path:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i, colour in enumerate(colours):
        pixels = np.clip(np.array(colour, np.float32) + rng.normal(0, 2, (24, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def test_describer_is_given_the_newest_frame_and_counts_the_stale_ones_skipped(tmp_path, no_leftover_threads):
    # 30 frames at 10 fps; the "model" takes 0.35 s a frame, so most frames must be skipped.
    folder = write_frames(tmp_path / "f", [(8 * i, 100, 100) for i in range(30)])
    source = FolderSource(folder, fps=10)
    due_at_call = []

    def slow_model(image):
        due_at_call.append(min(29, int(source.clip_time() * 10)))  # the newest frame there is right now
        time.sleep(0.35)
        return "a scene"

    live = LiveDescriber(None, None, source, every=0.0, describe_fn=slow_model)
    finished, events, error = collect(live, timeout=30)
    assert finished and error is None
    s = live.stats
    print(f"\ndescriber: {s.described} of 30 frames described, {s.dropped} stale skipped, {s.per_minute:.0f}/min")
    indices = [d.index for d in events]
    assert indices == sorted(set(indices)) and len(indices) == s.described < 30
    assert s.seen + s.dropped == 30, "every frame is either looked at or counted as skipped"
    assert s.dropped == source.dropped > 0 and [d.dropped for d in events] == sorted(d.dropped for d in events)
    # No queue: the frame described is the newest one (or the one before, just replaced) when the model starts.
    assert all(i >= due - 1 for i, due in zip(indices, due_at_call)), list(zip(indices, due_at_call))


def test_describer_describes_on_its_schedule_and_when_the_scene_changes(tmp_path):
    # 4 s at 10 fps: red for 2 s then blue; noise of a few grey levels must not count as change.
    folder = write_frames(tmp_path / "f", [(200, 30, 30)] * 20 + [(30, 30, 200)] * 20)
    source = FolderSource(folder, fps=10, realtime=False)
    live = LiveDescriber(None, None, source, every=1.5, describe_fn=lambda image: str(image.getpixel((0, 0))))
    events = list(live)
    assert [(d.index, d.reason) for d in events] == [(0, "first"), (15, "interval"), (20, "change"), (35, "interval")]
    assert [d.time for d in events] == pytest.approx([0.0, 1.5, 2.0, 3.5])
    assert live.stats.unchanged == 40 - 4 and live.stats.dropped == 0


def test_camera_that_disappears_ends_the_descriptions_with_a_clear_error(monkeypatch, no_leftover_threads):
    class DyingCapture:
        made = 0

        def isOpened(self):
            return True

        def set(self, prop, value):
            return True

        def get(self, prop):
            return 0.0

        def read(self):
            time.sleep(0.01)
            self.made += 1
            return (True, np.full((24, 32, 3), 90, np.uint8)) if self.made <= 5 else (False, None)

        def release(self):
            pass

    cv2 = types.SimpleNamespace(
        VideoCapture=lambda device: DyingCapture(), CAP_PROP_FRAME_WIDTH=3, CAP_PROP_FRAME_HEIGHT=4, CAP_PROP_FPS=5
    )
    monkeypatch.setitem(sys.modules, "cv2", cv2)
    live = LiveDescriber(None, None, CameraSource(0, read_timeout=0.3), every=0.0, describe_fn=lambda image: "x")
    finished, events, error = collect(live, timeout=10)
    assert finished and isinstance(error, SourceError) and "delivered no frame" in str(error), repr(error)
    assert events and all(isinstance(e, Description) for e in events) and not live.running


def test_camera_that_cannot_open_is_a_clear_error_from_the_describer(monkeypatch, no_leftover_threads):
    closed = types.SimpleNamespace(isOpened=lambda: False, release=lambda: None)
    monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(VideoCapture=lambda device: closed))
    live = LiveDescriber(None, None, CameraSource(2), describe_fn=lambda image: "x")
    finished, events, error = collect(live, timeout=10)
    assert finished and events == [] and isinstance(error, SourceError) and "Cannot open camera 2" in str(error)


# --------------------------------------------------------------------------------------
# The example scripts
# --------------------------------------------------------------------------------------


def run_example(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], check=False, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize("name", ["live_transcribe.py", "live_camera.py"])
def test_example_prints_its_help(name):
    result = run_example(name, "--help", timeout=60)
    assert result.returncode == 0 and "--model" in result.stdout, result.stderr


def test_live_transcribe_example_replays_a_file_on_the_tiny_checkpoint(tiny, phrases, tmp_path):
    path = tmp_path / "call.wav"
    soundfile.write(path, np.concatenate([np.zeros(SR // 2), phrases[1], np.zeros(SR)]).astype(np.float32), SR)
    result = run_example(
        "live_transcribe.py", "--model", str(tiny[0]), "--dtype", "float32", "--file", str(path),
        "--speed", "4", "--max-tokens", str(MAX_TOKENS),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and re.match(r"\[00:00\.\d\d → 00:0\d\.\d\d\] .*\(\d+\.\d\d s", lines[0]), result.stdout
    assert "1 utterances" in result.stderr and "real-time factor" in result.stderr


def example_module(name: str):
    """An example script imported as a module, to call its main() in this process (quicker)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_live_transcribe_example_says_in_one_line_that_the_file_is_missing(tiny, tmp_path, capsys):
    main = example_module("live_transcribe.py").main
    assert main(["--model", str(tiny[0]), "--file", str(tmp_path / "none.wav")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "none.wav" in err and len(err.splitlines()) == 1, err


def test_live_transcribe_example_says_in_one_line_that_there_is_no_microphone(tiny, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sounddevice", FakeSoundDevice([]))
    assert example_module("live_transcribe.py").main(["--model", str(tiny[0])]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: No audio input device was found") and len(err.splitlines()) == 1, err


def test_live_transcribe_example_lists_the_virtual_microphone(virtual_mic, capsys):
    assert example_module("live_transcribe.py").main(["--list-devices"]) == 0
    assert "pulse" in capsys.readouterr().out


def test_live_camera_example_says_in_one_line_that_the_camera_cannot_open(tiny, monkeypatch, capsys):
    closed = types.SimpleNamespace(isOpened=lambda: False, release=lambda: None)
    monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(VideoCapture=lambda device: closed))
    assert example_module("live_camera.py").main(["--model", str(tiny[0]), "--camera", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot open camera 1") and len(err.splitlines()) == 1, err


def test_live_camera_example_describes_a_replayed_folder_on_the_tiny_checkpoint(tiny, tmp_path):
    folder = write_frames(tmp_path / "f", [(200, 30, 30)] * 3)
    result = run_example(
        "live_camera.py", "--model", str(tiny[0]), "--dtype", "float32", "--folder", str(folder),
        "--max-tokens", "1", "--frames", "1", timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[00:00.00 frame 0]") and "first" in lines[0], result.stdout
    assert "1 frames described" in result.stderr
