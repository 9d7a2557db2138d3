"""Where a decode step's and a prompt's time goes, for ours on this device: the host's graph
building against evaluation, op by op against one compiled step, the Per-Layer-Embedding table
read on the host per token against resident, the compiled step on a thread of its own and through
the engine as a program gets its tokens, and prompt chunks by size: through the engine (with and
without the per-layer evaluation and the cache clearing between chunks that keep a prompt's memory
low) and by the model's own calls on this thread and on another.

    python benchmarks/random_checkpoint.py --size E2B --out /tmp/gemma3n-E2B-random
    python benchmarks/step_profile.py --model DIR   # an mlx-vlm or our 4-bit conversion of it

Times are medians over the tokens of one process (`speed.py` compares runtimes across processes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from speed import kernels, primitives  # noqa: E402


def kernels_by_name(*outputs) -> Counter:
    return kernels(primitives(*outputs))


def decode(model, prompt: list[int], tokens: int, compiled: bool) -> dict:
    """Greedy tokens after `prompt`, the step evaluated before the next is built (build and
    evaluation timed apart), then as many with the next step built while the last runs."""
    step = (lambda t, cache: model.decode(t, cache)) if compiled else (lambda t, cache: model(t, cache=cache))
    cache = model.make_cache()
    token = mx.argmax(model(mx.array([prompt]), cache=cache)[:, -1], axis=-1)
    mx.eval(token)
    build, run, out = [], [], []
    for _ in range(tokens):
        start = time.perf_counter()
        following = mx.argmax(step(token[:, None], cache)[:, -1], axis=-1)
        built = time.perf_counter()
        mx.eval(following)
        build.append(built - start)
        run.append(time.perf_counter() - built)
        token = following
        out.append(token.item())
    start = time.perf_counter()
    for _ in range(tokens):
        following = mx.argmax(step(token[:, None], cache)[:, -1], axis=-1)
        mx.async_eval(following)
        token = following
    mx.eval(token)
    pipelined = (time.perf_counter() - start) / tokens
    return dict(build_ms=1e3 * statistics.median(build), eval_ms=1e3 * statistics.median(run),
                pipelined_ms=1e3 * pipelined, tokens=out)


def on_new_thread(fn, *args):
    """`fn(*args)` run on a thread of its own (as the engine runs a request), its result returned."""
    out = []
    worker = threading.Thread(target=lambda: out.append(fn(*args)))
    worker.start()
    worker.join()
    return out[0]


def through_engine(model, tokenizer, prompt: list[int], tokens: int) -> float:
    """Tokens/s after the first as a program gets them: `stream_tokens`, the engine's thread
    running the compiled step and handing each token to this one (the second of two replies)."""
    from mlx_gemma3n.runtime.generation import SamplingOptions, stream_tokens

    eos, tokenizer.eos_token_ids = tokenizer.eos_token_ids, set()  # a random model may end at once
    try:
        for _ in range(2):
            times = [time.perf_counter() for _ in stream_tokens(model, tokenizer, prompt, max_tokens=tokens + 1,
                                                                 sampling=SamplingOptions(temperature=0.0))]
    finally:
        tokenizer.eos_token_ids = eos
    return (len(times) - 1) / (times[-1] - times[0])


def direct_prompt_seconds(model, prompt: list[int], step: int, runs: int = 3) -> tuple[float, float]:
    """As `prompt_seconds`, the prompt's chunks run on this thread by the model's own calls,
    without the engine and the generation loop."""
    from mlx_gemma3n.cache import reserve

    ids, times = mx.array([prompt]), []
    for _ in range(runs + 1):
        mx.synchronize()
        mx.reset_peak_memory()
        start = time.perf_counter()
        cache = model.make_cache()
        reserve(cache, len(prompt) + 1)
        done = 0
        while len(prompt) - done > step:
            model(ids[:, done : done + step], cache=cache, outputs="none")
            mx.eval([c.state for c in cache])
            done += step
        mx.eval(mx.argmax(model(ids[:, done:], cache=cache, outputs="last")[:, -1], axis=-1))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), mx.get_peak_memory() / 1e9


def prompt_seconds(model, tokenizer, prompt: list[int], step: int, runs: int = 3) -> tuple[float, float]:
    """Median time to the first token and peak MLX memory (GB) of `prompt` at `step` tokens a chunk."""
    from mlx_gemma3n.runtime.generation import SamplingOptions, stream_tokens

    times = []
    for _ in range(runs + 1):  # the first warms the kernels of this chunk size
        mx.synchronize()
        mx.reset_peak_memory()
        start = time.perf_counter()
        for _ in stream_tokens(model, tokenizer, prompt, max_tokens=1, sampling=SamplingOptions(temperature=0.0),
                               prefill_step_size=step):
            times.append(time.perf_counter() - start)  # not the token's own keys and values, written after it
    return statistics.median(times[1:]), mx.get_peak_memory() / 1e9


class _WithoutLayerEvaluation:
    """mlx.core as the decoder sees it, its `eval` a no-op: the prompt's per-layer evaluation off."""

    def __getattr__(self, name):
        return (lambda *a, **k: None) if name == "eval" else getattr(mx, name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--prompt-tokens", type=int, default=512, help="before the decoded tokens")
    parser.add_argument("--tokens", type=int, default=64, help="decoded tokens per measurement")
    parser.add_argument("--prompts", default="512,2048", help="prompt lengths for the prompt-chunk table")
    parser.add_argument("--steps", default="128,512,2048", help="prompt step sizes for that table")
    args = parser.parse_args(argv)

    from mlx_gemma3n import load
    from mlx_gemma3n.model import text as text_module

    dtype = getattr(mx, args.dtype)
    prompt = np.random.default_rng(0).integers(3, 256_000, size=args.prompt_tokens).tolist()
    print(f"device {mx.default_device()}, {args.dtype}, {args.prompt_tokens}-token prompt, {args.tokens} tokens each")
    print(f"{'PLE table':<10} {'step':<9} {'build ms':>9} {'eval ms':>8} {'sync tok/s':>11} {'pipelined tok/s':>16}")
    for lazy in (True, False):
        model, tokenizer = load(args.model, dtype=dtype, lazy_ple=lazy)
        tokens = {}
        for compiled in (False, True):
            for _ in range(2):  # the first warms kernels and traces
                r = decode(model, prompt, args.tokens, compiled)
            tokens[compiled] = r["tokens"]
            print(f"{'on disk' if lazy else 'resident':<10} {'compiled' if compiled else 'op by op':<9} "
                  f"{r['build_ms']:>9.2f} {r['eval_ms']:>8.2f} {1e3 / (r['build_ms'] + r['eval_ms']):>11.1f} "
                  f"{1e3 / r['pipelined_ms']:>16.1f}", flush=True)
        on_thread = [on_new_thread(decode, model, prompt, args.tokens, True) for _ in range(2)][-1]
        print(f"{'':<10} {'thread':<9} {on_thread['build_ms']:>9.2f} {on_thread['eval_ms']:>8.2f} "
              f"{1e3 / (on_thread['build_ms'] + on_thread['eval_ms']):>11.1f} {1e3 / on_thread['pipelined_ms']:>16.1f}"
              "   (compiled, on a thread of its own)", flush=True)
        engine = through_engine(model, tokenizer, prompt, args.tokens)
        print(f"{'':<10} {'engine':<9} {'':>9} {'':>8} {engine:>11.1f} {'':>16}   (compiled, through stream_tokens)",
              flush=True)
        same = next((i for i, (a, b) in enumerate(zip(tokens[False], tokens[True])) if a != b), len(tokens[True]))
        print(f"  compiled and op-by-op greedy tokens agree for {same}/{len(tokens[True])}")
        if lazy:
            cache = model.make_cache()
            mx.eval(model(mx.array([prompt]), cache=cache))
            counts = kernels_by_name(mx.argmax(model(mx.array([[7]]), cache=cache)[:, -1], axis=-1))
            print(f"  kernels of one op-by-op step: {sum(counts.values())}; most: "
                  + ", ".join(f"{k} {v}" for k, v in counts.most_common(12)))
            print(f"{'prompt':>7} {'step':>5} {'variant':<28} {'TTFT s':>8} {'tok/s':>8} {'peak GB':>8}")
            clear_cache = mx.clear_cache
            for n in map(int, args.prompts.split(",")):
                ids = np.random.default_rng(1).integers(3, 256_000, size=n).tolist()
                for step in map(int, args.steps.split(",")):
                    if step > n:
                        continue
                    for label, run in (("direct, this thread", direct_prompt_seconds),
                                       ("direct, its own thread", lambda *a: on_new_thread(direct_prompt_seconds, *a))):
                        seconds, peak = run(model, ids, step)
                        print(f"{n:>7} {step:>5} {label:<28} {seconds:>8.3f} {n / seconds:>8.0f} {peak:>8.2f}",
                              flush=True)
                    for variant in ("as shipped", "no per-layer eval", "no cache clearing", "neither"):
                        text_module.mx = _WithoutLayerEvaluation() if variant in ("no per-layer eval", "neither") else mx
                        mx.clear_cache = (lambda: None) if variant in ("no cache clearing", "neither") else clear_cache
                        try:
                            seconds, peak = prompt_seconds(model, tokenizer, ids, step)
                        finally:
                            text_module.mx, mx.clear_cache = mx, clear_cache
                        print(f"{n:>7} {step:>5} {variant:<28} {seconds:>8.3f} {n / seconds:>8.0f} {peak:>8.2f}", flush=True)
        del model
        mx.clear_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
