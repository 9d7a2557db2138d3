"""The audio front-end: decoding, resampling, and log-mel features equal to transformers'."""

import io
import shutil
import struct
import subprocess
import warnings

import numpy as np
import pytest

from mlx_gemma3n.processing.audio import (
    MAX_SAMPLES,
    SAMPLE_RATE,
    AudioError,
    LogMelConfig,
    StreamingLogMel,
    load_audio,
    log_mel,
    log_mel_batch,
)

sf = pytest.importorskip("soundfile")
feature_extraction = pytest.importorskip("transformers.models.gemma3n.feature_extraction_gemma3n")

TOL = 1e-4
HOP = 160


@pytest.fixture(scope="module")
def reference():
    return feature_extraction.Gemma3nAudioFeatureExtractor()


def reference_features(extractor, samples):
    out = extractor(samples)  # the default call: one clip, default padding and truncation
    return out["input_features"][0], out["input_features_mask"][0]


def assert_close(ours, theirs, tol=TOL, what="features"):
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != reference {theirs.shape}"
    worst = float(np.max(np.abs(ours.astype(np.float64) - theirs))) if ours.size else 0.0
    assert worst <= tol, f"{what}: max |Δ| = {worst:.3g} > {tol:g}"


def assert_matches_reference(extractor, samples):
    feats, mask = log_mel(samples)
    ref_feats, ref_mask = reference_features(extractor, samples)
    assert feats.dtype == np.float32 and mask.dtype == np.bool_
    assert_close(feats, ref_feats)
    np.testing.assert_array_equal(mask, ref_mask)
    return feats


def noise(n, scale=0.1, seed=0):
    return (scale * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def sine(freq, seconds, rate, amplitude=0.5):
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_frequency(x, rate):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spectrum) * rate / len(x)


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    text = "Gemma listens to this sentence, then writes it down word for word."
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


# --------------------------------------------------------------------------------------
# Parity with Gemma3nAudioFeatureExtractor
# --------------------------------------------------------------------------------------


def test_speech_features_match_reference(reference, speech_wav):
    samples = load_audio(speech_wav)  # espeak writes 22.05 kHz: this also goes through the resampler
    assert 2.0 < len(samples) / SAMPLE_RATE < 8.0
    feats = assert_matches_reference(reference, samples)
    assert feats.shape[1] == 128
    assert feats.max() > np.log(1e-5) + 5  # really speech, not the log floor


@pytest.mark.parametrize("n", [400, 513, 640, 1000, 16000, 16001, 97 * HOP + 13, 24_037])
def test_noise_features_match_reference_at_any_length(reference, n):
    assert_matches_reference(reference, noise(n, seed=n))


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0])
def test_noise_features_match_reference_at_any_loudness(reference, scale):
    assert_matches_reference(reference, noise(8000, scale=scale))


def test_float64_and_int16_input_match_reference_on_the_same_float32_signal(reference):
    x = noise(5000)
    assert_matches_reference(reference, x.astype(np.float64))
    pcm = (x * 32768).astype(np.int16)
    feats, _ = log_mel(pcm)
    ref_feats, _ = reference_features(reference, pcm.astype(np.float32) / 32768)
    assert_close(feats, ref_feats)


def test_silence_gives_the_log_floor(reference):
    feats = assert_matches_reference(reference, np.zeros(16000, np.float32))
    np.testing.assert_allclose(feats, np.log(1e-5), rtol=0, atol=1e-6)


def test_short_clip_gives_zero_frames_like_reference(reference):
    feats, mask = log_mel(noise(300))  # padded to 384 samples: less than one 513-sample frame
    assert feats.shape == (0, 128) and mask.shape == (0,)


def test_clip_over_30s_is_cut_like_reference_with_a_warning(reference):
    x = noise(MAX_SAMPLES + 5 * HOP + 3)
    with pytest.warns(UserWarning, match="max_length=None"):
        feats, mask = log_mel(x)
    ref_feats, ref_mask = reference_features(reference, x)
    assert_close(feats, ref_feats)
    np.testing.assert_array_equal(mask, ref_mask)


def test_max_length_none_keeps_the_whole_clip():
    x = noise(MAX_SAMPLES + 20 * HOP)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feats, mask = log_mel(x, max_length=None)
    assert feats.shape[0] == (len(x) - 513) // HOP + 1 and mask.all()


def test_batch_features_and_masks_match_reference(reference):
    clips = [noise(3000, seed=1), noise(16000, seed=2), noise(9001, seed=3)]
    feats, mask = log_mel_batch(clips)
    ref = reference(clips)
    assert_close(feats, np.stack(ref["input_features"]))
    np.testing.assert_array_equal(mask, np.stack(ref["input_features_mask"]))
    assert not mask[0].all() and mask[1].all()  # the short clip's padding frames are masked


@pytest.mark.parametrize(
    "settings",
    [
        dict(preemphasis_htk_flavor=False, min_frequency=60.0, max_frequency=7000.0, input_scale_factor=1.7),
        dict(preemphasis=0.0, mel_floor=1e-3, feature_size=80, fft_overdrive=False),
    ],
    ids=["plain-preemphasis", "no-preemphasis"],
)
def test_non_default_settings_match_reference(settings):
    rng = np.random.default_rng(7)
    n_mels = settings.get("feature_size", 128)
    settings = dict(
        settings,
        per_bin_mean=rng.normal(size=n_mels).tolist(),
        per_bin_stddev=rng.uniform(0.5, 2.0, size=n_mels).tolist(),
    )
    x = noise(7001)
    feats, mask = log_mel(x, config=LogMelConfig.from_dict(settings))
    ref = feature_extraction.Gemma3nAudioFeatureExtractor(**settings)(x)
    assert_close(feats, ref["input_features"][0])
    np.testing.assert_array_equal(mask, ref["input_features_mask"][0])


# --------------------------------------------------------------------------------------
# Resampling and channel mixing
# --------------------------------------------------------------------------------------


def test_stereo_44k_is_mixed_resampled_and_matches_reference(reference):
    rate = 44_100
    common = sine(440, 1.5, rate, 0.3) + noise(int(1.5 * rate), 0.05)
    side = noise(len(common), 0.2, seed=9)
    stereo = np.stack([common + side, common - side], axis=1)  # the mean of the channels is `common`
    samples = load_audio(stereo, sample_rate=rate)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert len(samples) == round(len(common) * SAMPLE_RATE / rate)
    np.testing.assert_allclose(samples, load_audio(common, sample_rate=rate), atol=1e-6)
    assert_matches_reference(reference, samples)


@pytest.mark.parametrize("rate", [8000, 22_050, 44_100, 48_000])
def test_resampling_keeps_a_sine_frequency_and_amplitude(rate):
    samples = load_audio(sine(1000, 2.0, rate, amplitude=0.5), sample_rate=rate)
    assert abs(len(samples) - 2 * SAMPLE_RATE) <= 1
    middle = samples[1000:-1000]  # away from the edges, where the filter sees silence
    assert abs(dominant_frequency(middle, SAMPLE_RATE) - 1000) < 1.0
    ideal = sine(1000, 2.0, SAMPLE_RATE, amplitude=0.5)[1000:-1000]
    worst = np.max(np.abs(middle - ideal[: len(middle)]))
    assert worst < 1e-3, f"resampled sine differs from the ideal one by {worst:.3g}"


def test_integer_pcm_arrays_are_scaled_to_unit_range():
    pcm = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    np.testing.assert_allclose(load_audio(pcm, sample_rate=SAMPLE_RATE), [0, 0.5, -1, 32767 / 32768])


# --------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------


def feed_in_chunks(stream, x, sizes):
    out, i = [], 0
    for k in sizes:
        out.append(stream.feed(x[i : i + k]))
        i += k
    assert i >= len(x)
    out.append(stream.flush())
    return np.concatenate(out)


def test_stream_fed_in_uneven_chunks_equals_whole_signal_features(reference, speech_wav):
    x = load_audio(speech_wav)
    rng = np.random.default_rng(3)
    sizes = [1, 0, 512, 1, 159, 161] + list(rng.integers(0, 3000, size=len(x) // 1000))
    sizes.append(len(x) - sum(sizes))
    streamed = feed_in_chunks(StreamingLogMel(), x, sizes)
    assert_close(streamed, log_mel(x)[0], tol=1e-6, what="streamed features")
    assert_close(streamed, reference_features(reference, x)[0], what="streamed vs reference")


def test_stream_fed_frame_aligned_chunks_returns_one_frame_per_hop():
    x = noise(513 + 20 * HOP)
    whole = log_mel(x)[0]
    stream = StreamingLogMel()
    assert stream.feed(x[:512]).shape == (0, 128)
    first = stream.feed(x[512:513])
    assert_close(first, whole[:1])
    for i in range(20):
        frame = stream.feed(x[513 + i * HOP : 513 + (i + 1) * HOP])
        assert_close(frame, whole[i + 1 : i + 2], tol=1e-6)
    assert_close(stream.flush(), whole[21:], tol=1e-6)  # the frames that zero padding completes
    assert stream.frames_emitted == len(whole)


def test_stream_keeps_only_the_unfinished_frame():
    stream = StreamingLogMel()
    for _ in range(50):
        stream.feed(noise(1234))
    assert len(stream._pending) < 513


def test_stream_at_48k_stereo_int16_equals_whole_signal_features():
    rate = 48_000
    x = np.stack([sine(300, 1.0, rate, 0.4), noise(rate, 0.1)], axis=1)
    pcm = np.round(x * 32767).astype(np.int16)
    rng = np.random.default_rng(5)
    sizes = list(rng.integers(1, 4000, size=30))
    sizes.append(len(pcm) - sum(sizes))
    streamed = feed_in_chunks(StreamingLogMel(sample_rate=rate), pcm, sizes)
    whole = log_mel(load_audio(pcm, sample_rate=rate))[0]
    assert_close(streamed, whole, what="48 kHz streamed features")


def test_flushed_stream_refuses_samples_until_reset():
    stream = StreamingLogMel()
    stream.feed(noise(2000))
    stream.flush()
    with pytest.raises(AudioError, match="call reset"):
        stream.feed(noise(10))
    stream.reset()
    assert stream.feed(noise(513)).shape == (1, 128)


# --------------------------------------------------------------------------------------
# Decoding files
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ext, fmt, subtype, lossless",
    [
        ("wav", "WAV", "PCM_16", True),
        ("flac", "FLAC", "PCM_16", True),
        ("ogg", "OGG", "VORBIS", False),
        ("mp3", "MP3", "MPEG_LAYER_III", False),
    ],
)
def test_decodes_common_formats_with_duration_and_content(tmp_path, ext, fmt, subtype, lossless):
    rate = 44_100
    x = sine(440, 1.0, rate, amplitude=0.4)
    path = tmp_path / f"tone.{ext}"
    sf.write(path, np.stack([x, x], axis=1), rate, format=fmt, subtype=subtype)
    samples = load_audio(path)
    assert abs(len(samples) / SAMPLE_RATE - 1.0) < 0.06  # MP3 may add a frame of encoder delay
    assert abs(dominant_frequency(samples, SAMPLE_RATE) - 440) < 2.0
    rms = np.sqrt(np.mean(samples[2000:-2000] ** 2))
    assert abs(rms - 0.4 / np.sqrt(2)) < 0.02
    if lossless:
        expected = load_audio(x, sample_rate=rate)
        np.testing.assert_allclose(samples, expected, atol=2e-4)


@pytest.mark.skipif(shutil.which("sox") is None, reason="sox is not installed")
@pytest.mark.parametrize("ext", ["flac", "ogg"])
def test_decodes_files_written_by_sox(tmp_path, ext):
    path = tmp_path / f"sox.{ext}"
    subprocess.run(
        ["sox", "-n", "-r", "48000", "-c", "2", str(path), "synth", "0.5", "sine", "600", "vol", "0.5"],
        check=True,
        capture_output=True,
    )
    samples = load_audio(path)
    assert abs(len(samples) - SAMPLE_RATE // 2) < 200
    assert abs(dominant_frequency(samples, SAMPLE_RATE) - 600) < 3.0


def test_path_bytes_and_file_object_give_the_same_samples(tmp_path):
    path = tmp_path / "a.flac"
    sf.write(path, noise(12_345), 22_050)
    from_path = load_audio(path)
    np.testing.assert_array_equal(load_audio(str(path)), from_path)
    np.testing.assert_array_equal(load_audio(path.read_bytes()), from_path)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(load_audio(f), from_path)


def test_silent_file_is_valid_input(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(8000, np.float32), SAMPLE_RATE)
    samples = load_audio(path)
    assert len(samples) == 8000 and not samples.any()
    feats, mask = log_mel(samples)
    assert feats.shape == (48, 128) and mask.all()


# --------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------


def wav_header_with_codec(tag):
    pcm = noise(800).astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", tag, 1, 16000, 32000, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
    return b"RIFF" + struct.pack("<I", len(body)) + body


def assert_one_clear_sentence(err, *phrases):
    msg = str(err.value)
    for phrase in phrases:
        assert phrase in msg, f"{phrase!r} not in {msg!r}"
    assert msg.endswith(".") and "\n" not in msg and ";" in msg  # the problem; the fix.


def test_empty_array_is_refused():
    with pytest.raises(AudioError) as err:
        load_audio(np.zeros(0, np.float32), sample_rate=SAMPLE_RATE)
    assert_one_clear_sentence(err, "contains no audio samples")


def test_empty_samples_are_refused_by_log_mel():
    with pytest.raises(AudioError) as err:
        log_mel(np.zeros(0, np.float32))
    assert_one_clear_sentence(err, "contains no samples")


def test_file_without_samples_is_refused(tmp_path):
    path = tmp_path / "nothing.wav"
    sf.write(path, np.zeros(0, np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert_one_clear_sentence(err, "nothing.wav", "contains no audio samples")


def test_zero_byte_file_is_refused(tmp_path):
    path = tmp_path / "zero.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert_one_clear_sentence(err, "is empty (0 bytes)")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_refused(bad):
    x = noise(1000)
    x[10] = bad
    for call in (
        lambda: load_audio(x, sample_rate=SAMPLE_RATE),
        lambda: log_mel(x),
        lambda: StreamingLogMel().feed(x),
    ):
        with pytest.raises(AudioError) as err:
            call()
        assert_one_clear_sentence(err, "1 NaN or infinite sample", "np.nan_to_num")


def test_non_finite_samples_in_a_float_file_are_refused(tmp_path):
    path = tmp_path / "nan.wav"
    x = noise(1000)
    x[:3] = np.nan
    sf.write(path, x, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert_one_clear_sentence(err, "nan.wav", "3 NaN or infinite samples")


def test_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "garbage.wav"
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert_one_clear_sentence(err, "garbage.wav", "could not be decoded", "corrupt", "re-export")


def test_truncated_wav_header_is_refused(tmp_path):
    buf = io.BytesIO()
    sf.write(buf, noise(1000), SAMPLE_RATE, format="WAV")
    with pytest.raises(AudioError) as err:
        load_audio(buf.getvalue()[:30])
    assert_one_clear_sentence(err, "audio bytes could not be decoded", "corrupt")


def test_directory_is_refused(tmp_path):
    with pytest.raises(AudioError) as err:
        load_audio(tmp_path)
    assert_one_clear_sentence(err, "is a directory", "pass the path of an audio file")


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(AudioError) as err:
        load_audio(tmp_path / "nope.mp3")
    assert_one_clear_sentence(err, "not found", "nope.mp3", "check the path")


def test_unsupported_container_is_refused(tmp_path):
    path = tmp_path / "voice.m4a"
    path.write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00" + bytes(600))
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert_one_clear_sentence(err, "MP4/M4A", "cannot be decoded here", "convert it to WAV, FLAC, OGG or MP3")


def test_unsupported_codec_is_refused():
    with pytest.raises(AudioError) as err:
        load_audio(wav_header_with_codec(0x0161))
    assert_one_clear_sentence(err, "WAV with WMA codec", "cannot be decoded here", "pcm_s16le")


def test_array_without_sample_rate_is_refused():
    with pytest.raises(AudioError) as err:
        load_audio(noise(100))
    assert_one_clear_sentence(err, "carries no sample rate", "sample_rate=")


def test_channels_first_array_is_refused():
    with pytest.raises(AudioError) as err:
        load_audio(noise(2000).reshape(2, 1000), sample_rate=SAMPLE_RATE)
    assert_one_clear_sentence(err, "(channels, samples)", "array.T")
