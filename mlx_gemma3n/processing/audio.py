"""Audio front-end: decode any common audio file to 16 kHz mono, then log-mel features.

The features are those of transformers' `Gemma3nAudioFeatureExtractor` (the USM front-end),
bit for bit where numpy allows:

    frames   513 samples every 160 (32 ms + 1 sample, hop 10 ms); the extra sample feeds
             the pre-emphasis, whose HTK flavour scales the first sample by (1 - 0.97)
    window   periodic Hann of 512, computed in float32 like the reference
    spectrum |rfft| of size 1024 (next power of two, doubled by "FFT overdrive")
    mel      128 triangular HTK-mel filters, 125..7600 Hz, unnormalised
    log      log(max(mel, 1e-5))

and, for one clip, the reference's default call (`padding="longest"`, `max_length=480_000`,
`truncation=True`, `pad_to_multiple_of=128`) amounts to: cut the clip at 30 s, pad it with
zeros to a multiple of 128 samples, frame it. The mask marks frames whose first sample lies
inside the clip; for a single clip that is every frame, and only batches (`log_mel_batch`)
contain masked frames. Cutting at 30 s is the reference default, so `log_mel` keeps it,
but it warns when it cuts; pass `max_length=None` to keep everything.

Decoding uses libsndfile (via `soundfile`: WAV, FLAC, OGG Vorbis/Opus, MP3, AIFF, ...) and
resampling uses libsoxr (via `soxr`).
"""

from __future__ import annotations

import functools
import io
import math
import os
import struct
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..errors import InputError

SAMPLE_RATE = 16000
MAX_SAMPLES = 480_000  # the reference's default max_length: 30 s at 16 kHz
PAD_TO_MULTIPLE_OF = 128  # the reference's default pad_to_multiple_of

_FORMATS_WE_READ = "WAV, FLAC, OGG or MP3"


class AudioError(InputError):
    """Audio that cannot be used, with a message that says what to do about it."""


# --------------------------------------------------------------------------------------
# Feature-extractor settings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogMelConfig:
    """The settings of `Gemma3nAudioFeatureExtractor`, with its defaults.

    A checkpoint's `preprocessor_config.json` may override them: `LogMelConfig.from_dict`.
    """

    feature_size: int = 128
    sampling_rate: int = SAMPLE_RATE
    padding_value: float = 0.0
    frame_length_ms: float = 32.0
    hop_length_ms: float = 10.0
    min_frequency: float = 125.0
    max_frequency: float = 7600.0
    preemphasis: float = 0.97
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = True
    dither: float = 0.0
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-5
    per_bin_mean: tuple[float, ...] | None = None
    per_bin_stddev: tuple[float, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "LogMelConfig":
        """Read the known keys of a preprocessor config (others, e.g. for images, are ignored)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("per_bin_mean", "per_bin_stddev"):
            if kw.get(k) is not None:
                kw[k] = tuple(float(v) for v in kw[k])
        return cls(**kw)

    @property
    def frame_length(self) -> int:
        return int(round(self.sampling_rate * self.frame_length_ms / 1000.0))

    @property
    def hop_length(self) -> int:
        return int(round(self.sampling_rate * self.hop_length_ms / 1000.0))

    @property
    def fft_length(self) -> int:
        n = 2 ** math.ceil(math.log2(self.frame_length))
        return 2 * n if self.fft_overdrive else n


def mel_filterbank(
    n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int, fft_length: int
) -> np.ndarray:
    """(n_freqs, n_mels) triangular filters, evenly spaced on the HTK mel scale, peak 1.

    Dtypes follow the reference: bin frequencies in float32, mel points in float64.
    """
    bin_hz = np.arange(n_freqs, dtype=np.float32) * (sample_rate / fft_length)
    hz_to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    mels = np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    edges_hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    widths = np.diff(edges_hz)
    offsets = edges_hz[None, :] - bin_hz[:, None]  # (n_freqs, n_mels + 2)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


class _Frontend:
    """Window and filterbank for one config, built once."""

    def __init__(self, cfg: LogMelConfig):
        self.cfg = cfg
        n = np.arange(cfg.frame_length, dtype=np.float32)
        # Periodic Hann (denominator N, not N - 1), evaluated in float32 as the reference does.
        self.window = (0.5 * (1 - np.cos(2 * np.pi * n / cfg.frame_length))).astype(np.float32)
        self.filters = mel_filterbank(
            cfg.fft_length // 2 + 1,
            cfg.min_frequency,
            cfg.max_frequency,
            cfg.feature_size,
            cfg.sampling_rate,
            cfg.fft_length,
        )
        shape = (1, cfg.feature_size)
        self.mean = None if cfg.per_bin_mean is None else np.array(cfg.per_bin_mean).reshape(shape)
        self.std = None if cfg.per_bin_stddev is None else np.array(cfg.per_bin_stddev).reshape(shape)
        # Each frame reads one sample more than its length: the pre-emphasis needs a predecessor.
        self.span = cfg.frame_length + 1
        self.hop = cfg.hop_length
        self.rng = np.random.default_rng() if cfg.dither > 0 else None

    def num_frames(self, n_samples: int) -> int:
        return max(0, (n_samples - self.span) // self.hop + 1)

    def __call__(self, x: np.ndarray, block: int = 2048) -> np.ndarray:
        """Log-mel of every complete frame of the float32 signal x: (frames, feature_size)."""
        n = self.num_frames(len(x))
        out = np.empty((n, self.cfg.feature_size), dtype=np.float32)
        if n == 0:
            return out
        all_frames = np.lib.stride_tricks.sliding_window_view(x, self.span)[:: self.hop][:n]
        # Blocks bound the memory of long clips; the maths is per frame, so blocks don't matter.
        for start in range(0, n, block):
            out[start : start + block] = self._log_mel(all_frames[start : start + block])
        return out

    def _log_mel(self, frames: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        if self.rng is not None:
            frames = frames + cfg.dither * self.rng.standard_normal(frames.shape).astype(frames.dtype)
        if cfg.input_scale_factor != 1.0:
            frames = frames * cfg.input_scale_factor
        p = cfg.preemphasis
        if p > 0.0 and cfg.preemphasis_htk_flavor:
            # HTK: the first sample has no predecessor in the frame, so it is scaled instead.
            frames = np.concatenate(
                [frames[:, :1] * (1.0 - p), frames[:, 1:-1] - p * frames[:, :-2]], axis=-1
            )
        elif p > 0.0:
            frames = frames[:, 1:] - p * frames[:, :-1]
        else:
            frames = frames[:, :-1]
        magnitude = np.abs(np.fft.rfft(frames * self.window, n=cfg.fft_length, axis=-1))
        logmel = np.log(np.maximum(magnitude @ self.filters, cfg.mel_floor))
        if self.mean is not None:
            logmel = logmel - self.mean
        if self.std is not None:
            logmel = logmel / self.std
        return logmel


@functools.lru_cache(maxsize=8)
def _frontend(cfg: LogMelConfig) -> _Frontend:
    return _Frontend(cfg)


# --------------------------------------------------------------------------------------
# Log-mel of whole clips
# --------------------------------------------------------------------------------------


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _check_samples(samples, what: str = "The audio") -> np.ndarray:
    """A 1-D float32 view of 16 kHz samples, or a clear error."""
    x = np.asarray(samples)
    if x.ndim != 1:
        raise AudioError(
            f"{what} has shape {x.shape} but log-mel needs a 1-D mono signal; "
            "pass it through load_audio(array, sample_rate) first to mix it down."
        )
    if x.dtype.kind not in "fiu":
        raise AudioError(f"{what} has dtype {x.dtype}; pass real-valued float samples in [-1, 1].")
    if x.dtype.kind in "iu":
        x = _int_to_float(x)
    x = x.astype(np.float32, copy=False)
    _check_finite(x, what)
    return x


def _cut(x: np.ndarray, max_length: int | None, multiple: int | None, stacklevel: int) -> np.ndarray:
    # The reference rounds max_length up to the padding multiple before cutting.
    if max_length is None:
        return x
    limit = _round_up(max_length, multiple)
    if len(x) > limit:
        warnings.warn(
            f"Audio of {len(x) / SAMPLE_RATE:.1f} s was cut to {limit / SAMPLE_RATE:.1f} s, as the "
            "reference feature extractor does; pass max_length=None (or split the audio) to keep all of it.",
            stacklevel=stacklevel + 1,
        )
        return x[:limit]
    return x


def log_mel(
    samples: np.ndarray,
    *,
    max_length: int | None = MAX_SAMPLES,
    pad_to_multiple_of: int | None = PAD_TO_MULTIPLE_OF,
    config: LogMelConfig = LogMelConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel features of one 16 kHz mono clip: ((frames, 128) float32, (frames,) bool mask).

    Equals `Gemma3nAudioFeatureExtractor()(samples)`: the clip is cut to `max_length` samples
    (30 s; with a warning; None keeps everything), padded with zeros to a multiple of
    `pad_to_multiple_of` (128), then framed. Clips under ~25 ms give zero frames, as there.
    """
    feats, mask = _log_mel_batch([samples], max_length, pad_to_multiple_of, config, stacklevel=3)
    return feats[0], mask[0]


def log_mel_batch(
    clips: list[np.ndarray],
    *,
    max_length: int | None = MAX_SAMPLES,
    pad_to_multiple_of: int | None = PAD_TO_MULTIPLE_OF,
    config: LogMelConfig = LogMelConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel of several clips padded to a common length: ((B, T, 128), (B, T) mask).

    As the reference's batched call: each clip is cut to `max_length`, all are padded with
    zeros to the longest (rounded up to `pad_to_multiple_of`), and a frame is valid when its
    first sample lies inside its clip.
    """
    return _log_mel_batch(clips, max_length, pad_to_multiple_of, config, stacklevel=3)


def _log_mel_batch(clips, max_length, pad_to_multiple_of, config, stacklevel):
    if len(clips) == 0:
        raise AudioError("log_mel_batch got no clips; pass a list of at least one 1-D signal.")
    fe = _frontend(config)
    xs = [_cut(_check_samples(c), max_length, pad_to_multiple_of, stacklevel + 1) for c in clips]
    for x in xs:
        if len(x) == 0:
            raise AudioError("The audio contains no samples; pass a recording at least one sample long.")
    padded_len = _round_up(max(len(x) for x in xs), pad_to_multiple_of)
    n_frames = fe.num_frames(padded_len)
    feats = np.empty((len(xs), n_frames, config.feature_size), dtype=np.float32)
    mask = np.empty((len(xs), n_frames), dtype=bool)
    for i, x in enumerate(xs):
        feats[i] = fe(np.pad(x, (0, padded_len - len(x)), constant_values=config.padding_value))
        mask[i] = np.arange(n_frames) * fe.hop < len(x)
    return feats, mask


# --------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------


class StreamingLogMel:
    """Log-mel features of an endless signal, fed in chunks of any size.

    `feed(chunk)` returns the frames completed by that chunk; `flush()` ends the stream,
    padding the tail with zeros to a multiple of `pad_to_multiple_of` as `log_mel` does, and
    returns the last frames. All frames together equal `log_mel(whole, max_length=None)[0]`,
    whatever the chunking. Chunks may be 1-D or (n, channels), float or integer PCM; at a
    `sample_rate` other than 16 kHz they are resampled on the fly (libsoxr's streaming
    resampler, which gives what resampling the whole signal gives). Not thread-safe:
    feed from one thread. Memory stays bounded: only the samples of unfinished frames are kept.
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        *,
        pad_to_multiple_of: int | None = PAD_TO_MULTIPLE_OF,
        config: LogMelConfig = LogMelConfig(),
    ):
        self.sample_rate = _check_rate(sample_rate)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.config = config
        self._fe = _frontend(config)
        self.reset()

    def reset(self) -> None:
        """Forget everything fed so far and start a new stream."""
        self._pending = np.zeros(0, dtype=np.float32)  # samples from the next frame's start on
        self.samples_seen = 0  # 16 kHz samples received
        self.frames_emitted = 0
        self.finished = False
        self._resampler = None
        if self.sample_rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(
                self.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ"
            )

    def feed(self, chunk: np.ndarray) -> np.ndarray:
        """Add samples; return the (n, 128) float32 frames they complete (n may be 0)."""
        if self.finished:
            raise AudioError("This stream was flushed; call reset() before feeding it again.")
        x = _to_mono_float(np.asarray(chunk), "The audio chunk")
        _check_finite(x, "The audio chunk")
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x, last=False)
        return self._push(x)

    def flush(self) -> np.ndarray:
        """End the stream: pad its tail as `log_mel` does and return the last frames."""
        if self.finished:
            return np.zeros((0, self.config.feature_size), dtype=np.float32)
        self.finished = True
        # The resampler holds back a filter's length of output until told the input ended.
        held = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True) if self._resampler else None
        last = [self._push(held)] if held is not None else []
        n_pad = _round_up(self.samples_seen, self.pad_to_multiple_of) - self.samples_seen
        pad = np.full(n_pad, self.config.padding_value, dtype=np.float32)
        last.append(self._emit(np.concatenate([self._pending, pad])))
        return np.concatenate(last)

    def _push(self, x: np.ndarray) -> np.ndarray:
        self.samples_seen += len(x)
        self._pending = np.concatenate([self._pending, x.astype(np.float32, copy=False)])
        return self._emit(self._pending)

    def _emit(self, buf: np.ndarray) -> np.ndarray:
        frames = self._fe(buf)
        self.frames_emitted += len(frames)
        self._pending = buf[len(frames) * self._fe.hop :].copy()
        return frames


# --------------------------------------------------------------------------------------
# Decoding and resampling
# --------------------------------------------------------------------------------------


def _check_rate(sample_rate) -> int:
    is_number = isinstance(sample_rate, (int, np.integer, float)) and not isinstance(sample_rate, bool)
    if not (is_number and sample_rate > 0 and float(sample_rate).is_integer()):
        raise AudioError(
            f"sample_rate must be a positive whole number of Hz, got {sample_rate!r}; pass e.g. 16000."
        )
    return int(sample_rate)


def _int_to_float(x: np.ndarray) -> np.ndarray:
    """Integer PCM to float32 in [-1, 1), with the usual full-scale conventions."""
    info = np.iinfo(x.dtype)
    if x.dtype.kind == "u":  # offset binary, e.g. 8-bit WAV
        mid = (int(info.max) + 1) // 2
        return ((x.astype(np.float64) - mid) / mid).astype(np.float32)
    return (x.astype(np.float64) / (int(info.max) + 1)).astype(np.float32)


def _check_finite(x: np.ndarray, what: str) -> None:
    bad = np.count_nonzero(~np.isfinite(x))
    if bad:
        raise AudioError(
            f"{what} contains {bad} NaN or infinite sample{'s' if bad > 1 else ''}; fix the source "
            "that produced it (or clean it with np.nan_to_num) before passing it."
        )


def _to_mono_float(x: np.ndarray, what: str) -> np.ndarray:
    """(n,) or (n, channels), float or integer PCM -> (n,) float32, channels averaged."""
    if x.dtype.kind not in "fiu":
        raise AudioError(
            f"{what} has dtype {x.dtype}; pass real-valued float samples in [-1, 1] or integer PCM."
        )
    if x.ndim == 2 and x.shape[1] > 32 and x.shape[0] <= 32:
        raise AudioError(
            f"{what} has shape {x.shape}, which looks like (channels, samples); "
            "pass it as (samples, channels), e.g. array.T."
        )
    if x.ndim not in (1, 2):
        raise AudioError(f"{what} has shape {x.shape}; pass (samples,) or (samples, channels).")
    if x.dtype.kind in "iu":
        x = _int_to_float(x)
    x = x.astype(np.float32, copy=False)
    return x.mean(axis=1, dtype=np.float32) if x.ndim == 2 else x


def _resample(x: np.ndarray, sample_rate: int) -> np.ndarray:
    if sample_rate == SAMPLE_RATE:
        return x
    import soxr

    return soxr.resample(x, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)


# Containers libsndfile does not read, recognised by their first bytes.
def _unsupported_container(head: bytes) -> str | None:
    if head[4:8] == b"ftyp":
        return "MP4/M4A (AAC or ALAC)"
    if head.startswith(b"\x1aE\xdf\xa3"):
        return "Matroska/WebM"
    if head.startswith(b"0&\xb2u\x8ef\xcf\x11"):
        return "ASF/WMA"
    if head.startswith(b"#!AMR"):
        return "AMR"
    if head.startswith(b".ra\xfd") or head.startswith(b".RMF"):
        return "RealAudio"
    if len(head) > 1 and head[0] == 0xFF and (head[1] & 0xF6) == 0xF0:  # ADTS sync, layer 0
        return "AAC (ADTS)"
    return None


# WAV format tags libsndfile decodes (PCM, MS/IMA ADPCM, float, A/mu-law, GSM, G.72x, MPEG, extensible).
_WAV_TAGS_READ = {0x0001, 0x0002, 0x0003, 0x0006, 0x0007, 0x0011, 0x0031, 0x0040, 0x0050, 0x0055, 0xFFFE}
_WAV_TAG_NAMES = {0x0161: "WMA", 0x0162: "WMA Pro", 0x0163: "WMA Lossless", 0x00FF: "AAC", 0x1610: "AAC",
                  0x2000: "AC-3", 0x2001: "DTS", 0x0092: "Dolby AC-3 SPDIF"}


def _wav_format_tag(head: bytes) -> int | None:
    if not (head[:4] in (b"RIFF", b"RIFX") and head[8:12] == b"WAVE"):
        return None
    pos = 12
    while pos + 10 <= len(head):
        chunk_id, size = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if chunk_id == b"fmt ":
            return struct.unpack("<H", head[pos + 8 : pos + 10])[0]
        pos += 8 + size + (size & 1)
    return None


def _unsupported_codec(head: bytes) -> str | None:
    tag = _wav_format_tag(head)
    if tag is not None and tag not in _WAV_TAGS_READ:
        return f"WAV with {_WAV_TAG_NAMES.get(tag, 'an unknown')} codec (format tag 0x{tag:04x})"
    first_page = head[:512]
    if first_page.startswith(b"OggS") and not any(
        s in first_page for s in (b"\x01vorbis", b"OpusHead", b"\x7fFLAC")
    ):
        codec = "Speex" if b"Speex" in first_page else "Theora" if b"theora" in first_page else "an unknown"
        return f"OGG with {codec} codec"
    return None


def _decode(data, head: bytes, what: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    if (fmt := _unsupported_container(head)) is not None:
        raise AudioError(
            f"{what} is {fmt} audio, which cannot be decoded here; convert it to {_FORMATS_WE_READ} "
            "first (e.g. `ffmpeg -i input output.wav`)."
        )
    try:
        x, rate = sf.read(data, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, EOFError) as e:
        if (codec := _unsupported_codec(head)) is not None:
            raise AudioError(
                f"{what} is {codec}, which cannot be decoded here; convert it to 16-bit PCM WAV, "
                "FLAC, OGG or MP3 first (e.g. `ffmpeg -i input -c:a pcm_s16le output.wav`)."
            ) from None
        reason = getattr(e, "error_string", None) or str(e)
        raise AudioError(
            f"{what} could not be decoded ({reason.rstrip('.')}): it is corrupt or not an audio file; "
            f"check that it plays, or re-export it as {_FORMATS_WE_READ}."
        ) from None
    return x, rate


def min_samples(config: LogMelConfig = LogMelConfig(), pad_to_multiple_of: int | None = PAD_TO_MULTIPLE_OF) -> int:
    """The fewest 16 kHz samples that still give one log-mel frame once padded; with fewer there
    is nothing for the audio tower to encode."""
    span = config.frame_length + 1
    return _round_up(span, pad_to_multiple_of) - pad_to_multiple_of + 1 if pad_to_multiple_of else span


def as_samples(clip) -> np.ndarray:
    """A clip given the ways the API takes one: a path, bytes, an (array, sample_rate) pair, or an
    array already at 16 kHz mono; as 16 kHz mono float32, long enough for the model to hear."""
    if isinstance(clip, tuple):
        samples = load_audio(*clip)
    elif isinstance(clip, np.ndarray):
        samples = load_audio(clip, SAMPLE_RATE)
    else:
        samples = load_audio(clip)
    if len(samples) < min_samples():
        needed = math.ceil(min_samples() * 1000 / SAMPLE_RATE) / 1000
        raise AudioError(
            f"The recording is {len(samples) / SAMPLE_RATE:.3f} s long; Gemma 3n needs at least {needed:.3f} s of audio."
        )
    return samples


def load_audio(source, sample_rate: int | None = None) -> np.ndarray:
    """Any audio as float32 mono samples at 16 kHz.

    `source` is a file path (str or Path), the bytes of an audio file (WAV, FLAC, OGG
    Vorbis/Opus, MP3, AIFF, ... anything libsndfile reads), a binary file object, or a numpy
    array of samples, (n,) or (n, channels), float in [-1, 1] or integer PCM. `sample_rate`
    is the rate of an array (required then); files carry their own, so leave it None for them.
    Channels are averaged; other rates are resampled with libsoxr (HQ). Raises AudioError
    with a one-sentence fix for empty, non-finite, corrupt or unsupported audio.
    """
    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise AudioError(
                "A numpy array carries no sample rate; "
                "pass it too, e.g. load_audio(samples, sample_rate=44100)."
            )
        rate = _check_rate(sample_rate)
        what = "The audio array"
        x = _to_mono_float(source, what)
    else:
        if sample_rate is not None:
            raise AudioError(
                "sample_rate is only for numpy arrays (files carry their own rate); "
                "leave it out for files and bytes."
            )
        x, rate, what = _read(source)
        x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    if len(x) == 0:
        raise AudioError(f"{what} contains no audio samples; pass a recording at least one sample long.")
    _check_finite(x, what)
    return np.ascontiguousarray(_resample(x, rate))


def _read(source) -> tuple[np.ndarray, int, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        what = "The audio bytes"
        if not data:
            raise AudioError("The audio bytes are empty; pass the contents of an audio file.")
        return (*_decode(io.BytesIO(data), data[:4096], what), what)
    if hasattr(source, "read"):
        data = source.read()
        what = f"The audio file object {getattr(source, 'name', '')!s}".rstrip()
        if not data:
            raise AudioError(f"{what} is empty; pass a file object positioned at the start of an audio file.")
        return (*_decode(io.BytesIO(data), data[:4096], what), what)
    if not isinstance(source, (str, os.PathLike)):
        raise AudioError(
            f"Cannot read audio from a {type(source).__name__}; pass a path, the file's bytes, "
            "or a numpy array with its sample_rate."
        )
    path = Path(source).expanduser()
    what = f"The audio file '{path}'"
    if not path.exists():
        raise AudioError(f"Audio file not found: '{path}'; check the path.")
    if path.is_dir():
        raise AudioError(f"'{path}' is a directory, not an audio file; pass the path of an audio file.")
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise AudioError(f"{what} cannot be opened ({e.strerror}); check its permissions.") from None
    if not head:
        raise AudioError(f"{what} is empty (0 bytes); record or export the audio again.")
    x, rate = _decode(str(path), head, what)
    return x, rate, what
