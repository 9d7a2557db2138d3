"""Transcription: long recordings as ordered clips that cover them, the output formats, bad input."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import soundfile

from mlx_gemma3n import load
from mlx_gemma3n.processing.audio import AudioError
from mlx_gemma3n.transcription import Segment, Transcript, instruction, stitch, transcribe

SR = 16_000


@pytest.fixture(scope="module")
def loaded(tiny):
    return load(tiny[0], dtype=mx.float32)


def bursts(seconds: float, seed: int = 0) -> np.ndarray:
    """Voiced bursts (a few seconds) separated by short silences, like speech with pauses."""
    rng = np.random.default_rng(seed)
    x = np.zeros(int(seconds * SR), np.float32)
    t = 0.0
    while t < seconds:
        length = rng.uniform(2.0, 6.0)
        a, b = int(t * SR), min(int((t + length) * SR), x.size)
        tone = np.sin(2 * np.pi * rng.uniform(120, 300) * np.arange(b - a) / SR)
        x[a:b] = 0.3 * tone + 0.02 * rng.standard_normal(b - a)
        t += length + rng.uniform(0.4, 1.0)
    return x


def test_a_95_second_file_is_transcribed_as_clips_covering_all_of_it(loaded, tmp_path):
    model, tokenizer = loaded
    path = tmp_path / "talk.flac"
    soundfile.write(path, bursts(95.0), SR)
    result = transcribe(model, tokenizer, path, max_tokens_per_clip=4)
    spans = [(s.start, s.end) for s in result.segments]
    assert result.duration == pytest.approx(95.0)
    assert len(spans) >= 4 and [s.clip for s in result.segments] == list(range(len(spans)))
    assert spans[0][0] == 0.0 and spans[-1][1] == pytest.approx(95.0)
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert b0 <= a1 <= b1 and a1 - b0 <= 0.5 + 1e-6  # ordered, touching, overlap at most 0.5 s
    assert all(end - start <= 30.0 + 1e-6 for start, end in spans)
    assert all(s.text for s in result.segments)  # every clip went through the model


def test_silence_gives_an_empty_transcript_without_running_the_model(loaded):
    model, tokenizer = loaded
    result = transcribe(model, tokenizer, np.zeros(3 * SR, np.float32))
    assert result.text == "" and [s.text for s in result.segments] == [""]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: np.zeros(0, np.float32), "no audio samples"),
        (lambda p: np.array([0.1, np.nan, 0.2], np.float32), "NaN"),
        (lambda p: (p / "bad.wav").write_bytes(b"RIFF\x00\x00garbage" * 10) and p / "bad.wav", "corrupt or not an audio file"),
        (lambda p: p, "directory"),
    ],
    ids=["empty", "nan", "corrupt", "directory"],
)
def test_bad_audio_is_a_clear_error(loaded, tmp_path, make, message):
    model, tokenizer = loaded
    with pytest.raises(AudioError, match=message) as e:
        transcribe(model, tokenizer, make(tmp_path))
    assert "\n" not in str(e.value)


def test_instructions_name_the_languages():
    assert instruction() == "Transcribe the following speech segment:"
    assert instruction("English") == "Transcribe the following speech segment in English:"
    assert instruction("English", "Spanish") == "Translate the following English speech segment into Spanish:"
    assert instruction(prompt="Okonjo-Iweala, WTO. ") == (
        "Transcribe the following speech segment:\n(It follows this text; keep its spelling of names and terms: "
        "Okonjo-Iweala, WTO.)"
    )
    assert instruction(prompt="  ") == instruction()


def test_the_prompt_is_asked_with_every_clip(loaded, monkeypatch):
    import mlx_gemma3n.transcription as transcription

    asked, generate = [], transcription.stream_generate

    def spy(model, tokenizer, prompt, **kw):
        asked.append(prompt)
        return generate(model, tokenizer, prompt, **kw)

    monkeypatch.setattr(transcription, "stream_generate", spy)
    model, tokenizer = loaded
    result = transcribe(model, tokenizer, bursts(45.0), language="English", prompt="Okonjo-Iweala",
                        max_tokens_per_clip=2)
    assert len(result.segments) >= 2
    assert asked == [instruction("English", prompt="Okonjo-Iweala")] * len(result.segments)


def test_overlapping_words_are_stitched_once():
    assert stitch("the cat sat on the", "On the mat.") == "mat."
    assert stitch("hello there", "general kenobi") == "general kenobi"


def test_srt_and_json_formats():
    t = Transcript("a b", [Segment(0.0, 29.5, "a", 0), Segment(29.0, 61.25, "b", 1)], 61.25)
    assert t.to_srt() == "1\n00:00:00,000 --> 00:00:29,500\na\n\n2\n00:00:29,000 --> 00:01:01,250\nb\n\n"
    assert json.loads(t.to_json())["segments"][1] == {"start": 29.0, "end": 61.25, "text": "b", "clip": 1}


def test_transcribe_entry_point(tiny, tmp_path):
    path = tmp_path / "short.wav"
    soundfile.write(path, bursts(4.0, seed=1), SR)
    out = subprocess.run(
        [sys.executable, "-m", "mlx_gemma3n.transcribe", "--model", str(tiny[0]), str(path), "--format", "json",
         "--max-tokens", "3", "--dtype", "float32"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["duration"] == pytest.approx(4.0)
    assert "real-time factor" in out.stderr
