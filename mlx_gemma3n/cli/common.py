"""What the commands share: the model and sampling flags with their defaults (one table), the
checks made before anything loads, and the one-sentence error report."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

from ..errors import Gemma3nError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default in --help (where it has one worth saying), descriptions kept as written."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return f"{action.help} (default: %(default)s)"


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face repo id")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="compute dtype; auto is float32 on a CPU, bfloat16 on a GPU")
    p.add_argument("--release-towers", action="store_true",
                   help="free the image/audio towers after each use (least memory; the next attachment reads them again)")
    p.add_argument("--resident-ple", action="store_true",
                   help="hold the Per-Layer Embedding table in memory rather than reading each token's rows "
                        "from disk (E2B: 4 GB in bfloat16, about 1.1 GB converted with --ple-bits 4), so that the next "
                        "token's step can be prepared while this one computes (no gain measured on a CPU or an H200)")
    p.add_argument("--submodel", default=None, metavar="PRESET",
                   help="run a MatFormer size of an E4B checkpoint, e.g. E2B or E2.54B "
                        "(python -m mlx_gemma3n.matformer --list shows them)")


def add_context_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-bits", type=int, choices=[8, 4], default=None,
                   help="keep the growing keys and values quantized (8 nearly halves a long context's cache)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float | None = None, max_tokens: int | None = None,
                      max_tokens_help: str = "longest reply, in tokens") -> None:
    from ..runtime.generation import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P

    p.add_argument("--max-tokens", type=int, default=max_tokens or DEFAULT_MAX_TOKENS, help=max_tokens_help)
    p.add_argument("--temp", type=float, default=DEFAULT_TEMPERATURE if temperature is None else temperature,
                   help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="nucleus sampling mass")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this fraction of the likeliest")
    p.add_argument("--repetition-penalty", type=float, default=None, help="above 1 discourages repeats")
    p.add_argument("--seed", type=int, default=None, help="random seed, for replies that can be repeated")


def add_quantization_args(p: argparse.ArgumentParser) -> None:
    """The flags of the commands that write checkpoints (convert, matformer)."""
    from ..quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, RECIPES

    p.add_argument("-q", "--quantize", action="store_true", help="quantize the linear and embedding layers")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=list(GROUP_SIZES))
    p.add_argument("--recipe", default="uniform", choices=list(RECIPES),
                   help="uniform: every layer at --bits; mixed: the sensitive ones at 8 bits; "
                        "compact (4-bit only): the KV-shared layers' MLP at 3 bits, the least accuracy per byte")
    p.add_argument("--ple-bits", type=int, choices=[4, 8], default=None,
                   help="also quantize the Per-Layer Embedding table (it is never resident; this cuts disk and I/O)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="floating-point dtype of the output (default: as stored)")


def stored_dtype(name: str | None) -> str | None:
    """A --dtype of the checkpoint-writing commands as safetensors names it."""
    return {"bfloat16": "BF16", "float16": "F16", "float32": "F32", None: None}[name]


def sampling_from_args(args):
    """The sampling options, checked: call it before loading, so a bad flag costs no wait."""
    from ..errors import InputError
    from ..runtime.generation import SamplingOptions

    if args.max_tokens < 1:
        raise InputError(f"--max-tokens is {args.max_tokens}; it must be at least 1.")
    return SamplingOptions(args.temp, args.top_k, args.top_p, args.min_p, args.repetition_penalty, args.seed)


def check_output(path: str | None) -> None:
    """Refuse an output file that cannot be written, before any work starts."""
    from ..errors import InputError

    if not path:
        return
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise InputError(f"{path} is a folder: give a file name to write to.")
    if not folder.is_dir():
        raise InputError(f"Cannot write {path}: the folder {folder} does not exist.")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise InputError(f"Cannot write {path}: it is not writable.")


def load_from_args(args):
    """The model and tokenizer; a `--submodel` that this model cannot run is refused here too."""
    from ..loading import load
    from ..submodel import Submodel, plan_for

    if args.submodel:
        Submodel.preset(args.submodel)  # an unknown name costs no wait
    model, tokenizer = load(args.model, dtype=args.dtype, keep_towers=not args.release_towers,
                            lazy_ple=not args.resident_ple)
    plan_for(model.config, args.submodel)
    return model, tokenizer


def say_progress(progress) -> None:
    """What the model is busy with before the first token, on standard error: each attachment
    as the towers start on it, and the prompt's progress when it is long."""
    stage, done, total = progress.stage, progress.done, progress.total
    if stage == "prompt":
        if total >= 1024:
            print(f"[prompt: {done}/{total} tokens in]", file=sys.stderr, flush=True)
    elif done < total:
        print(f"[encoding {stage} {done + 1}/{total}...]", file=sys.stderr, flush=True)


def command(main):
    """A command's `main`: every error of ours (or of the operating system) becomes one line on
    standard error and exit status 1; Ctrl-C exits with 130 and no traceback."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except Gemma3nError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}.", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130

    return run
