"""Decode speed of our Gemma 3n beside mlx-lm's on the same checkpoint, in the same run.

    python benchmarks/random_checkpoint.py --size E2B --out /tmp/gemma3n-E2B-random
    python benchmarks/decode.py --model /tmp/gemma3n-E2B-random

Both models run under mlx-lm's own generation loop (`generate_step`, greedy) on the same prompt
ids, so the difference is the model code; mlx-lm comes with the test extra. On Linux, preload
OpenBLAS (see the README); on a GPU install `mlx[cuda13]`.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step


def run(name, build, prompt, gen_tokens):
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    model = build()
    mx.eval(model.parameters())
    load_s = time.perf_counter() - start

    for _ in generate_step(mx.array(prompt[:8]), model, max_tokens=4):  # warm up (and compile GPU kernels)
        pass
    tokens, first_token_s, start = [], None, time.perf_counter()
    for token, logprobs in generate_step(mx.array(prompt), model, max_tokens=gen_tokens, prefill_step_size=512):
        if first_token_s is None:
            first_token_s = time.perf_counter() - start
            decode_start = time.perf_counter()
            first_logprobs = np.array(logprobs.astype(mx.float32))
        tokens.append(int(token))
    decode_s = time.perf_counter() - decode_start
    result = dict(
        name=name, load_s=load_s, first_token_s=first_token_s,
        decode_tps=(len(tokens) - 1) / decode_s, peak_gb=mx.get_peak_memory() / 1e9, tokens=tokens,
        first_logprobs=first_logprobs,
    )
    del model
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Gemma 3n checkpoint directory (HF layout)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--skip-peer", action="store_true")
    args = parser.parse_args(argv)
    dtype = getattr(mx, args.dtype)
    prompt = np.random.default_rng(0).integers(3, 256_000, size=args.prompt_tokens).tolist()

    def ours():
        from mlx_gemma3n.loading import load_model

        return load_model(args.model, dtype=dtype)[0]

    def mlx_lm_peer():
        from mlx_lm.utils import load_model

        model, _ = load_model(Path(args.model))
        model.set_dtype(dtype)
        return model

    print(f"device: {mx.default_device()}, dtype {args.dtype}, prompt {args.prompt_tokens} tokens, "
          f"{args.gen_tokens} generated")
    print(f"{'model':<16} {'load s':>8} {'1st token s':>12} {'decode tok/s':>13} {'peak GB':>8}", flush=True)
    results = []
    for name, build in (("mlx_gemma3n", ours), ("mlx-lm gemma3n", mlx_lm_peer))[: 1 if args.skip_peer else 2]:
        r = run(name, build, prompt, args.gen_tokens)
        results.append(r)
        print(f"{r['name']:<16} {r['load_s']:>8.2f} {r['first_token_s']:>12.2f} {r['decode_tps']:>13.2f} "
              f"{r['peak_gb']:>8.2f}", flush=True)
    if len(results) == 2:
        a, b = results
        same = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), len(a["tokens"]))
        top2 = np.sort(a["first_logprobs"])[-2:]
        print(f"decode speed ours / mlx-lm: {a['decode_tps'] / b['decode_tps']:.2f}x; "
              f"first-token time ours / mlx-lm: {a['first_token_s'] / b['first_token_s']:.2f}x")
        # Random weights give nearly flat logits: tiny rounding differences can change the argmax.
        print(f"greedy tokens identical for the first {same}/{len(a['tokens'])}; first-step log-probs: "
              f"max |Δ| {np.abs(a['first_logprobs'] - b['first_logprobs']).max():.3g}, "
              f"our top-1 margin {top2[1] - top2[0]:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
