"""python -m mlx_gemma3n.generate --model google/gemma-3n-E2B-it --prompt "Write a haiku" """

from __future__ import annotations

import sys

from .common import (
    add_context_args, add_model_args, add_sampling_args, command, load_from_args, parser, sampling_from_args, say_progress,
)


@command
def main(argv=None) -> int:
    p = parser("python -m mlx_gemma3n.generate", "Generate a reply from Gemma 3n.")
    add_model_args(p)
    add_sampling_args(p)
    add_context_args(p)
    p.add_argument("--prompt", required=True, help="the user message ('-' reads standard input)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--image", action="append", default=[], help="attach an image (path or URL); repeatable")
    p.add_argument("--audio", action="append", default=[], help="attach an audio file; repeatable")
    p.add_argument("--raw", action="store_true", help="send the prompt without the chat template")
    p.add_argument("--verbose", action="store_true", help="print prompt and generation speed")
    args = p.parse_args(argv)
    sampling = sampling_from_args(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt

    from ..runtime.generation import stream_generate

    model, tokenizer = load_from_args(args)
    last = None
    for last in stream_generate(
        model, tokenizer, prompt, images=args.image, audio=args.audio, max_tokens=args.max_tokens,
        system=args.system, raw=args.raw, sampling=sampling, submodel=args.submodel, kv_bits=args.kv_bits,
        progress=say_progress,
    ):
        print(last.text, end="", flush=True)
    print()
    if last is not None and last.finish_reason == "length" and last.generation_tokens < args.max_tokens:
        print("[the reply was cut at the end of the model's context]", file=sys.stderr)
    if args.verbose and last is not None:
        media = f"attachments: {last.media_seconds:.1f} s in the towers\n" if last.media_seconds else ""
        print(
            f"{media}prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s\n"
            f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s\n"
            f"peak memory: {last.peak_memory:.2f} GB",
            file=sys.stderr,
        )
    return 0
