"""`python -m mlx_gemma3n`: what this package can be run as.

Imports nothing beyond the package itself, so it answers at once.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib import metadata

COMMANDS = (
    ("chat", "talk with the model in the terminal; /image and /audio attach files"),
    ("generate", "one reply to a prompt, with optional images and audio"),
    ("transcribe", "transcribe or translate a recording"),
    ("convert", "convert a checkpoint for MLX, optionally quantized"),
    ("matformer", "slice a smaller Mix-n-Match model out of E4B"),
    ("server", "serve the model over an OpenAI-compatible HTTP API"),
)


def _version() -> str:
    try:
        return metadata.version("mlx-gemma3n")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _scripts() -> list[str]:
    return sorted(ep.name for ep in metadata.entry_points(group="console_scripts") if ep.value.startswith("mlx_gemma3n."))


def main() -> int:
    lines = [f"mlx_gemma3n {_version()}: Gemma 3n (text, image, audio in; text out) on MLX.", "", "Commands:"]
    available = [(name, what) for name, what in COMMANDS if importlib.util.find_spec(f"mlx_gemma3n.{name}")]
    width = max(len(f"python -m mlx_gemma3n.{name}") for name, _ in available)
    lines += [f"  {f'python -m mlx_gemma3n.{name}':<{width}}  {what}" for name, what in available]
    if scripts := _scripts():
        lines += ["", "Also installed as: " + ", ".join(scripts) + "."]
    lines += ["", "Run any command with --help for its options."]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
