"""Prompt speed of a quantized Gemma 3n on MLX's CPU back-end: our quantized layers against MLX's
own `nn.QuantizedLinear`, in seconds per prompt token, median of several processes.

    python benchmarks/random_checkpoint.py --size E2B --out /tmp/gemma3n-E2B-random
    python -m mlx_gemma3n.convert --model /tmp/gemma3n-E2B-random --out /tmp/gemma3n-E2B-q4 -q
    export LD_PRELOAD=$(dpkg -L libopenblas0-pthread | grep '/libblas.so.3$')
    python benchmarks/cpu_prefill.py --model /tmp/gemma3n-E2B-q4

The prompt goes through the model as our generation loop sends a prompt of one chunk: every
token through the layers that fill the cache, the last one alone on through the KV-shared layers,
whose logits give the first reply token. MLX's layers take 11-14 s per token on a 2-core CPU, so
they get a shorter prompt (`--mlx-tokens`): their time grows linearly with the rows, so the figure
per token holds for longer prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def measure(model_path: str, layers: str, tokens: int, dtype) -> dict:
    from mlx_gemma3n.loading import load_model
    from mlx_gemma3n.model.quantized import QuantizedLinear

    model = load_model(model_path, dtype=dtype)[0]
    if layers == "mlx":
        for _, m in model.named_modules():
            if isinstance(m, QuantizedLinear):
                m.__class__ = nn.QuantizedLinear  # the same arrays through MLX's own layer
    mx.eval(model.parameters())
    prompt = mx.array(np.random.default_rng(0).integers(3, 256_000, size=(1, tokens)))
    cache = model.make_cache()

    start = time.perf_counter()
    mx.eval(mx.argmax(model(prompt, cache=cache, outputs="last")[:, -1], axis=-1))
    return {"s_per_token": (time.perf_counter() - start) / tokens}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a quantized Gemma 3n checkpoint directory")
    parser.add_argument("--tokens", type=int, default=32, help="prompt tokens through our layers")
    parser.add_argument("--mlx-tokens", type=int, default=2, help="prompt tokens through MLX's layers")
    parser.add_argument("--runs", type=int, default=3, help="processes per variant")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--child", choices=["ours", "mlx"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        tokens = args.tokens if args.child == "ours" else args.mlx_tokens
        print(json.dumps(measure(args.model, args.child, tokens, getattr(mx, args.dtype))))
        return 0

    print(f"device {mx.default_device()}, dtype {args.dtype}, {args.runs} processes each; "
          "s, median [min-max]", flush=True)
    print(f"{'layers':<22} {'tokens':>6} {'s/prompt token':>22}")
    for layers, tokens in (("ours", args.tokens), ("mlx", args.mlx_tokens)):
        runs = []
        for _ in range(args.runs):
            command = [sys.executable, __file__, "--model", args.model, "--child", layers, "--tokens", str(args.tokens),
                       "--mlx-tokens", str(args.mlx_tokens), "--dtype", args.dtype]
            runs.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))

        def cell(key):
            values = sorted(r[key] for r in runs)
            return f"{statistics.median(values):.3f} [{values[0]:.3f}-{values[-1]:.3f}]"

        name = "mlx_gemma3n" if layers == "ours" else "MLX nn.QuantizedLinear"
        print(f"{name:<22} {tokens:>6} {cell('s_per_token'):>22}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
