"""The quantized KV cache: what it costs in accuracy, what it saves in memory, and (--speed)
which way attention over it is faster on this machine.

    export LD_PRELOAD=$(dpkg -L libopenblas0-pthread | grep '/libblas.so.3$')
    python benchmarks/kv_cache.py [--speed]

1. Accuracy: the next-token distribution with each cache against the float32 cache, on a
   mid-sized random checkpoint (E2B's head shape: 8 query heads over 2 key/value heads of 256
   dims, full attention every 5th layer, KV sharing; 256 hidden, 10 layers, window 64), float32
   weights: a prompt of 8 windows fed in chunks, then decoded tokens fed to every cache alike.
   A random E2B is too slow for this on a CPU, and a random model's flat distribution feels the
   rounding more than a trained one's: read the numbers as an upper bound. "bf16 float" is a
   float cache that rounds to bfloat16, what a bfloat16 model's cache holds: the scale to judge by.
2. Memory: bytes per token of E2B's caches from its config, the same measured on E2B-shaped
   caches filled to 32k positions, and E2B at 32k context (weights + caches).
3. --speed: attention over 4k and 16k cached positions for 1 query (decode) and 128 (a prompt
   chunk): float cache, quantized through MLX's quantized kernel, quantized dequantized for the
   fused attention. Median of --repeats runs, min-max in brackets, ms.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import make_checkpoint  # noqa: E402

from mlx_gemma3n.cache import (  # noqa: E402
    KVCache, QuantizedKVCache, SlidingWindowCache, attend, attend_dequantized, attend_quantized,
)
from mlx_gemma3n.config import ModelConfig  # noqa: E402
from mlx_gemma3n.loading import load_model  # noqa: E402
from mlx_gemma3n.plan import Plan  # noqa: E402

E2B_WEIGHTS_GB = 1.30  # 4-bit weights kept in memory (the PLE table stays on disk)
MID_LAYERS = 10
MID = dict(
    hidden_size=256, head_dim=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=MID_LAYERS,
    layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(MID_LAYERS)],
    intermediate_size=[1024] * MID_LAYERS, activation_sparsity_pattern=[0.95] * 3 + [0.0] * (MID_LAYERS - 3),
    sliding_window=64, num_kv_shared_layers=4, hidden_size_per_layer_input=32, laurel_rank=16,
)
WINDOWS, CHUNK, DECODED = 8, 128, 32


class Bfloat16Cache(KVCache):
    """A float cache holding bfloat16 keys and values, returned as float32."""

    def update_and_fetch(self, keys, values):
        keys, values = super().update_and_fetch(keys.astype(mx.bfloat16), values.astype(mx.bfloat16))
        return keys.astype(mx.float32), values.astype(mx.float32)


VARIANTS = {
    "bf16 float": Bfloat16Cache,
    "8-bit g64": lambda: QuantizedKVCache(8, 64),
    "4-bit g64": lambda: QuantizedKVCache(4, 64),
    "4-bit g32": lambda: QuantizedKVCache(4, 32),
}


def with_full_caches(model, make) -> list:
    return [c if isinstance(c, SlidingWindowCache) else make() for c in model.make_cache()]


def run(model, cache, prompt: np.ndarray, tokens: list[int]) -> np.ndarray:
    """Log-probabilities after the prompt and after each of `tokens`: (1 + len(tokens), vocab)."""
    for start in range(0, prompt.shape[1], CHUNK):
        logits = model(mx.array(prompt[:, start : start + CHUNK]), cache=cache)[0, -1:]
    steps = [logits]
    for token in tokens:
        steps.append(model(mx.array([[token]]), cache=cache)[0, -1:])
    logits = mx.concatenate(steps).astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), dtype=np.float64)


def accuracy(seed: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(Path(tmp), MID, seed=seed)
        model, _ = load_model(tmp, dtype=mx.float32)
        compare(model, seed)


def compare(model, seed: int) -> None:
    prompt = np.random.RandomState(seed).randint(0, 262_144, size=(1, WINDOWS * MID["sliding_window"]))
    # The decoded tokens: the float cache's greedy choices, fed to every cache alike.
    cache, tokens = model.make_cache(), []
    for start in range(0, prompt.shape[1], CHUNK):
        logits = model(mx.array(prompt[:, start : start + CHUNK]), cache=cache)
    for _ in range(DECODED):
        tokens.append(int(mx.argmax(logits[0, -1])))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)
    reference = run(model, model.make_cache(), prompt, tokens)
    print(f"\nAccuracy vs the float32 cache (mid-sized random checkpoint, seed {seed}, {prompt.shape[1]}-token "
          f"prompt in chunks of {CHUNK}, {DECODED} decoded; {1 + DECODED} next-token distributions)")
    print(f"{'cache':<12}{'KL median':>11}{'KL max':>10}{'max |Δlogprob|':>16}{'same top-1':>12}")
    p = np.exp(reference)
    for name, make in VARIANTS.items():
        logprobs = run(model, with_full_caches(model, make), prompt, tokens)
        kl = (p * (reference - logprobs)).sum(axis=-1)
        same = (logprobs.argmax(-1) == reference.argmax(-1)).mean()
        print(f"{name:<12}{np.median(kl):>11.2e}{kl.max():>10.2e}{np.abs(reference - logprobs).max():>16.3f}"
              f"{same:>12.0%}")


def memory(context: int) -> None:
    from random_checkpoint import hf_config

    config = ModelConfig.from_dict(hf_config("E2B").to_dict()).text
    kinds = Plan.full(config).cache_kinds
    full, sliding = kinds.count("full_attention"), kinds.count("sliding_attention")
    values_per_token = 2 * config.num_key_value_heads * config.head_dim  # keys and values, one layer
    print(f"\nE2B: {len(kinds)} layers with caches of their own ({full} full-attention, {sliding} sliding, window "
          f"{config.sliding_window}); {config.num_hidden_layers - len(kinds)} KV-shared layers hold none")
    chunk = mx.random.normal((1, config.num_key_value_heads, 2048, config.head_dim)).astype(mx.bfloat16)
    window = SlidingWindowCache(config.sliding_window)
    for _ in range(2):  # beyond the window: its final size
        window.update_and_fetch(chunk[:, :, :512], chunk[:, :, :512])
    sliding_bytes = sliding * window.nbytes
    print(f"{'full caches':<13}{'bits/value':>11}{'B/token (config)':>18}{'B/token (measured)':>20}"
          f"{'caches':>10}{'E2B':>8}{'attention transient':>22}{'E2B prefill peak':>18}")
    print(f"{'':<13}{'':>11}{'':>18}{'':>20}{'@' + str(context // 1024) + 'k':>10}{'@' + str(context // 1024) + 'k':>8}"
          f"{'decode / 128 queries':>22}")
    for name, bits, make in (("bf16", 16, KVCache), ("8-bit g64", 8.5, lambda: QuantizedKVCache(8)),
                             ("4-bit g64", 4.5, lambda: QuantizedKVCache(4))):
        cache = make()
        for _ in range(context // chunk.shape[2]):
            kv = cache.update_and_fetch(chunk, chunk)
            mx.eval(cache.state)
        transients = [attention_transient(n, kv, config) for n in (1, 128)]
        per_token = full * values_per_token * bits / 8
        measured = full * cache.nbytes / context
        total = (full * cache.nbytes + sliding_bytes) / 1e9
        print(f"{name:<13}{bits:>11}{per_token:>18,.0f}{measured:>20,.0f}{total:>7.3f} GB{E2B_WEIGHTS_GB + total:>5.2f} GB"
              f"{transients[0]:>9.0f} / {transients[1]:>3.0f} MB{E2B_WEIGHTS_GB + total + transients[1] / 1e3:>15.2f} GB")
        del kv, cache
    print(f"(caches: the full ones and the {sliding} sliding ones, bf16, {sliding_bytes / 1e6:.1f} MB after 512-token "
          f"chunks; E2B = {E2B_WEIGHTS_GB} GB of weights + caches; attention transient: one layer's, measured on "
          f"{mx.default_device()}; prefill peak adds it, other activations of a chunk not counted)")


def attention_transient(n: int, kv, config) -> float:
    """MB that one layer's attention of `n` new queries over `kv` allocates beyond its inputs."""
    queries = mx.random.normal((1, config.num_attention_heads, n, config.head_dim)).astype(mx.bfloat16)
    mx.eval(queries)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(attend(queries, *kv, scale=1.0, mask=None if n == 1 else "causal"))
    return (mx.get_peak_memory() - before) / 1e6


def timed(f, repeats: int) -> str:
    mx.eval(f())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(f())
        times.append(1e3 * (time.perf_counter() - start))
    times.sort()
    return f"{times[len(times) // 2]:8.1f} [{times[0]:.0f}-{times[-1]:.0f}]"


def speed(contexts: list[int], queries_per_head: list[int], dtype, repeats: int) -> None:
    print(f"\nAttention, E2B heads (8 over 2, 256 dims), {dtype}, device {mx.default_device()}; ms")
    print(f"{'cached':>7}{'queries':>8}  {'float cache':>18}{'8-bit kernel':>18}{'8-bit dequantized':>20}")
    for context in contexts:
        keys = mx.random.normal((1, 2, context, 256)).astype(dtype)
        float_cache, quantized_cache = KVCache(), QuantizedKVCache(8)
        k, v = float_cache.update_and_fetch(keys, keys)
        qk, qv = quantized_cache.update_and_fetch(keys, keys)
        mx.eval(k, v, quantized_cache.state)
        for n in queries_per_head:
            queries = mx.random.normal((1, 8, n, 256)).astype(dtype) * 0.05
            mask = None if n == 1 else "causal"
            row = [
                timed(lambda: mx.fast.scaled_dot_product_attention(queries, k, v, scale=1.0, mask=mask), repeats),
                timed(lambda: attend_quantized(queries, qk, qv, 1.0), repeats),  # unmasked: the kernel has no mask
                timed(lambda: attend_dequantized(queries, qk, qv, 1.0, mask), repeats),
            ]
            print(f"{context:>7}{n:>8}  {row[0]:>18}{row[1]:>18}{row[2]:>20}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--speed", action="store_true", help="only the attention timings")
    parser.add_argument("--memory-only", action="store_true", help="no accuracy run")
    parser.add_argument("--contexts", default="4096,16384")
    parser.add_argument("--queries", default="1,128", help="queries per head (tokens of a chunk)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.speed:
        speed([int(c) for c in args.contexts.split(",")], [int(n) for n in args.queries.split(",")],
              getattr(mx, args.dtype), args.repeats)
        return 0
    memory(args.context)
    if not args.memory_only:
        accuracy(args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
