"""How long a user waits for a reply about one image: `python -m mlx_gemma3n.generate` with
an image, from launch to exit, with the default flags against `--dtype bfloat16`. Median of
several processes (the variants take turns, so a busy spell of the machine hits both), with
the spread, and the part of it spent in the vision tower.

    export LD_PRELOAD=$(dpkg -L libopenblas0-pthread | grep '/libblas.so.3$')   # on Linux
    python benchmarks/first_image.py                      # builds the tiny test checkpoint
    python benchmarks/first_image.py --model /path/to/gemma-3n-E2B-it --runs 5

The tiny test checkpoint has a small text model but a vision tower of the full depth and
input size (at a quarter of the channels), so on a CPU the image dominates the wait.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PROMPT = "What is in this picture?"
VARIANTS = {"defaults": [], "bfloat16": ["--dtype", "bfloat16"]}


def one_run(model: str, image: Path, flags: list[str], max_tokens: int) -> tuple[float, float]:
    """(seconds from launch to exit, seconds in the towers) of one generate process."""
    command = [sys.executable, "-m", "mlx_gemma3n.generate", "--model", model, "--prompt", PROMPT,
               "--image", str(image), "--max-tokens", str(max_tokens), "--verbose", *flags]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    towers = re.search(r"attachments: ([\d.]+) s in the towers", done.stderr)
    return wall, float(towers.group(1)) if towers else float("nan")


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):6.1f} s (min {min(values):.1f}, max {max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: build the tiny test one)")
    parser.add_argument("--runs", type=int, default=3, help="processes per variant")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, among {', '.join(VARIANTS)}")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")

    with tempfile.TemporaryDirectory(prefix="first-image-") as scratch:
        work = Path(scratch)
        model = args.model
        if model is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from checkpoints import make_checkpoint

            model = str(work / "tiny-gemma3n")
            make_checkpoint(Path(model))
        image = work / "picture.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(image)

        results = {v: ([], []) for v in variants}
        for r in range(args.runs):
            for v in variants:
                wall, towers = one_run(model, image, VARIANTS[v], args.max_tokens)
                results[v][0].append(wall)
                results[v][1].append(towers)
                print(f"run {r + 1}/{args.runs} {v:>9}: {wall:.1f} s ({towers:.1f} s in the vision tower)", flush=True)

        print(f"\none image through generate, {args.runs} processes each, median (min, max):")
        print(f"{'flags':>9}  {'launch to exit':>30}  {'in the vision tower':>30}")
        for v in variants:
            walls, towers = results[v]
            print(f"{v:>9}  {summary(walls):>30}  {summary(towers):>30}")
        if len(variants) == 2:
            a, b = (statistics.median(results[v][0]) for v in variants)
            print(f"\n{variants[1]} takes {b / a:.1f}x as long as {variants[0]}")


if __name__ == "__main__":
    main()
