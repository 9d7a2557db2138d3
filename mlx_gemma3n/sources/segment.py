"""Cutting audio into utterances: live (a voice-activity detector) and offline (long files).

Both work on the energy of short frames (20 ms), in dB relative to full scale. A frame is
voiced when it is `threshold_db` above the noise floor and louder than `min_level_db`.
The noise floor follows the quietest recent frames: it drops at once to a quieter frame
and rises by at most `noise_rise_db_per_s`, so it settles on the room's hum within a few
seconds while a spoken word, which always has dips between syllables, cannot drag it up.

Gemma 3n hears at most 30 s at once, so an utterance (or an offline clip) that would be
longer is cut at its quietest moment in the last seconds before the limit: a breath
between phrases rather than the middle of a word.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..processing.audio import SAMPLE_RATE
from .audio import AudioChunk

FRAME_SECONDS = 0.02
SMOOTH_SECONDS = 0.2  # energies are averaged over this long when looking for a place to cut
_SILENT_DB = -120.0


@dataclass(frozen=True, eq=False)
class Utterance:
    """A stretch of speech: its samples and where it lies in the stream, in seconds.

    `cut` is True when it ended because it reached the maximum length rather than in a
    pause; the speech then goes on in the next utterance.
    """

    samples: np.ndarray
    start: float
    end: float
    sample_rate: int = SAMPLE_RATE
    cut: bool = False

    @property
    def duration(self) -> float:
        return self.end - self.start


def frame_energies_db(samples: np.ndarray, frame: int) -> np.ndarray:
    """Mean power of each whole frame of `frame` samples, in dBFS (a full-scale sine is -3 dB)."""
    x = np.asarray(samples, dtype=np.float32)
    n = len(x) // frame
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    power = np.mean(np.square(x[: n * frame].reshape(n, frame), dtype=np.float64), axis=1)
    return 10.0 * np.log10(power + 1e-12)


def _smoothed(db: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average of the power behind `db`, back in dB."""
    if width <= 1 or len(db) == 0:
        return db
    power = 10.0 ** (db / 10.0)
    kernel = np.ones(width) / width
    padded = np.pad(power, (width // 2, width - 1 - width // 2), mode="edge")
    return 10.0 * np.log10(np.convolve(padded, kernel, mode="valid") + 1e-12)


def _quietest_frame(db: np.ndarray, lo: int, hi: int, smooth: int, tolerance_db: float = 1.0) -> int:
    """Index in [lo, hi) of the middle of the quietest stretch of frames."""
    s = _smoothed(db, smooth)[lo:hi]
    floor = s.min()
    quiet = s <= floor + tolerance_db
    best = len(s) - 1 - int(np.argmin(s[::-1]))  # the latest of equally quiet frames
    a = best
    while a > 0 and quiet[a - 1]:
        a -= 1
    b = best
    while b + 1 < len(s) and quiet[b + 1]:
        b += 1
    return lo + (a + b + 1) // 2


def split_on_silence(
    samples: np.ndarray,
    sr: int = SAMPLE_RATE,
    max_seconds: float = 30.0,
    overlap_seconds: float = 0.0,
    *,
    search_seconds: float | None = None,
) -> list[tuple[float, float]]:
    """Split a long recording into (start_s, end_s) clips of at most `max_seconds`.

    The clips cover the whole recording in order; each cut lies at the quietest moment
    within the last `search_seconds` (default a third of max_seconds, at most 10 s) before
    the limit. With `overlap_seconds` > 0 each clip after the first starts that much before
    the previous cut, so a word clipped by an unlucky cut is heard whole once. A recording
    no longer than max_seconds is one clip.
    """
    x = np.asarray(samples)
    if x.ndim != 1:
        raise InputError(f"split_on_silence needs 1-D mono samples, got shape {x.shape}.")
    if not (max_seconds > 0 and 0 <= overlap_seconds < max_seconds / 2):
        raise InputError(
            f"need max_seconds > 0 and 0 <= overlap_seconds < max_seconds / 2, got {max_seconds} and {overlap_seconds}."
        )
    n = len(x)
    max_len = int(max_seconds * sr)
    if n <= max_len:
        return [(0.0, n / sr)]
    frame = max(1, round(FRAME_SECONDS * sr))
    search = search_seconds if search_seconds is not None else min(max_seconds / 3, 10.0)
    search_frames = max(
        1, min(int(search * sr) // frame, int((max_seconds - 2 * overlap_seconds) * sr) // frame - 1)
    )
    overlap = int(overlap_seconds * sr)
    db = frame_energies_db(x, frame)
    smooth = max(1, round(SMOOTH_SECONDS / FRAME_SECONDS))
    clips, cut = [], 0
    while n - max(0, cut - overlap) > max_len:
        clip_start = max(0, cut - overlap)
        hi = min((clip_start + max_len) // frame, len(db))  # frames [lo, hi) end before the limit
        lo = max(cut // frame + 1, hi - search_frames)
        new_cut = _quietest_frame(db, lo, hi, smooth) * frame
        clips.append((clip_start / sr, new_cut / sr))
        cut = new_cut
    clips.append((max(0, cut - overlap) / sr, n / sr))
    return clips


class VoiceActivitySegmenter:
    """Cuts a stream of audio chunks into utterances, with their start and end times.

    Feed it `AudioChunk`s (or bare 16 kHz arrays) with `feed()`, which returns the
    utterances that ended; `flush()` returns the one still open at the end of the stream.
    An utterance starts once `min_speech_seconds` of voiced frames come without a pause of
    `min_silence_seconds`, and ends after such a pause; `padding_seconds` of audio are kept
    on either side of the voiced frames. One longer than `max_seconds` is cut at its
    quietest frame within `cut_search_seconds` before the limit. Chunks whose `gap` says
    audio was lost close the open utterance first, so no utterance spans a hole.
    """

    def __init__(
        self,
        *,
        threshold_db: float = 10.0,
        min_level_db: float = -50.0,
        min_speech_seconds: float = 0.2,
        min_silence_seconds: float = 0.5,
        padding_seconds: float = 0.2,
        max_seconds: float = 30.0,
        cut_search_seconds: float = 5.0,
        noise_rise_db_per_s: float = 6.0,
        sample_rate: int = SAMPLE_RATE,
    ):
        if max_seconds <= 2 * padding_seconds or cut_search_seconds >= max_seconds:
            raise InputError("need max_seconds > 2 * padding_seconds and cut_search_seconds < max_seconds.")
        self.sr = sample_rate
        self.frame = round(FRAME_SECONDS * sample_rate)
        self.threshold_db = threshold_db
        self.min_level_db = min_level_db
        self.min_speech = max(1, math.ceil(min_speech_seconds / FRAME_SECONDS))
        self.min_silence = max(1, math.ceil(min_silence_seconds / FRAME_SECONDS))
        self.padding = round(padding_seconds * sample_rate)
        self.max_len = round(max_seconds * sample_rate)
        self.search_frames = max(1, round(cut_search_seconds / FRAME_SECONDS))
        self.rise_per_frame = noise_rise_db_per_s * FRAME_SECONDS
        self.noise_floor: float | None = None
        self._reset(0)

    def _reset(self, position: int) -> None:
        self._tape: list[np.ndarray] = []  # samples from self._tape_start on
        self._tape_start = position
        self._tape_len = 0
        self._next_frame = position  # absolute sample index of the next frame to classify
        self._min_start = position  # utterances never start before this (the previous one's end)
        self._in_speech = False
        self._candidate: int | None = None  # first voiced frame of speech not yet confirmed
        self._voiced = 0
        self._silence = 0
        self._utt_start = 0
        self._last_voiced_end = 0
        self._energies: list[float] = []  # dB of the frames since self._utt_start

    @property
    def position(self) -> int:
        return self._tape_start + self._tape_len

    # -- public API -------------------------------------------------------------------------

    def feed(self, chunk: AudioChunk | np.ndarray) -> list[Utterance]:
        out: list[Utterance] = []
        if isinstance(chunk, AudioChunk):
            if chunk.offset != self.position:  # audio was lost (or skipped): no utterance spans the hole
                out += self.flush()
                self._reset(chunk.offset)
            samples = chunk.samples
        else:
            samples = np.asarray(chunk, dtype=np.float32)
        if len(samples):
            self._tape.append(np.asarray(samples, dtype=np.float32))
            self._tape_len += len(samples)
        while self._next_frame + self.frame <= self.position:
            out += self._classify(self._next_frame)
            self._next_frame += self.frame
        self._trim()
        return out

    def pending(self) -> tuple[int, np.ndarray] | None:
        """(first sample, samples so far) of the utterance still open, or None. Like a finished
        utterance it ends `padding` after its last voiced frame (for partial transcripts)."""
        if not self._in_speech:
            return None
        end = min(self._last_voiced_end + self.padding, self._next_frame)
        return self._utt_start, self._slice(self._utt_start, max(self._utt_start, end))

    def flush(self) -> list[Utterance]:
        """End of stream: the open utterance, if any (ended at the last voiced frame + padding)."""
        out = []
        if self._in_speech:
            end = min(self._last_voiced_end + self.padding, self.position)
            if end > self._utt_start:  # after a cut, what is left may be only silence
                out.append(self._emit(self._utt_start, end, cut=False))
            self._in_speech = False
        self._candidate, self._voiced, self._silence = None, 0, 0
        return out

    def segment(self, chunks: Iterable[AudioChunk | np.ndarray]) -> Iterator[Utterance]:
        """Utterances of a whole stream of chunks, as they end."""
        for chunk in chunks:
            yield from self.feed(chunk)
        yield from self.flush()

    # -- frame by frame ---------------------------------------------------------------------

    def _classify(self, pos: int) -> list[Utterance]:
        db = float(frame_energies_db(self._slice(pos, pos + self.frame), self.frame)[0])
        voiced = self._voiced_frame(db)
        end = pos + self.frame
        out: list[Utterance] = []
        if not self._in_speech:
            if voiced:
                if self._candidate is None:
                    self._candidate, self._voiced = pos, 0
                self._voiced += 1
                self._silence = 0
                self._last_voiced_end = end
                if self._voiced >= self.min_speech:
                    self._in_speech = True
                    self._utt_start = max(self._candidate - self.padding, self._min_start, self._tape_start)
                    self._energies = self._energies_between(self._utt_start, end)
                    self._candidate = None
                return out
            if self._candidate is not None:
                self._silence += 1
                if self._silence >= self.min_silence:
                    self._candidate, self._voiced = None, 0
            return out
        self._energies.append(db)
        if voiced:
            self._silence = 0
            self._last_voiced_end = end
        else:
            self._silence += 1
            if self._silence >= self.min_silence:
                utt_end = min(self._last_voiced_end + self.padding, end)
                if utt_end > self._utt_start:  # after a cut, what is left may be only silence
                    out.append(self._emit(self._utt_start, utt_end, cut=False))
                self._in_speech, self._silence = False, 0
                return out
        if end - self._utt_start >= self.max_len:
            out.append(self._cut_at_quietest(end))
        return out

    def _voiced_frame(self, db: float) -> bool:
        floor_min = self.min_level_db - self.threshold_db  # below this the absolute gate decides anyway
        if self.noise_floor is None or db < self.noise_floor:
            self.noise_floor = max(db, floor_min)
        else:
            self.noise_floor = min(db, self.noise_floor + self.rise_per_frame)
        return db > self.min_level_db and db > self.noise_floor + self.threshold_db

    def _cut_at_quietest(self, end: int) -> Utterance:
        """The open utterance has reached max length at `end`: cut it in its quietest frame near the limit."""
        n = len(self._energies)
        hi = n
        lo = max(1, n - self.search_frames)
        smooth = max(1, round(SMOOTH_SECONDS / FRAME_SECONDS))
        # The energies list is aligned to frames that start at _utt_start rounded to the frame grid.
        first_frame_pos = end - n * self.frame
        cut = first_frame_pos + _quietest_frame(np.asarray(self._energies), lo, hi, smooth) * self.frame
        cut = max(cut, self._utt_start + self.frame)
        utterance = self._emit(self._utt_start, cut, cut=True)
        keep = (cut - first_frame_pos) // self.frame
        self._energies = self._energies[keep:]
        self._utt_start = cut
        return utterance

    # -- the tape of recent samples ------------------------------------------------------------

    def _energies_between(self, a: int, b: int) -> list[float]:
        """dB of the frames on the classification grid that end in (a, b]."""
        first = b - ((b - a) // self.frame) * self.frame
        return list(frame_energies_db(self._slice(first, b), self.frame))

    def _slice(self, a: int, b: int) -> np.ndarray:
        if not self._tape:
            return np.zeros(0, np.float32)
        if len(self._tape) > 1:
            self._tape = [np.concatenate(self._tape)]
        return self._tape[0][a - self._tape_start : b - self._tape_start]

    def _emit(self, a: int, b: int, cut: bool) -> Utterance:
        samples = self._slice(a, b).copy()
        self._min_start = b
        return Utterance(samples, a / self.sr, b / self.sr, self.sr, cut)

    def _trim(self) -> None:
        """Forget samples no utterance can need any more."""
        if self._in_speech:
            keep_from = self._utt_start
        else:
            lookback = self._candidate if self._candidate is not None else self._next_frame
            keep_from = max(self._min_start, lookback - self.padding)
        keep_from = max(self._tape_start, min(keep_from, self._next_frame))
        if keep_from - self._tape_start > 4 * self.sr or (
            not self._in_speech and keep_from > self._tape_start
        ):
            data = self._slice(keep_from, self.position).copy()
            self._tape, self._tape_len, self._tape_start = ([data] if len(data) else []), len(data), keep_from
