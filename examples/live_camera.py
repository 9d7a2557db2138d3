"""A running description of what a camera sees, with Gemma 3n.

    python examples/live_camera.py --model google/gemma-3n-E2B-it                # the first camera
    python examples/live_camera.py --model google/gemma-3n-E2B-it --camera 1 --every 10
    python examples/live_camera.py --model google/gemma-3n-E2B-it --video clip.mp4
    python examples/live_camera.py --model google/gemma-3n-E2B-it --folder frames/ --fps 5

The newest frame is described every --every seconds, and at once when the picture changes
(unless --no-change); frames that go by while the model is busy are skipped, not queued.
Each line shows the frame's time and number, the text, and the latency (seconds from taking
the frame to the text: the time the description took). The camera needs OpenCV (pip install opencv-python), a video file
PyAV (pip install av); a folder of images needs neither. On a Mac, the first run asks for
permission to use the camera. Ctrl-C stops.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Describe what a camera (or a replayed video) sees, as it changes.")
    parser.add_argument("--model", required=True, help="checkpoint directory or Hugging Face repo id")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="compute dtype; auto is float32 on a CPU (several times faster there), bfloat16 on a GPU")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--camera", default="0", help="camera index (0 is the first) or a capture URL; the default")
    where.add_argument("--video", default=None, help="replay this video file as if it were the camera")
    where.add_argument("--folder", default=None, help="replay this folder of images as if it were the camera")
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate of a --folder replay")
    parser.add_argument("--speed", type=float, default=1.0, help="replay speed for --video/--folder (1 = real time)")
    parser.add_argument("--every", type=float, default=5.0, help="describe the newest frame every this many seconds")
    parser.add_argument("--change", type=float, default=0.08,
                        help="also describe at once when the picture changed this much (0-1, mean grey difference)")
    parser.add_argument("--no-change", action="store_true", help="describe on the --every schedule only")
    parser.add_argument("--prompt", default="Describe this scene in one sentence.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--frames", type=int, default=None, help="stop after this many descriptions")
    args = parser.parse_args(argv)
    if args.every <= 0 or args.fps <= 0 or args.speed <= 0:
        parser.error("--every, --fps and --speed must be positive")
    return args


def make_source(args):
    from mlx_gemma3n.sources import CameraSource, FolderSource, VideoFileSource

    if args.video:
        return VideoFileSource(args.video, speed=args.speed)
    if args.folder:
        return FolderSource(args.folder, fps=args.fps, speed=args.speed)
    return CameraSource(int(args.camera) if args.camera.isdigit() else args.camera)


class FirstFrameNotice:
    """The source, saying on standard error when its first frame reaches the describer: that
    one is always described, and a CPU takes a while over it."""

    def __init__(self, source):
        self._source, self._told = source, False

    def __getattr__(self, name):
        return getattr(self._source, name)

    def read(self):
        frame = self._source.read()
        if frame is not None and not self._told:
            self._told = True
            print("describing the first frame ...", file=sys.stderr, flush=True)
        return frame


def stamp(t: float) -> str:
    return f"{int(t // 60):02d}:{t % 60:05.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    from mlx_gemma3n.sources import SourceError

    try:
        probe = make_source(args)  # a missing camera or file fails now, not after the model loads
        probe.start()
        probe.stop()

        import time


        from mlx_gemma3n import load
        from mlx_gemma3n.loading import resolve_dtype
        from mlx_gemma3n.live import LiveDescriber

        dtype = resolve_dtype(args.dtype)
        print(f"loading {args.model} ({dtype}) ...", file=sys.stderr)
        began = time.monotonic()
        model, tokenizer = load(args.model, dtype=dtype, preload=("vision",))
        print(f"loaded in {time.monotonic() - began:.1f} s", file=sys.stderr)
        live = LiveDescriber(
            model, tokenizer, FirstFrameNotice(make_source(args)), prompt=args.prompt, every=args.every,
            change_threshold=None if args.no_change else args.change, max_tokens=args.max_tokens,
            max_descriptions=args.frames,
        )
        print("watching (Ctrl-C to stop) ...", file=sys.stderr)
        with live:
            try:
                for d in live:
                    print(
                        f"[{stamp(d.time)} frame {d.index}] {d.text}   "
                        f"({d.latency:.2f} s to describe, {d.reason}; {d.dropped} stale frames skipped)",
                        flush=True,
                    )
            except KeyboardInterrupt:
                print("\nstopping (the model first finishes the step it is on) ...", file=sys.stderr)
                live.stop()
        s = live.stats
        print(
            f"{s.described} frames described ({s.per_minute:.1f} per minute), {s.unchanged} looked at and "
            f"left alone, {s.dropped} stale frames skipped; {s.model_seconds:.1f} s in the model",
            file=sys.stderr,
        )
    except (SourceError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
