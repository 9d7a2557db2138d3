"""Live speech to text (or speech translation) from the microphone, with Gemma 3n.

    python examples/live_transcribe.py --model google/gemma-3n-E2B-it
    python examples/live_transcribe.py --model google/gemma-3n-E2B-it --translate-to French
    python examples/live_transcribe.py --model google/gemma-3n-E2B-it --device "USB"   # pick an input
    python examples/live_transcribe.py --model google/gemma-3n-E2B-it --file talk.wav  # replay, as if live
    python examples/live_transcribe.py --list-devices

Each finished utterance prints as one line: where it lies in the stream, its text, and its
latency (seconds from the end of the speech reaching the program to the text being ready).
On a terminal the utterance still being spoken shows, dimmed, on the line below and updates.
Ctrl-C stops listening and transcribes what was already heard; a second Ctrl-C quits at once.
On a Mac, the first run asks for permission to use the microphone.
"""

from __future__ import annotations

import argparse
import shutil
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Transcribe (or translate) speech from the microphone as it is spoken.")
    parser.add_argument("--model", help="checkpoint directory or Hugging Face repo id, e.g. google/gemma-3n-E2B-it")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="compute dtype; auto is float32 on a CPU (several times faster there), bfloat16 on a GPU")
    parser.add_argument("--language", default=None, help="the spoken language, e.g. English (optional)")
    parser.add_argument("--translate-to", default=None, help="translate into this language, e.g. Spanish")
    parser.add_argument("--device", default=None, help="audio input: its index or part of its name (see --list-devices)")
    parser.add_argument("--file", default=None, help="replay this audio file as if it were the microphone")
    parser.add_argument("--speed", type=float, default=1.0, help="replay speed for --file (1 = real time)")
    parser.add_argument("--max-tokens", type=int, default=128, help="longest text per utterance, in tokens")
    parser.add_argument(
        "--partial-every", type=float, default=1.0,
        help="show the utterance being spoken every this many seconds of speech (0: only finished ones)",
    )
    parser.add_argument("--list-devices", action="store_true", help="list the audio inputs and exit")
    args = parser.parse_args(argv)
    if not args.list_devices and not args.model:
        parser.error("--model is required (a checkpoint directory or a Hugging Face repo id)")
    if args.speed <= 0:
        parser.error("--speed must be positive")
    return args


def list_devices() -> None:
    from mlx_gemma3n.sources import list_input_devices

    devices = list_input_devices()
    if not devices:
        print("No audio input devices were found.")
    for d in devices:
        mark = "*" if d["default"] else " "
        print(f"{mark} {d['index']:3d}  {d['name']}  ({d['channels']} ch, {d['default_samplerate']:.0f} Hz)")


def stamp(t: float) -> str:
    return f"{int(t // 60):02d}:{t % 60:05.2f}"


class Printer:
    """Finals as lines; on a terminal, the partial as a dimmed line that is rewritten in place."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.partial_shown = False
        self.latencies: list[float] = []

    def clear_partial(self) -> None:
        if self.partial_shown:
            sys.stdout.write("\r\033[K")
            self.partial_shown = False

    def __call__(self, event) -> None:
        from mlx_gemma3n.live import Final, Gap, Partial

        if isinstance(event, Partial):
            if self.tty:
                width = shutil.get_terminal_size().columns - 3
                self.clear_partial()
                sys.stdout.write(f"\033[2m… {event.text[-width:]}\033[0m")
                self.partial_shown = True
        elif isinstance(event, Final):
            self.clear_partial()
            self.latencies.append(event.latency)
            lag = f", {event.lag:.1f} s behind" if event.lag >= 0.5 else ""
            print(f"[{stamp(event.start)} → {stamp(event.end)}] {event.text}   ({event.latency:.2f} s{lag})")
        elif isinstance(event, Gap):
            self.clear_partial()
            print(f"[{event.seconds:.1f} s of audio lost before {stamp(event.start)}: the model fell behind]")
        sys.stdout.flush()


def summary(live, printer: Printer) -> str:
    s = live.stats
    mean = f"{sum(printer.latencies) / len(printer.latencies):.2f} s" if printer.latencies else "-"
    return (
        f"{s.audio_seconds:.1f} s of audio, {s.finals} utterances, real-time factor {s.real_time_factor:.2f}, "
        f"mean latency {mean}, {s.partials} partials ({s.partials_skipped} skipped while behind), "
        f"{s.lost_seconds:.1f} s of audio lost, {s.device_overflows} driver overflows"
    )


def make_source(args):
    from mlx_gemma3n.sources import FileAudioSource, MicrophoneSource

    if args.file:
        return FileAudioSource(args.file, speed=args.speed)
    return MicrophoneSource(args.device)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mlx_gemma3n.sources import SourceError

    try:
        if args.list_devices:
            list_devices()
            return 0
        probe = make_source(args)  # a missing microphone or file fails now, not after the model loads
        probe.start()
        probe.stop()

        import time


        from mlx_gemma3n import load
        from mlx_gemma3n.loading import resolve_dtype
        from mlx_gemma3n.live import LiveTranscriber

        dtype = resolve_dtype(args.dtype)
        print(f"loading {args.model} ({dtype}) ...", file=sys.stderr)
        began = time.monotonic()
        # The audio tower now, not in the middle of the first utterance.
        model, tokenizer = load(args.model, dtype=dtype, preload=("audio",))
        print(f"loaded in {time.monotonic() - began:.1f} s", file=sys.stderr)
        source = make_source(args)
        printer = Printer()
        live = LiveTranscriber(
            model, tokenizer, source, language=args.language, translate_to=args.translate_to,
            max_tokens=args.max_tokens, partial_every=args.partial_every or None,
        )
        what = f"replaying {args.file}" if args.file else "listening"
        print(f"{what}{' (Ctrl-C to stop)' if not args.file else ''} ...", file=sys.stderr)
        with live:
            try:
                for event in live:
                    printer(event)
            except KeyboardInterrupt:
                printer.clear_partial()
                print("\nstopping: transcribing what was heard (Ctrl-C again to quit at once)", file=sys.stderr)
                live.finish(timeout=0)
                try:
                    for event in live:
                        printer(event)
                except KeyboardInterrupt:
                    live.stop()
        printer.clear_partial()
        print(summary(live, printer), file=sys.stderr)
    except (SourceError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
