"""The Gemma 3n decoder: AltUp streams around attention + GeGLU layers, Laurel residuals,
Per-Layer Embeddings mixed into every layer, KV sharing in the upper layers.

Semantics follow transformers' `Gemma3nTextModel`; parameter names follow its checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from statistics import NormalDist
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
from ..cache import SlidingWindowCache, attend, attention_mask, last_query, make_full_cache
from ..config import TextConfig
from ..errors import InputError
from ..plan import Plan
from .quantized import quantized_matmul


class RMSNorm(nn.Module):
    """x / rms(x) * weight (weight, not 1 + weight); scale-free where the reference has no weight."""

    def __init__(self, dims: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        if with_scale:
            self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self["weight"] if "weight" in self else None, self.eps)


def soft_cap(x: mx.array, cap: float) -> mx.array:
    return mx.tanh(x / cap) * cap


class ScaledEmbedding(nn.Embedding):
    """An embedding table whose rows are multiplied by a constant, rounded to the table's dtype as the reference does."""

    def __init__(self, num_embeddings: int, dims: int, scale: float):
        super().__init__(num_embeddings, dims)
        self.scale = scale

    def __call__(self, ids: mx.array) -> mx.array:
        rows = super().__call__(ids)
        return rows * self.scale  # a weak scalar: rounded to the rows' dtype, as the reference does

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine", **_):
        return QuantizedScaledEmbedding(*self.weight.shape, self.scale, group_size, bits, mode)


class QuantizedScaledEmbedding(nn.QuantizedEmbedding):
    """A quantized `ScaledEmbedding`. `as_linear` (the tied output head) is unscaled, as there."""

    def __init__(self, num_embeddings: int, dims: int, scale: float, group_size: int, bits: int, mode: str = "affine"):
        super().__init__(num_embeddings, dims, group_size=group_size, bits=bits, mode=mode)
        self.scale = scale

    def __call__(self, ids: mx.array) -> mx.array:
        rows = super().__call__(ids)
        return rows * self.scale  # a weak scalar: rounded to the rows' dtype, as the reference does

    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_matmul(x, self)  # fast on the CPU back-end too (see quantized.py)


# ----------------------------------------------------------------------------- fused elementwise chains
# Everything between two matrix products runs as one compiled function of arrays: MLX fuses its
# elementwise operations into a single kernel, so that a decoded token launches few primitives.
# Constants (eps, the active stream, a layer's sparsity cut-off) are baked into the compiled
# function made for them; weights are always arguments.


@lru_cache(maxsize=None)
def _stream_kernels(eps: float, streams: int, active: int, correct_scale: bool, router_scale: float):
    """The compiled chains around a decoder layer's products; AltUp streams are laid out (B, L, n, D).
    The router's input is its normed stream times `router_scale` (1.0: folded into the norm's weight)."""
    inv_sqrt2 = 1 / math.sqrt(2)
    first_stream = mx.arange(streams)[:, None] == 0  # the per-layer input feeds every stream but the first
    mx.eval(first_stream)

    def router_input(x, norm_w):
        normed = mx.fast.rms_norm(x, norm_w, eps)
        return normed if router_scale == 1.0 else normed * router_scale

    # The AltUp coefficients are products over only n (4) terms: written out as n elementwise
    # terms, in float32 like a matmul's accumulator and rounded where the reference's products
    # round, they take one small kernel instead of a tanh and a matmul, and the streams' mix joins
    # the kernel around it. (Compiled functions slice only their inputs: a slice of an
    # intermediate would split a kernel.)
    @mx.compile
    def coefficients(routed, *columns):
        """tanh(routed) @ w.T for (B, L, n) router outputs and the n columns of a (k, n) w, rounded
        as the reference rounds. The columns come as arrays of their own, made once (`AltUp.columns`):
        slices of w here would be two more graph nodes each, built and evaluated at every token."""
        def modality(j):  # rounded to the streams' dtype, as the reference's
            return mx.tanh(routed[..., j : j + 1].astype(mx.float32)).astype(routed.dtype).astype(mx.float32)

        return sum(modality(j) * column.astype(mx.float32) for j, column in enumerate(columns)).astype(routed.dtype)

    @mx.compile
    def predict(coefs, streams_, input_norm_w):
        """Stream i becomes itself plus sum_j P[i, j] * stream j; returns them, the active one and its norm."""
        coefs = coefs.reshape(*coefs.shape[:-1], streams, streams)  # P[i, j]
        mixed = sum(coefs[..., :, j : j + 1].astype(mx.float32) * streams_[..., j : j + 1, :].astype(mx.float32)
                    for j in range(streams))
        predictions = mixed.astype(streams_.dtype) + streams_
        active_ = predictions[..., active, :]
        return predictions, active_, mx.fast.rms_norm(active_, input_norm_w, eps)

    @mx.compile
    def residual(active_, attn, laurel, x, post_attn_w, post_laurel_w, pre_ffn_w):
        """The attention and Laurel branches mixed into the active stream, and the FFN's normed input."""
        laurel = x + mx.fast.rms_norm(laurel, post_laurel_w, eps)
        h = (active_ + mx.fast.rms_norm(attn, post_attn_w, eps) + laurel) * inv_sqrt2
        return h, mx.fast.rms_norm(h, pre_ffn_w, eps)

    @mx.compile
    def after_ffn(h, ffn, post_ffn_w, router_norm_w):
        h = h + mx.fast.rms_norm(ffn, post_ffn_w, eps)
        return h, router_input(h, router_norm_w)

    @mx.compile
    def correct(coefs, predictions, activated, output_scale):
        """Every stream corrected by the layer's innovation; and the active one, scaled, for the per-layer input."""
        coefs = coefs[..., None] + 1.0  # (B, L, n, 1)
        innovation = activated[..., None, :] - predictions[..., active : active + 1, :]  # (B, L, 1, D)
        corrected = predictions + innovation * coefs
        first = corrected[..., active, :]
        if correct_scale:
            first = (first.astype(output_scale.dtype) * output_scale).astype(first.dtype)
        return corrected, first

    @mx.compile
    def gate_per_layer_input(gate, per_layer_input):
        return nn.gelu_approx(gate) * per_layer_input

    @mx.compile
    def add_per_layer_input(corrected, projected, norm_w):
        return mx.where(first_stream, corrected, corrected + mx.fast.rms_norm(projected, norm_w, eps)[..., None, :])

    @mx.compile
    def spread(embeddings, projected):
        """(B, L, D) embeddings and their (B, L, n - 1, D) projections -> the n streams, each at the embeddings' RMS."""
        target = mx.sqrt(mx.mean(embeddings * embeddings, axis=-1, keepdims=True))[..., None, :]
        return mx.concatenate([embeddings[..., None, :], _match_magnitude(projected, target)], axis=-2)

    @mx.compile
    def merge(first, unembedded, norm_w):
        """The first stream and the others' (B, L, n - 1, D) unembeddings, at its RMS, averaged and normed."""
        target = mx.sqrt(mx.mean(first * first, axis=-1, keepdims=True))[..., None, :]
        everything = mx.concatenate([first[..., None, :], _match_magnitude(unembedded, target)], axis=-2)
        return mx.fast.rms_norm(mx.mean(everything, axis=-2), norm_w, eps)

    return SimpleNamespace(
        router_input=mx.compile(router_input), coefficients=coefficients, predict=predict, residual=residual,
        after_ffn=after_ffn, correct=correct, gate_per_layer_input=gate_per_layer_input,
        add_per_layer_input=add_per_layer_input, spread=spread, merge=merge,
    )


@lru_cache(maxsize=None)
def _attention_kernels(eps: float, head_dim: int, base: float):
    @mx.compile
    def rotated_heads(t, norm_w, offset):
        """(B, L, H * D) -> normed, rotated (B, H, L, D) heads (queries and keys)."""
        heads = mx.fast.rms_norm(t.reshape(*t.shape[:2], -1, head_dim), norm_w, eps).transpose(0, 2, 1, 3)
        return mx.fast.rope(heads, head_dim, traditional=False, base=base, scale=1.0, offset=offset)

    @mx.compile
    def value_heads(t):
        return mx.fast.rms_norm(t.reshape(*t.shape[:2], -1, head_dim), None, eps).transpose(0, 2, 1, 3)

    return SimpleNamespace(rotated_heads=rotated_heads, value_heads=value_heads)


@lru_cache(maxsize=None)
def _geglu(std_multiplier: float | None):
    """GeGLU; in sparse layers the gate keeps only activations above a gaussian top-k cut-off."""

    @mx.compile
    def geglu(gate, up):
        if std_multiplier is not None:
            mean = gate.mean(axis=-1, keepdims=True)
            std = mx.sqrt(mx.var(gate, axis=-1, keepdims=True))
            gate = nn.relu(gate - (mean + std * std_multiplier))
        return nn.gelu_approx(gate) * up

    return geglu


def _match_magnitude(x: mx.array, target_rms: mx.array) -> mx.array:
    rms = mx.sqrt(mx.maximum(mx.mean(x * x, axis=-1, keepdims=True), 1e-5))
    return x * target_rms / rms


class Laurel(nn.Module):
    """Learned augmented residual: a low-rank side path around the normed input (mixed in by `residual`)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.linear_left = nn.Linear(config.hidden_size, config.laurel_rank, bias=False)
        self.linear_right = nn.Linear(config.laurel_rank, config.hidden_size, bias=False)
        self.post_laurel_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MLP(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        width = config.intermediate_size[layer]
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        sparsity = config.activation_sparsity_pattern[layer]
        # The cut-off sits `std_multiplier` standard deviations above the mean, so that a
        # gaussian gate keeps the top (1 - sparsity) of its values.
        self.std_multiplier = NormalDist().inv_cdf(sparsity) if sparsity > 0 else None
        # gate_proj and up_proj merged into one product (`fuse_for_inference`); a plain attribute.
        object.__setattr__(self, "_gate_up", None)

    def __call__(self, x: mx.array, width: int | None = None) -> mx.array:
        """`width` runs only that prefix of the feed-forward (a MatFormer sub-model)."""
        gate_proj, up_proj, down_proj = self.gate_proj, self.up_proj, self.down_proj
        if width is not None and width < gate_proj.weight.shape[0]:
            gate_proj, up_proj = prefix_rows(gate_proj, width), prefix_rows(up_proj, width)
            if not isinstance(down_proj, SplitColumns):
                # Once, at the first narrower width: down_proj is then stored in two blocks (no
                # more memory), so that this prefix needs no copy on every call.
                self.down_proj = down_proj = SplitColumns.split(down_proj, width)
            down_proj = prefix_columns(down_proj, width)
            gate, up = gate_proj(x), up_proj(x)
        else:
            gate, up = self._gate_up(x) if self._gate_up is not None else (gate_proj(x), up_proj(x))
        return down_proj(_geglu(self.std_multiplier)(gate, up))


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.is_kv_shared = layer >= config.first_kv_shared_layer
        dims, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(dims, self.n_heads * self.head_dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        if not self.is_kv_shared:  # shared layers attend over another layer's keys and values
            self.k_proj = nn.Linear(dims, self.n_kv_heads * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(dims, self.n_kv_heads * self.head_dim, bias=bias)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.v_norm = RMSNorm(self.head_dim, config.rms_norm_eps, with_scale=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dims, bias=bias)
        sliding = config.layer_types[layer] == "sliding_attention"
        theta = config.rope_local_base_freq if sliding else config.rope_theta
        self.kernels = _attention_kernels(config.rms_norm_eps, self.head_dim, theta)

    def input_projections(self) -> list[nn.Module]:
        return [self.q_proj] if self.is_kv_shared else [self.q_proj, self.k_proj, self.v_proj]

    def __call__(self, projected: list[mx.array], mask, offset: mx.array, cache=None, shared_kv=None):
        """`projected`: the outputs of `input_projections`; `offset` the position of the first token."""
        B, L, _ = projected[0].shape
        # Queries are rotated at the positions of the tokens being processed, shared layer or not.
        queries = self.kernels.rotated_heads(projected[0], self.q_norm.weight, offset)
        if self.is_kv_shared:
            keys, values = shared_kv
        else:
            keys = self.kernels.rotated_heads(projected[1], self.k_norm.weight, offset)
            values = self.kernels.value_heads(projected[2])
            if cache is not None:
                keys, values = cache.update_and_fetch(keys, values)
        # q and k are RMS-normed, so the reference scales the scores by 1, not 1/sqrt(d).
        out = attend(queries, keys, values, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1)), (keys, values)


class AltUp(nn.Module):
    """Alternating updates: the layer computes only the active stream; the others are predicted
    from all streams before the layer and corrected by its innovation after it (`predict`, `correct`)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        n, dims = config.altup_num_inputs, config.hidden_size
        self.correct_output_scale = mx.zeros((dims,))
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.modality_router = nn.Linear(dims, n, bias=False)
        self.router_norm = RMSNorm(dims, config.rms_norm_eps)
        object.__setattr__(self, "_columns", None)  # set by `split_columns`

    def columns(self, name: str) -> list[mx.array]:
        """The columns of `prediction_coefs`' or `correction_coefs`' weight, one array each."""
        return self._sliced_columns(name) if self._columns is None else self._columns[name]

    def split_columns(self) -> None:
        """The coefficient weights' columns made once, as arrays of their own (a few kB a layer)."""
        columns = {name: [mx.contiguous(c) for c in self._sliced_columns(name)]
                   for name in ("prediction_coefs", "correction_coefs")}
        mx.eval(columns)
        object.__setattr__(self, "_columns", columns)

    def _sliced_columns(self, name: str) -> list[mx.array]:
        weight = self[name].weight
        return [weight[:, j] for j in range(weight.shape[1])]


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        dims, eps = config.hidden_size, config.rms_norm_eps
        self.active = config.altup_active_idx
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config, layer)
        self.input_layernorm = RMSNorm(dims, eps)
        self.post_attention_layernorm = RMSNorm(dims, eps)
        self.pre_feedforward_layernorm = RMSNorm(dims, eps)
        self.post_feedforward_layernorm = RMSNorm(dims, eps)
        self.altup = AltUp(config)
        self.laurel = Laurel(config)
        self.per_layer_input_gate = nn.Linear(dims, config.hidden_size_per_layer_input, bias=False)
        self.per_layer_projection = nn.Linear(config.hidden_size_per_layer_input, dims, bias=False)
        self.post_per_layer_input_norm = RMSNorm(dims, eps)
        shape = (eps, config.altup_num_inputs, config.altup_active_idx, config.altup_correct_scale)
        object.__setattr__(self, "_kernel_shape", shape)  # the kernels' constants but the router scale
        self.kernels = _stream_kernels(*self._kernel_shape, 1.0 / dims)
        # The products of the normed active stream (queries, keys, values, Laurel's left), merged
        # into fewer matrices by `fuse_for_inference`; a plain attribute, not a parameter.
        object.__setattr__(self, "_input_products", None)
        object.__setattr__(self, "_router_norm_weight", None)  # set by `fold_router_scale`

    def input_projections(self) -> list[nn.Module]:
        return self.self_attn.input_projections() + [self.laurel.linear_left]

    def router_norm_weight(self) -> mx.array:
        return self.altup.router_norm.weight if self._router_norm_weight is None else self._router_norm_weight

    def fold_router_scale(self) -> None:
        """The router's input scale (1 / hidden size) folded into its norm's weight, made once:
        a GPU then launches no kernel for it (two per layer and token). Exact for a hidden size
        that is a power of two (E2B's and E4B's 2048), as scaling by one commutes with rounding;
        for any other size the scale stays a product of its own."""
        weight = self.altup.router_norm.weight
        dims = weight.shape[0]
        if dims & (dims - 1):
            return
        object.__setattr__(self, "_router_norm_weight", weight * (1.0 / dims))
        mx.eval(self._router_norm_weight)
        self.kernels = _stream_kernels(*self._kernel_shape, 1.0)

    def project_input(self, x: mx.array) -> list[mx.array]:
        if self._input_products is None:
            return [m(x) for m in self.input_projections()]
        return self._input_products(x)

    def __call__(self, streams, per_layer_input, mask, offset, cache=None, shared_kv=None, ffn_width=None):
        """streams (B, L, n, D) -> the same after this layer, and the keys and values it attended over."""
        k, altup = self.kernels, self.altup
        routed = altup.modality_router(k.router_input(streams[..., self.active, :], self.router_norm_weight()))
        coefs = k.coefficients(routed, *altup.columns("prediction_coefs"))
        predictions, active, x = k.predict(coefs, streams, self.input_layernorm.weight)

        *attention_inputs, laurel = self.project_input(x)
        attn, kv = self.self_attn(attention_inputs, mask, offset, cache, shared_kv)
        h, ffn_input = k.residual(
            active, attn, self.laurel.linear_right(laurel), x, self.post_attention_layernorm.weight,
            self.laurel.post_laurel_norm.weight, self.pre_feedforward_layernorm.weight,
        )
        h, router_input = k.after_ffn(
            h, self.mlp(ffn_input, ffn_width), self.post_feedforward_layernorm.weight, self.router_norm_weight()
        )

        coefs = k.coefficients(altup.modality_router(router_input), *altup.columns("correction_coefs"))
        corrected, first = k.correct(coefs, predictions, h, altup.correct_output_scale)
        gated = k.gate_per_layer_input(self.per_layer_input_gate(first), per_layer_input)
        return k.add_per_layer_input(corrected, self.per_layer_projection(gated), self.post_per_layer_input_norm.weight), kv


class TextModel(nn.Module):
    """Token ids (or their scaled embeddings) -> final normed hidden states."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        n_layers, ple_dims, dims = config.num_hidden_layers, config.hidden_size_per_layer_input, config.hidden_size
        self.embed_tokens = ScaledEmbedding(config.vocab_size, dims, dims**0.5)
        self.layers = [DecoderLayer(config, i) for i in range(n_layers)]
        self.norm = RMSNorm(dims, config.rms_norm_eps)
        self.embed_tokens_per_layer = ScaledEmbedding(
            config.vocab_size_per_layer_input, n_layers * ple_dims, ple_dims**0.5
        )
        self.per_layer_model_projection = nn.Linear(dims, n_layers * ple_dims, bias=False)
        self.per_layer_projection_norm = RMSNorm(ple_dims, config.rms_norm_eps)
        self.altup_projections = [nn.Linear(dims, dims, bias=False) for _ in range(config.altup_num_inputs - 1)]
        self.altup_unembed_projections = [nn.Linear(dims, dims, bias=False) for _ in range(config.altup_num_inputs - 1)]
        self.plan = Plan.full(config)  # the plan a call without one runs
        object.__setattr__(self, "_stream_products", None)  # the altup projections merged (`fuse_for_inference`)

    def per_layer_inputs(self, ids: mx.array) -> mx.array:
        """The token-identity half of the per-layer inputs: (B, L, layers, ple_dims).
        Multimodal ids lie beyond the PLE vocabulary and read row 0, as in the reference."""
        c = self.config
        ids = mx.where((ids >= 0) & (ids < c.vocab_size_per_layer_input), ids, 0)
        rows = self.embed_tokens_per_layer(ids)
        return rows.reshape(*ids.shape, c.num_hidden_layers, c.hidden_size_per_layer_input)

    def project_per_layer_inputs(self, embeddings: mx.array, per_layer_inputs: mx.array | None) -> mx.array:
        c = self.config
        mix = _per_layer_kernel(c.num_hidden_layers, c.hidden_size_per_layer_input, c.hidden_size, c.rms_norm_eps)
        projected = self.per_layer_model_projection(embeddings)
        if per_layer_inputs is None:  # embeddings without ids: the projection alone
            return mix.projection(projected, self.per_layer_projection_norm.weight)
        return mix.average(projected, self.per_layer_projection_norm.weight, per_layer_inputs)

    def make_cache(self, plan: Plan | None = None, kv_bits: int | None = None) -> list:
        """One cache per layer of the plan that computes keys and values: sliding layers keep
        only the window, full layers grow (`kv_bits` wide when given: 8 or 4), KV-shared layers
        need none."""
        window, head_dim = self.config.sliding_window, self.config.head_dim
        return [
            SlidingWindowCache(window) if kind == "sliding_attention" else make_full_cache(kv_bits, head_dim)
            for kind in (plan or self.plan).cache_kinds
        ]

    def __call__(
        self,
        ids: mx.array | None = None,
        cache: list | None = None,
        embeddings: mx.array | None = None,
        per_layer_inputs: mx.array | None = None,
        plan: Plan | None = None,
        outputs: str = "all",
    ) -> mx.array | None:
        """Final normed hidden states of every position (`outputs="all"`); of the last alone
        ("last": the KV-shared layers above the last one with a cache run for it alone, the
        others for every position, as their keys and values are needed); or none ("none": only
        the layers that fill the cache run, for a prompt chunk whose logits nobody needs).
        `embeddings` are scaled like `embed_tokens(ids)`; when both are given, the ids still
        supply the per-layer inputs (so multimodal embeddings keep the token-identity half)."""
        if outputs not in ("all", "last", "none"):
            raise InputError(f'outputs is {outputs!r}; it must be "all", "last" or "none".')
        if embeddings is None:
            if ids is None:
                raise InputError("Give token ids, embeddings, or both.")
            embeddings = self.embed_tokens(ids)
        if per_layer_inputs is None and ids is not None:
            per_layer_inputs = self.per_layer_inputs(ids)
        per_layer_inputs = self.project_per_layer_inputs(embeddings, per_layer_inputs)

        plan = plan or self.plan
        n = embeddings.shape[1]
        offset = cache[0].offset if cache else 0
        masks = {
            kind: cache[plan.first_slot(kind)].mask(n) if cache else
            attention_mask(n, window=self.config.sliding_window if kind == "sliding_attention" else None)
            for kind in set(plan.cache_kinds)
        }
        steps = plan.steps[: plan.last_cache_step + 1] if outputs == "none" else plan.steps

        k = self.layers[0].kernels
        streams = k.spread(embeddings, self.project_streams(embeddings))
        offset = mx.array(offset, mx.int32)  # one array a step: the rotations take it without recompiling
        shared_kv = {}  # step -> its (keys, values), for the KV-shared steps above
        for position, step in enumerate(steps):
            if outputs == "last" and n > 1 and position == plan.last_cache_step + 1:
                # Above here no layer writes keys or values: only the last position goes on.
                streams, per_layer_inputs = streams[:, -1:], per_layer_inputs[:, -1:]
                masks = {kind: last_query(mask) for kind, mask in masks.items()}
                offset = offset + (n - 1)
            layer_cache = cache[step.cache_slot] if cache is not None and step.cache_slot is not None else None
            streams, kv = self.layers[step.layer](
                streams, per_layer_inputs[:, :, step.layer, :], masks[step.attention], offset, layer_cache,
                shared_kv.get(step.kv_source), step.ffn_width,
            )
            if step.feeds_shared:
                shared_kv[position] = kv
            if n > 1 and position < plan.last_cache_step and mx.default_device() == mx.gpu:
                # A GPU back-end holds the temporaries of every command in flight: a prompt
                # evaluated layer by layer needs one layer's activations at a time (E2B, 512
                # tokens, H100: 0.2 GB instead of 0.5-0.7). The CPU back-end frees as it goes
                # and gains nothing.
                mx.eval(streams)
        if outputs == "none":
            return None
        if outputs == "last":
            streams = streams[:, -1:]  # a plan without KV-shared layers ran every position to the end

        unembedded = [proj(streams[..., i + 1, :]) for i, proj in enumerate(self.altup_unembed_projections)]
        return k.merge(streams[..., 0, :], mx.stack(unembedded, axis=-2), self.norm.weight)

    def project_streams(self, embeddings: mx.array) -> mx.array:
        """The altup projections of the embeddings, (B, L, n - 1, D)."""
        joined = self._stream_products.joined(embeddings) if self._stream_products is not None else None
        if joined is not None:
            return joined.reshape(*embeddings.shape[:-1], -1, embeddings.shape[-1])
        return mx.stack([proj(embeddings) for proj in self.altup_projections], axis=-2)


@lru_cache(maxsize=None)
def _per_layer_kernel(layers: int, dims: int, hidden: int, eps: float):
    def projection(projected, norm_w):
        """The model projection of the embeddings, (B, L, layers, dims), normed per layer."""
        projected = (projected * hidden**-0.5).reshape(*projected.shape[:-1], layers, dims)
        return mx.fast.rms_norm(projected, norm_w, eps)

    def average(projected, norm_w, token_inputs):
        """... averaged with the token's own rows."""
        return (projection(projected, norm_w) + token_inputs) * (2**-0.5)

    return SimpleNamespace(projection=mx.compile(projection), average=mx.compile(average))


# ----------------------------------------------------------------------------- merged products


def fuse_for_inference(model: nn.Module, after_each_layer: Callable[[], None] = lambda: None) -> None:
    """Merge the products that read the same input into one matrix each, after the weights have
    loaded (the checkpoint's names stay): per layer, queries, keys, values and Laurel's left side
    of the normed active stream, and the feed-forward's gate and up projections; the three AltUp
    projections of the embeddings; each router's input scale is folded into its norm's weight,
    and the AltUp coefficient weights are split into columns.
    The original layers keep views of the merged weights (no second copy), so the plain path still
    runs. `after_each_layer` may hand back the memory the merge replaced before the next layer's is made."""
    text = getattr(model, "language_model", model)
    for layer in text.layers:
        object.__setattr__(layer, "_input_products", SharedInputProducts(layer.input_projections()))
        object.__setattr__(layer.mlp, "_gate_up", SharedInputProducts([layer.mlp.gate_proj, layer.mlp.up_proj]))
        layer.fold_router_scale()
        layer.altup.split_columns()
        after_each_layer()
    streams = SharedInputProducts(text.altup_projections)
    object.__setattr__(text, "_stream_products", streams)


class SharedInputProducts:
    """Products of one input with several layers, run as one product per run of layers that can
    share a matrix (same kind, dtype, bits and group size). Called: the layers' outputs, in order."""

    def __init__(self, layers: list[nn.Module]):
        self.groups = []  # (merged layer, output widths)
        for run in _compatible_runs(layers):
            self.groups.append((merge_rows(run) if len(run) > 1 else run[0], [m.weight.shape[0] for m in run]))

    def __call__(self, x: mx.array) -> list[mx.array]:
        outputs = []
        for layer, widths in self.groups:
            y = layer(x)
            if len(widths) == 1:
                outputs.append(y)
                continue
            start = 0
            for w in widths:
                outputs.append(y[..., start : start + w])
                start += w
        return outputs

    def joined(self, x: mx.array) -> mx.array | None:
        """The outputs side by side when one product serves every layer, else None."""
        return self.groups[0][0](x) if len(self.groups) == 1 else None


def _kind(layer: nn.Module) -> tuple:
    arrays = _weights(layer)
    if "bias" in layer:
        arrays["bias"] = layer["bias"]
    quantization = (layer.bits, layer.group_size, layer.mode) if "scales" in arrays else None
    return type(layer), tuple(sorted(arrays)), arrays["weight"].dtype, quantization


def _compatible_runs(layers: list[nn.Module]) -> list[list[nn.Module]]:
    runs = []
    for layer in layers:
        if runs and _kind(runs[-1][-1]) == _kind(layer):
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return runs


def merge_rows(layers: list[nn.Module]) -> nn.Module:
    """One layer whose outputs are those of `layers` (of one kind) side by side; each of `layers`
    then holds a view of its rows of the merged weights."""
    names = [k for k in ("weight", "scales", "biases", "bias") if k in layers[0]]
    merged = {k: mx.concatenate([m[k] for m in layers], axis=0) for k in names}
    mx.eval(merged)
    start = 0
    for m in layers:
        rows = slice(start, start + m["weight"].shape[0])
        m.update({k: merged[k][rows] for k in names})
        mx.eval([m[k] for k in names])
        start = rows.stop
    return _with(layers[0], merged)


def prefix_rows(linear: nn.Module, n: int) -> nn.Module:
    """The first `n` outputs of a (possibly quantized) bias-free linear layer: a view, no copy."""
    return _with(linear, {k: v[:n] for k, v in _weights(linear).items()})


def prefix_columns(linear: nn.Module, n: int) -> nn.Module:
    """The part of a bias-free linear layer that reads the first `n` inputs."""
    return linear.prefix(n) if isinstance(linear, SplitColumns) else column_range(linear, 0, n)


def column_range(linear: nn.Module, start: int, stop: int) -> nn.Module:
    """The part of a bias-free linear layer that reads inputs [start, stop): a strided view (which a
    product copies). Quantized weights are cut on group boundaries."""
    weights = _weights(linear)
    if "scales" in weights:
        group = linear.group_size
        if start % group or stop % group:
            raise InputError(f"A feed-forward width of {stop - start} does not fall on the quantization's "
                             f"{group}-wide groups: choose a multiple of {group}.")

        def column(name: str, n: int) -> int:
            return n * linear.bits // 32 if name == "weight" else n // group

        weights = {k: v[:, column(k, start) : column(k, stop)] for k, v in weights.items()}
    else:
        weights = {"weight": weights["weight"][:, start:stop]}
    return _with(linear, weights)


def input_width(linear: nn.Module) -> int:
    if isinstance(linear, SplitColumns):
        return linear.cut + input_width(linear.tail)
    return linear.weight.shape[1] * 32 // linear.bits if "scales" in linear else linear.weight.shape[1]


class SplitColumns(nn.Module):
    """A bias-free linear layer stored as two blocks of its inputs, [0, cut) and [cut, width): the
    prefix up to `cut` is then a whole matrix, where a column slice of one matrix would be copied by
    every product (a MatFormer sub-model runs the first 8192 of 16384 inputs of each down_proj)."""

    def __init__(self, head: nn.Module, tail: nn.Module, cut: int):
        super().__init__()
        self.head, self.tail, self.cut = head, tail, cut

    @classmethod
    def split(cls, linear: nn.Module, cut: int) -> "SplitColumns":
        def contiguous(part):
            part = _with(part, {k: mx.contiguous(v) for k, v in _weights(part).items()})
            mx.eval(part.parameters())
            return part

        return cls(contiguous(column_range(linear, 0, cut)), contiguous(column_range(linear, cut, input_width(linear))), cut)

    def prefix(self, n: int) -> nn.Module:
        if n == self.cut:
            return self.head
        if n < self.cut:
            return column_range(self.head, 0, n)
        return SplitColumns(self.head, column_range(self.tail, 0, n - self.cut), self.cut)

    def __call__(self, x: mx.array) -> mx.array:
        return self.head(x[..., : self.cut]) + self.tail(x[..., self.cut :])


def _weights(linear: nn.Module) -> dict[str, mx.array]:
    return {k: linear[k] for k in ("weight", "scales", "biases") if k in linear}


def _with(linear: nn.Module, weights: dict[str, mx.array]) -> nn.Module:
    """A shallow copy of `linear` holding `weights`: the layer's own code runs on the slice."""
    sliced = type(linear).__new__(type(linear))
    sliced.__dict__.update(linear.__dict__)
    dict.update(sliced, linear)
    dict.update(sliced, weights)
    return sliced
