"""Everyday mistakes outside the model end in one sentence: audio too short to hear, the package run as a
command, conversions onto paths that cannot take them, a Hub that does not answer."""

import numpy as np
import pytest

import mlx_gemma3n
from mlx_gemma3n.errors import InputError
from mlx_gemma3n.processing.audio import SAMPLE_RATE, LogMelConfig, log_mel, min_samples


@pytest.fixture(scope="module")
def loaded(tiny):
    import mlx.core as mx

    return mlx_gemma3n.load(tiny[0], dtype=mx.float32)


def test_the_shortest_audio_is_the_shortest_that_gives_a_frame():
    n = min_samples()
    assert log_mel(np.ones(n, np.float32))[0].shape[0] == 1
    assert log_mel(np.ones(n - 1, np.float32))[0].shape[0] == 0
    unpadded = min_samples(LogMelConfig(), pad_to_multiple_of=None)
    assert unpadded == LogMelConfig().frame_length + 1  # one frame plus the pre-emphasis' extra sample


@pytest.mark.parametrize("samples", [300, min_samples() - 1], ids=["19ms", "one-short"])
def test_too_short_audio_is_one_sentence(loaded, samples):
    model, tokenizer = loaded
    with pytest.raises(InputError) as e:
        mlx_gemma3n.generate(model, tokenizer, "x", audio=[np.zeros(samples, np.float32)], max_tokens=1)
    seconds = f"{samples / SAMPLE_RATE:.3f}"
    assert str(e.value) == f"The recording is {seconds} s long; Gemma 3n needs at least 0.033 s of audio."


def test_empty_audio_is_one_sentence(loaded):
    model, tokenizer = loaded
    with pytest.raises(InputError, match="contains no audio samples") as e:
        mlx_gemma3n.generate(model, tokenizer, "x", audio=[np.zeros(0, np.float32)], max_tokens=1)
    assert "\n" not in str(e.value)


def test_the_shortest_audio_is_heard(loaded):
    model, tokenizer = loaded
    rng = np.random.default_rng(0)
    reply = mlx_gemma3n.generate(
        model, tokenizer, "x", audio=[rng.uniform(-0.5, 0.5, min_samples()).astype(np.float32)], max_tokens=1
    )
    assert isinstance(reply, str)


def test_transcribing_a_too_short_recording_is_an_error_not_an_empty_text(loaded):
    from mlx_gemma3n.transcribe import transcribe

    model, tokenizer = loaded
    with pytest.raises(InputError, match="needs at least 0.033 s of audio"):
        transcribe(model, tokenizer, np.zeros(320, np.float32))
