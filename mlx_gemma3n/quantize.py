"""Quantization policy: which weights are quantized, at how many bits, and how a module whose
checkpoint carries quantized weights is turned into MLX quantized layers.

Weights are stored as MLX stores them (`weight` packed into uint32, `scales`, `biases`; affine
mode), which is also mlx-lm's and mlx-vlm's layout. Bits and group size are read from the
shapes, so a checkpoint quantized with any recipe (uniform or mixed) loads the same way.
"""

from __future__ import annotations

import math
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map_with_path

from .errors import InputError
from .model.quantized import QuantizedLinear

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
# One scale and bias (bf16) per 128 weights: 4.25 bits per weight at 4 bits instead of 4.5 at 64
# (E2B's text weights 1.30 GB instead of 1.37, E4B's 2.40 instead of 2.53), for a KL 6% above
# group size 64's (0.070 against 0.066 nats, README, "Memory and conversion").
DEFAULT_GROUP_SIZE = 128


def quantized_shape_info(weight_shape, scales_shape, in_dims: int) -> tuple[int, int] | None:
    """(bits, group_size) of an affine-quantized (rows, in_dims) matrix, from its stored shapes;
    None if the shapes are not a quantization of that matrix."""
    packed, groups = weight_shape[-1], scales_shape[-1]
    if groups == 0 or in_dims % groups or (packed * 32) % in_dims:
        return None
    bits, group_size = packed * 32 // in_dims, in_dims // groups
    if bits not in BITS or group_size not in (*GROUP_SIZES, 16):
        return None
    return bits, group_size


def apply_quantization(module: nn.Module, weights: dict[str, mx.array], what: str = "model") -> None:
    """Replace every Linear/Embedding (or pointwise convolution) of `module` whose weights come
    with `scales` by its quantized counterpart (Linear: ours, fast on the CPU too), with the bits
    and group size its stored shapes imply."""
    quantized = {name[: -len(".scales")] for name in weights if name.endswith(".scales")}
    if missing := sorted(quantized - {path for path, _ in module.named_modules()}):
        raise ValueError(f"The {what} stores quantized weights for layers it does not have (e.g. {missing[0]}).")

    def to_quantized(path: str, m: nn.Module) -> nn.Module:
        if path not in quantized:
            return m
        if not isinstance(m, (nn.Linear, nn.Embedding)) and not getattr(m, "pointwise", False):
            raise ValueError(f"The {what} stores {path} quantized, but it is not a linear, embedding or pointwise "
                             "convolution layer.")
        if path + ".biases" not in weights:
            raise ValueError(f"The {what} stores {path} quantized without biases: only affine quantization is supported.")
        shapes = weights[path + ".weight"].shape, weights[path + ".scales"].shape
        info = quantized_shape_info(*shapes, m.weight.shape[-1])  # input width: last in every layout
        if info is None:
            raise ValueError(
                f"The {what} stores {path} quantized with shapes {tuple(shapes[0])} / {tuple(shapes[1])}, "
                f"which do not fit a {tuple(m.weight.shape)} weight."
            )
        bits, group_size = info
        if isinstance(m, nn.Linear):
            return QuantizedLinear.from_linear(m, group_size=group_size, bits=bits)
        return m.to_quantized(group_size=group_size, bits=bits)

    # The walk of `nn.quantize`, which cannot make our QuantizedLinear.
    module.update_modules(tree_map_with_path(to_quantized, module.leaf_modules(), is_leaf=nn.Module.is_module))


# Recipes. A recipe maps our module path (a Linear or Embedding weight) to its bits, or None
# for "keep it in floating point". Modules whose input width the group size does not divide
# (AltUp's 4-wide coefficient layers, Laurel's and the per-layer projection's narrow inputs)
# always stay in floating point.
#
# "mixed" keeps at 8 bits the groups whose 8-bit copy buys the most KL per byte: Laurel, the
# AltUp projections and router, the per-layer-input paths and the tied embedding (also the output
# head), plus the multimodal embedders. `benchmarks/memory.py --kl` measured it on a random E2B
# whose residual branches are scaled down so that it is not chaotic (README, "Memory and
# conversion"): with branches at 0.1 and 0.3 these four groups led (at 0.5 attention edged past
# the per-layer paths), the MLP always came last, and mixed cut the KL of uniform 4-bit by
# 23-72% for 6 points more of the bf16 size. Real weights may rank them differently; the same
# command measures them.
_MIXED_8BIT = (
    r"^language_model\.embed_tokens$",
    r"^language_model\.per_layer_model_projection$",
    r"^language_model\.altup_(un)?embed_projections\.\d+$",
    r"\.per_layer_input_gate$",
    r"\.per_layer_projection$",
    r"\.laurel\.linear_(left|right)$",
    r"\.altup\.modality_router$",
    r"^embed_(audio|vision)\.",
)
# "compact" (4 bits only) stores the MLP of the KV-shared layers (E2B's last 10, E4B's last 15) at
# 3 bits, for E4B to fit a smaller memory budget: the MLP is 78% of E4B's text weights. Of the
# parts of the MLP measured by `benchmarks/memory.py --kl --kl-set mlp` (README, "Memory and
# conversion"), it cost the least KL per byte saved: 0.0036 nats per point of the bf16 size, against
# 0.0064 for down_proj in every layer, 0.0076 for up_proj, 0.011 for the layers before the shared
# ones and 0.015 for gate_proj (whose outputs the sparse layers threshold).
COMPACT_BITS = 3
_MLP_LAYER = re.compile(r"^language_model\.layers\.(\d+)\.mlp\.")
RECIPES = ("uniform", "mixed", "compact")
# The vision tower's pointwise convolutions (99% of its 294 M parameters) are kept at 8 bits or
# more in every recipe: 0.31 GB instead of 0.59 in bf16, which lets E2B take an image and 30 s of
# audio within 2.5 GB with its towers loaded, while no trained checkpoint can be measured here at
# 4 bits (random weights do not show what rounding costs a trained encoder).
VISION_BITS = 8


def recipe_bits(path: str, bits: int, recipe: str = "uniform", overrides: dict[str, int | None] | None = None,
                first_kv_shared_layer: int | None = None) -> int | None:
    """Bits for the weight of our module `path` under `recipe` (None: keep floating point).
    "compact" needs the text config's `first_kv_shared_layer`."""
    for pattern, value in (overrides or {}).items():
        if re.search(pattern, path):
            return value
    if recipe not in RECIPES:
        raise InputError(f"Unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}.")
    if path.startswith("vision_tower."):
        return max(bits, VISION_BITS)
    if recipe == "mixed" and any(re.search(p, path) for p in _MIXED_8BIT):
        return max(bits, 8)
    if recipe == "compact" and (m := _MLP_LAYER.match(path)):
        if first_kv_shared_layer is None:
            raise InputError("The compact recipe needs the model's first KV-shared layer: pass first_kv_shared_layer.")
        return min(bits, COMPACT_BITS) if int(m[1]) >= first_kv_shared_layer else bits
    return bits


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The (rows, columns) a weight of `shape` is quantized as: a Linear/Embedding matrix, or a
    pointwise (1x1) convolution kernel in either layout, (O, I, 1, 1) or (O, 1, 1, I); None for
    any other tensor (larger kernels are not matrices)."""
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 4 and (tuple(shape[2:]) == (1, 1) or tuple(shape[1:3]) == (1, 1)):
        return shape[0], math.prod(shape[1:])
    return None


def quantizable(shape: tuple[int, ...], group_size: int) -> bool:
    """A weight matrix (`as_matrix`) whose rows split into whole groups (the PLE table is handled
    by the PLE store)."""
    matrix = as_matrix(shape)
    return matrix is not None and matrix[1] % group_size == 0 and matrix[1] >= group_size


def fake_quantize(w: mx.array, bits: int, group_size: int) -> mx.array:
    """w rounded through the quantizer, back in its dtype: the same values a quantized layer
    multiplies with, for fast measurement with float kernels."""
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    return mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits).astype(w.dtype)


def kl_divergence(reference_logits: mx.array, logits: mx.array) -> float:
    """Mean over positions of KL(reference || other) of the next-token distributions, in nats."""
    p = reference_logits.astype(mx.float32)
    q = logits.astype(mx.float32)
    logp = p - mx.logsumexp(p, axis=-1, keepdims=True)
    logq = q - mx.logsumexp(q, axis=-1, keepdims=True)
    kl = mx.sum(mx.exp(logp) * (logp - logq), axis=-1)
    return float(np.mean(np.array(kl)))
