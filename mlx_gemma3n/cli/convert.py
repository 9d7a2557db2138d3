"""python -m mlx_gemma3n.convert --model google/gemma-3n-E2B-it --out gemma-3n-E2B-it-4bit -q"""

from __future__ import annotations

import time
from pathlib import Path

from .common import add_quantization_args, command, parser, stored_dtype


@command
def main(argv=None) -> int:
    from ..convert import __doc__ as about, convert

    p = parser("python -m mlx_gemma3n.convert", about)
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face repo id (bf16 original)")
    p.add_argument("--out", required=True, type=Path, help="output directory (must not exist, or be empty)")
    add_quantization_args(p)
    args = p.parse_args(argv)
    start = time.perf_counter()
    out = convert(args.model, args.out, args.quantize, args.bits, args.group_size, args.recipe, args.ple_bits,
                  stored_dtype(args.dtype))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"Wrote {out} ({size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s.")
    return 0
