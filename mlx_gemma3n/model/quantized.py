"""Products with affine-quantized weights that are fast on MLX's CPU back-end as well.

On the CPU, MLX's quantized kernel is a loop over rows (its cost grows with the row count: ~30 ms
per row of a 2048x2048 4-bit matrix in bfloat16) and is ~8x slower in bfloat16 than in float32.
There, a product runs in float32, and from `DEQUANTIZE_FROM_ROWS` rows on (prompt chunks, the
towers) the weight is dequantized to float32, one block of rows at a time, for the float GEMM:
32 rows through a 2048x8192 4-bit matrix take 0.05 s instead of 0.5 s in float32's kernel and
~4 s in bfloat16's, by its 16-row time (`benchmarks/cpu_quantized_matmul.py`, 2-core x86 with
OpenBLAS). The result is cast back to the input's dtype.

Other devices use MLX's kernel as is. On an H100 (MLX 0.32.4, bfloat16, 4-bit) dequantizing for
the dense GEMM made E2B's feed-forward products 1.7-1.9x faster at 512 rows (its attention output
product no faster), but a 2048-token prompt at 512 tokens a step only ~7% faster, for 0.2 GB more
peak memory (about one layer's weights in bfloat16, which the layer's commands in flight hold).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

# Below this, float32's kernel is faster than dequantizing; the two cross at 1-2 rows for E2B's
# 2048x2048 and at 2-3 rows for its 8192x2048, 2048x8192 and 262400x2048 (the tied head) matrices.
DEQUANTIZE_FROM_ROWS = 4
# Weights dequantized at a time: 4 MB of float32 stay in cache for the GEMM that follows. A whole
# 8192x2048 matrix at once took up to 2x as long at few rows; smaller blocks only add primitives.
BLOCK_WEIGHTS = 1 << 20
# Float32 copies of 16-bit scales and biases made at a time by MLX's kernel path.
CAST_BYTES = 4 << 20


def dequantizes(x: mx.array) -> bool:
    """Whether a product of `x` with a quantized weight goes through the float GEMM."""
    return mx.default_device() == mx.cpu and math.prod(x.shape[:-1]) >= DEQUANTIZE_FROM_ROWS


def quantized_matmul(x: mx.array, layer: nn.Module) -> mx.array:
    """x @ W.T for the quantized weight W of `layer` (an `nn.QuantizedLinear` or
    `nn.QuantizedEmbedding`, whose `as_linear` this also serves); no bias."""
    if mx.default_device() != mx.cpu or layer.mode != "affine":
        return mx.quantized_matmul(x, layer["weight"], layer["scales"], layer.get("biases"), transpose=True,
                                   group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    return (dequantized_product if dequantizes(x) else kernel_product_f32)(x, layer)


def kernel_product_f32(x: mx.array, layer: nn.Module) -> mx.array:
    """MLX's quantized kernel, in float32. Scales and biases stored in 16 bits are cast for the
    product, `CAST_BYTES` of float32 copies at a time (the tied output head would otherwise cast
    42 MB for each token E4B decodes)."""
    w, scales, biases = layer["weight"], layer["scales"], layer["biases"]
    x32 = x.astype(mx.float32)

    def product(rows: slice) -> mx.array:
        return mx.quantized_matmul(x32, w[rows], scales[rows].astype(mx.float32), biases[rows].astype(mx.float32),
                                   transpose=True, group_size=layer.group_size, bits=layer.bits).astype(x.dtype)

    cast_bytes_per_row = 0 if scales.dtype == mx.float32 else 8 * scales.shape[-1]
    step = max(1, CAST_BYTES // cast_bytes_per_row) if cast_bytes_per_row else w.shape[0]
    return in_row_blocks(product, w.shape[0], step)


def dequantized_product(x: mx.array, layer: nn.Module) -> mx.array:
    """The float32 GEMM with the weight dequantized `BLOCK_WEIGHTS` at a time."""
    w, scales, biases = layer["weight"], layer["scales"], layer["biases"]
    x32 = x.astype(mx.float32)

    def product(rows: slice) -> mx.array:
        weight = dequantize_f32(w[rows], scales[rows], biases[rows], layer.group_size, layer.bits)
        return (x32 @ weight.T).astype(x.dtype)

    step = max(1, BLOCK_WEIGHTS * layer.bits // (32 * w.shape[-1]))
    return in_row_blocks(product, w.shape[0], step)


def in_row_blocks(product, rows: int, step: int) -> mx.array:
    """`product(rows)` for the whole of a weight's `rows`, `step` of them at a time, side by side
    (each block already in the input's dtype: a 16-bit result is then never held in float32 whole).
    Each block is evaluated before the next is made, so that its float copies go first: left to
    the graph, MLX makes every block's copies before any product (E4B 4-bit, 8 + 4 tokens: 0.6 GB
    more at the peak; 6 E4B MLPs in a row: 105 MB over the weights against 8 MB, for the same time)."""
    if step >= rows:
        return product(slice(None))
    parts = []
    for start in range(0, rows, step):
        parts.append(product(slice(start, start + step)))
        mx.eval(parts[-1])
    return mx.concatenate(parts, axis=-1)


def dequantize_f32(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """The float32 matrix that affine-quantized `w` stands for. For widths that tile a 32-bit word
    (2, 4, 8 bits) unpacked with shifts, 2.5-4x faster than MLX's CPU `dequantize`."""
    if 32 % bits:
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, dtype=mx.float32)
    rows = w.shape[0]
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    q = ((w[..., None] >> shifts) & ((1 << bits) - 1)).reshape(rows, -1, group_size).astype(mx.float32)
    return (q * scales[..., None].astype(mx.float32) + biases[..., None].astype(mx.float32)).reshape(rows, -1)


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` through `quantized_matmul`."""

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(x, self)
        return y + self["bias"] if "bias" in self else y

