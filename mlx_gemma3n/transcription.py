"""Speech to text, and speech translation, with Gemma 3n.

The model hears at most 30 s per clip. Longer recordings are cut at their quietest moments into
clips of at most 30 s (with a little overlap), transcribed in order and stitched; every segment
of the result says which clip and which span of the recording it came from.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

from .processing.audio import MAX_SAMPLES, SAMPLE_RATE, as_samples
from .runtime.generation import SamplingOptions, stream_generate
from .sources.segment import split_on_silence

CLIP_SECONDS = MAX_SAMPLES / SAMPLE_RATE
OVERLAP_SECONDS = 0.5
SILENCE_RMS = 10 ** (-60 / 20)  # below -60 dBFS a clip holds no speech worth sending
MAX_TOKENS_PER_CLIP = 256  # a 30 s clip of fast speech is about 120 tokens


@dataclass
class Segment:
    start: float  # seconds into the recording
    end: float
    text: str
    clip: int


@dataclass
class Transcript:
    text: str
    segments: list[Segment] = field(default_factory=list)
    duration: float = 0.0
    language: str | None = None
    translated_to: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=2)

    def to_srt(self) -> str:
        def stamp(t: float) -> str:
            ms = round(t * 1000)
            return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"

        blocks = [s for s in self.segments if s.text]
        return "".join(f"{i}\n{stamp(s.start)} --> {stamp(s.end)}\n{s.text}\n\n" for i, s in enumerate(blocks, 1))


def instruction(language: str | None = None, translate_to: str | None = None, prompt: str | None = None) -> str:
    """What the model is asked for each clip. `prompt` plays the part of Whisper's: text the speech
    follows, or that spells its names and terms."""
    if translate_to:
        source = f"{language} " if language else ""
        asked = f"Translate the following {source}speech segment into {translate_to}:"
    elif language:
        asked = f"Transcribe the following speech segment in {language}:"
    else:
        asked = "Transcribe the following speech segment:"
    if prompt and prompt.strip():
        asked += f"\n(It follows this text; keep its spelling of names and terms: {prompt.strip()})"
    return asked


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", "", text.lower()).split()


def stitch(previous: str, text: str, max_words: int = 8) -> str:
    """Drop from `text` the words that repeat the end of `previous` (the clips overlap)."""
    before, after = _words(previous), _words(text)
    for n in range(min(max_words, len(before), len(after)), 0, -1):
        if before[-n:] == after[:n]:
            return " ".join(text.split()[n:])
    return text


def transcribe(
    model,
    tokenizer,
    audio,
    *,
    language: str | None = None,
    translate_to: str | None = None,
    prompt: str | None = None,
    max_tokens_per_clip: int = MAX_TOKENS_PER_CLIP,
    sampling: SamplingOptions | None = None,
    progress: bool = False,
    submodel=None,
) -> Transcript:
    """Transcribe (or translate) `audio`: a path, bytes, an (array, sample_rate) pair, or an
    array at 16 kHz. `prompt`, as Whisper's, is text the speech follows or that spells its names
    and terms; every clip is asked with it. Greedy decoding unless `sampling` says otherwise;
    `submodel` runs a MatFormer size of the loaded model (see `stream_generate`)."""
    samples = as_samples(audio)
    sampling = sampling or SamplingOptions(temperature=0.0)
    spans = split_on_silence(samples, SAMPLE_RATE, max_seconds=CLIP_SECONDS, overlap_seconds=OVERLAP_SECONDS)
    asked = instruction(language, translate_to, prompt)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=round(len(samples) / SAMPLE_RATE, 1), unit="s", desc="transcribing", file=sys.stderr)
    segments, texts = [], []
    for clip, (start, end) in enumerate(spans):
        piece = samples[round(start * SAMPLE_RATE) : round(end * SAMPLE_RATE)]
        text = ""
        if np.sqrt(np.mean(np.square(piece, dtype=np.float64))) >= SILENCE_RMS:
            text = "".join(
                r.text for r in stream_generate(
                    model, tokenizer, asked, audio=[piece], max_tokens=max_tokens_per_clip, sampling=sampling,
                    submodel=submodel,
                )
            ).strip()
            if texts:
                text = stitch(texts[-1], text)
        segments.append(Segment(start, end, text, clip))
        if text:
            texts.append(text)
        if bar is not None:
            bar.update(round(end - bar.n, 1))
    if bar is not None:
        bar.close()
    return Transcript(" ".join(texts), segments, len(samples) / SAMPLE_RATE, language, translate_to)
