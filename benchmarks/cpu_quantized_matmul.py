"""Which way to multiply by a quantized weight on the CPU back-end, by number of rows: MLX's
quantized kernel in the model's dtype, the same kernel in float32, or the float GEMM (BLAS) with
the weight dequantized by MLX (whole; in the input's dtype or float32) or by us (in blocks, float32).
The E2B shapes; the threshold in `mlx_gemma3n/model/quantized.py` comes from this table.

    export LD_PRELOAD=$(dpkg -L libopenblas0-pthread | grep '/libblas.so.3$')
    python benchmarks/cpu_quantized_matmul.py [--head]
    python benchmarks/cpu_quantized_matmul.py --rows 1,128,512,2048 --repeats 10   # on a GPU: prompt chunks

"MLX dequantize" multiplies in the input's dtype, the way a GPU would if dequantizing a layer once
per prompt chunk beat MLX's quantized kernel there.

Prints the median of `--repeats` runs (min-max in brackets), in ms. A method whose time passes
`--give-up` seconds is not run at larger row counts.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma3n.model.quantized import dequantized_product, kernel_product_f32

SHAPES = {"q/o 2048x2048": (2048, 2048), "gate/up 8192x2048": (8192, 2048), "down 2048x8192": (2048, 8192)}
HEAD = {"head 262400x2048": (262400, 2048)}
ROWS = (1, 2, 4, 8, 16, 32, 128)


def timed(f, repeats: int) -> list[float]:
    mx.eval(f())  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(f())
        times.append(time.perf_counter() - start)
    return sorted(times)


def methods(layer: nn.QuantizedLinear):
    def mlx_dequantize(x):
        w = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits,
                          dtype=x.dtype)
        return x @ w.T

    def mlx_dequantize_f32(x):
        w = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits,
                          dtype=mx.float32)
        return (x.astype(mx.float32) @ w.T).astype(x.dtype)

    return {"kernel": layer, "kernel f32": lambda x: kernel_product_f32(x, layer),
            "MLX dequantize": mlx_dequantize, "MLX dequantize f32": mlx_dequantize_f32,
            "ours": lambda x: dequantized_product(x, layer)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--head", action="store_true", help="also the 262400-row output head (2.1 GB in float32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--give-up", type=float, default=3.0)
    args = parser.parse_args(argv)
    dtype = getattr(mx, args.dtype)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"device {mx.default_device()}, input {args.dtype}, {args.bits}-bit, group size {args.group_size}; "
          "ms, median [min-max]")
    for name, shape in {**SHAPES, **(HEAD if args.head else {})}.items():
        layer = nn.QuantizedLinear.from_linear(nn.Linear(shape[1], shape[0], bias=False), args.group_size, args.bits)
        layer.set_dtype(dtype)
        mx.eval(layer.parameters())
        slow = set()
        for n in rows:
            x = mx.random.normal((1, n, shape[1])).astype(dtype)
            cells = []
            for method, f in methods(layer).items():
                if method in slow:
                    cells.append(f"{method} {'-':>8}")
                    continue
                t = timed(lambda: f(x), args.repeats)
                if t[len(t) // 2] > args.give_up:
                    slow.add(method)
                cells.append(f"{method} {t[len(t) // 2] * 1e3:8.1f} [{t[0] * 1e3:.1f}-{t[-1] * 1e3:.1f}]")
            print(f"{name:<18} rows {n:4d}  " + "  ".join(cells), flush=True)
        del layer
        mx.clear_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
