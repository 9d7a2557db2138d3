"""python -m mlx_gemma3n.transcribe --model google/gemma-3n-E2B-it talk.mp3 [--translate-to Spanish] [--format srt]"""

from __future__ import annotations

import sys
import time

from .common import add_model_args, add_sampling_args, check_output, command, load_from_args, parser, sampling_from_args


@command
def main(argv=None) -> int:
    from ..transcription import MAX_TOKENS_PER_CLIP

    p = parser("python -m mlx_gemma3n.transcribe", "Transcribe or translate speech.")
    add_model_args(p)
    add_sampling_args(p, temperature=0.0, max_tokens=MAX_TOKENS_PER_CLIP,
                      max_tokens_help="longest text per 30 s clip, in tokens")
    p.add_argument("audio", help="an audio file (WAV, FLAC, OGG, MP3, ...)")
    p.add_argument("--language", default=None, help="the spoken language, e.g. English (optional)")
    p.add_argument("--translate-to", default=None, help="translate into this language, e.g. Spanish")
    p.add_argument("--prompt", default=None,
                   help="text the speech follows, or that spells its names and terms (as Whisper's prompt)")
    p.add_argument("--format", choices=["txt", "srt", "json"], default="txt")
    p.add_argument("--output", "-o", default=None, help="write here instead of standard output")
    args = p.parse_args(argv)
    sampling = sampling_from_args(args)
    check_output(args.output)

    from ..processing.audio import load_audio
    from ..transcription import transcribe

    audio = load_audio(args.audio)  # a file that cannot be read is refused before the model loads
    model, tokenizer = load_from_args(args)
    began = time.perf_counter()
    result = transcribe(
        model, tokenizer, audio, language=args.language, translate_to=args.translate_to, prompt=args.prompt,
        max_tokens_per_clip=args.max_tokens, sampling=sampling, progress=sys.stderr.isatty(), submodel=args.submodel,
    )
    seconds = time.perf_counter() - began
    text = {"txt": lambda: result.text + "\n", "srt": result.to_srt, "json": lambda: result.to_json() + "\n"}[args.format]()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    print(
        f"{result.duration:.1f} s of audio in {len(result.segments)} clips, {seconds:.1f} s "
        f"(real-time factor {seconds / max(result.duration, 1e-9):.2f})",
        file=sys.stderr,
    )
    return 0
