"""Write a MatFormer sub-model of Gemma 3n (E4B) as a standalone checkpoint.

    python -m mlx_gemma3n.matformer --list
    python -m mlx_gemma3n.matformer --model google/gemma-3n-E4B-it --out gemma-3n-E2.54B --preset E2.54B
    python -m mlx_gemma3n.matformer --model M --out DIR --layers-to-skip 20,21,22,23,24 --ffn-hidden-dims 8192 -q

The output loads anywhere a checkpoint loads (Hugging Face names and config, tokenizer files).
It appears only when complete; a refused recipe leaves nothing behind.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import Gemma3nError
from ..slicing import slice_checkpoint
from ..submodel import E4B_LAYERS, PRESETS, Submodel
from .common import HelpFormatter, add_quantization_args, command, stored_dtype


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, returned by `main` rather than exiting
        raise _UsageError(message)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m mlx_gemma3n.matformer", description=__doc__.split("\n\n")[0],
                     formatter_class=HelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the presets and exit")
    parser.add_argument("--model", help="E4B checkpoint: directory or Hugging Face repo id (original or our conversion)")
    parser.add_argument("--out", type=Path, help="output directory (must not exist, or be empty)")
    parser.add_argument("--preset", help="a preset name from --list, e.g. E2.54B")
    parser.add_argument("--layers-to-skip", type=_int_list, default=[], metavar="I,J,...")
    parser.add_argument("--ffn-hidden-dims", type=_int_list, default=[], metavar="W,...",
                        help="one FFN width per kept layer, or one for all (default: as stored)")
    add_quantization_args(parser)
    return parser


def preset_table() -> str:
    rows = [f"{'preset':<14}{'layers':>7}{'effective params (B)':>22}{'MMLU':>8}"]
    for p in PRESETS:
        rows.append(f"{p.name:<14}{E4B_LAYERS - len(p.skipped):>7}{p.effective_params_b:>22.2f}{p.mmlu:>8.2f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    try:
        return _run(_parser(), argv)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


@command
def _run(parser: argparse.ArgumentParser, argv) -> int:
    args = parser.parse_args(argv)
    if args.list:
        print(preset_table())
        return 0
    if not args.model or not args.out:
        parser.error("--model and --out are required (or --list)")
    if args.preset and (args.layers_to_skip or args.ffn_hidden_dims):
        parser.error("give either --preset or --layers-to-skip/--ffn-hidden-dims, not both")
    try:
        submodel = Submodel.preset(args.preset) if args.preset else Submodel(args.layers_to_skip, args.ffn_hidden_dims)
    except Gemma3nError as e:
        parser.error(str(e))
    start = time.perf_counter()
    out = slice_checkpoint(args.model, args.out, submodel, args.quantize, args.bits, args.group_size,
                           args.recipe, args.ple_bits, stored_dtype(args.dtype))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"Wrote {out} ({size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s.")
    return 0
