"""The Gemma 3n decoder: AltUp streams around attention + GeGLU layers, Laurel residuals,
Per-Layer Embeddings mixed into every layer, KV sharing in the upper layers.

Semantics follow transformers' `Gemma3nTextModel`; parameter names follow its checkpoints.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import mlx.core as mx
import mlx.nn as nn
from ..cache import SlidingWindowCache, attend, attention_mask, make_full_cache
from ..config import TextConfig
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
        return rows * mx.array(self.scale, dtype=rows.dtype)

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine", **_):
        return QuantizedScaledEmbedding(*self.weight.shape, self.scale, group_size, bits, mode)


class QuantizedScaledEmbedding(nn.QuantizedEmbedding):
    """A quantized `ScaledEmbedding`. `as_linear` (the tied output head) is unscaled, as there."""

    def __init__(self, num_embeddings: int, dims: int, scale: float, group_size: int, bits: int, mode: str = "affine"):
        super().__init__(num_embeddings, dims, group_size=group_size, bits=bits, mode=mode)
        self.scale = scale

    def __call__(self, ids: mx.array) -> mx.array:
        rows = super().__call__(ids)
        return rows * mx.array(self.scale, dtype=rows.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_matmul(x, self)  # fast on the CPU back-end too (see quantized.py)


class Laurel(nn.Module):
    """Learned augmented residual: a low-rank side path around the normed input."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.linear_left = nn.Linear(config.hidden_size, config.laurel_rank, bias=False)
        self.linear_right = nn.Linear(config.laurel_rank, config.hidden_size, bias=False)
        self.post_laurel_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class MLP(nn.Module):
    """GeGLU; in sparse layers the gate keeps only activations above a gaussian top-k cut-off."""

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

    def __call__(self, x: mx.array, width: int | None = None) -> mx.array:
        """`width` runs only that prefix of the feed-forward (a MatFormer sub-model)."""
        gate_proj, up_proj, down_proj = self.gate_proj, self.up_proj, self.down_proj
        if width is not None and width < gate_proj.weight.shape[0]:
            gate_proj, up_proj = prefix_rows(gate_proj, width), prefix_rows(up_proj, width)
            down_proj = prefix_columns(down_proj, width)
        gate = gate_proj(x)
        if self.std_multiplier is not None:
            mean = gate.mean(axis=-1, keepdims=True)
            std = mx.sqrt(mx.var(gate, axis=-1, keepdims=True))
            gate = nn.relu(gate - (mean + std * mx.array(self.std_multiplier, dtype=gate.dtype)))
        return down_proj(nn.gelu_approx(gate) * up_proj(x))


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
        self.rope = nn.RoPE(self.head_dim, traditional=False, base=theta)

    def __call__(self, x, mask, offset: int, cache=None, shared_kv=None):
        B, L, _ = x.shape

        def heads(t):  # (B, L, H * D) -> (B, L, H, D): the norms act per head
            return t.reshape(B, L, -1, self.head_dim)

        # Queries are rotated at the positions of the tokens being processed, shared layer or not.
        queries = self.rope(self.q_norm(heads(self.q_proj(x))).transpose(0, 2, 1, 3), offset=offset)
        if self.is_kv_shared:
            keys, values = shared_kv
        else:
            keys = self.rope(self.k_norm(heads(self.k_proj(x))).transpose(0, 2, 1, 3), offset=offset)
            values = self.v_norm(heads(self.v_proj(x))).transpose(0, 2, 1, 3)
            if cache is not None:
                keys, values = cache.update_and_fetch(keys, values)
        # q and k are RMS-normed, so the reference scales the scores by 1, not 1/sqrt(d).
        out = attend(queries, keys, values, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1)), (keys, values)


class AltUp(nn.Module):
    """Alternating updates: the layer computes only the active stream; the others are predicted
    from all streams before the layer and corrected by its innovation after it."""

    def __init__(self, config: TextConfig):
        super().__init__()
        n, dims = config.altup_num_inputs, config.hidden_size
        self.active = config.altup_active_idx
        self.correct_output_scale = mx.zeros((dims,))
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.modality_router = nn.Linear(dims, n, bias=False)
        self.router_norm = RMSNorm(dims, config.rms_norm_eps)
        self.router_input_scale = 1.0 / dims

    def modalities(self, x: mx.array) -> mx.array:
        routed = self.modality_router(self.router_norm(x) * mx.array(self.router_input_scale, dtype=x.dtype))
        return mx.tanh(routed.astype(mx.float32)).astype(x.dtype)

    def predict(self, streams: mx.array) -> mx.array:
        """streams: (n, B, L, D). Stream i becomes itself plus sum_j P[i, j] * stream j."""
        n = streams.shape[0]
        coefs = self.prediction_coefs(self.modalities(streams[self.active]))
        coefs = coefs.reshape(*coefs.shape[:-1], n, n)  # (B, L, n, n)
        mixed = coefs @ streams.transpose(1, 2, 0, 3)  # (B, L, n, D)
        return streams + mixed.transpose(2, 0, 1, 3)

    def correct(self, predictions: mx.array, activated: mx.array) -> mx.array:
        innovation = activated - predictions[self.active]
        coefs = self.correction_coefs(self.modalities(activated)) + 1.0  # (B, L, n)
        return predictions + innovation[None] * coefs.transpose(2, 0, 1)[..., None]

    def scale_corrected_output(self, x: mx.array) -> mx.array:
        return (x.astype(self.correct_output_scale.dtype) * self.correct_output_scale).astype(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        dims, eps = config.hidden_size, config.rms_norm_eps
        self.active = config.altup_active_idx
        self.correct_scale = config.altup_correct_scale
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

    def __call__(self, streams, per_layer_input, mask, offset, cache=None, shared_kv=None, ffn_width=None):
        predictions = self.altup.predict(streams)
        active = predictions[self.active]

        x = self.input_layernorm(active)
        attn, kv = self.self_attn(x, mask, offset, cache, shared_kv)
        h = (active + self.post_attention_layernorm(attn) + self.laurel(x)) * (1 / math.sqrt(2))
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h), ffn_width))

        corrected = self.altup.correct(predictions, h)
        first = corrected[self.active]
        if self.correct_scale:
            first = self.altup.scale_corrected_output(first)
        first = nn.gelu_approx(self.per_layer_input_gate(first)) * per_layer_input
        first = self.post_per_layer_input_norm(self.per_layer_projection(first))
        # The per-layer input feeds every stream but the first.
        return mx.concatenate([corrected[:1], corrected[1:] + first], axis=0), kv


def _match_magnitude(x: mx.array, target_rms: mx.array) -> mx.array:
    rms = mx.sqrt(mx.maximum(mx.mean(x * x, axis=-1, keepdims=True), 1e-5))
    return x * target_rms / rms


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

    def per_layer_inputs(self, ids: mx.array) -> mx.array:
        """The token-identity half of the per-layer inputs: (B, L, layers, ple_dims).
        Multimodal ids lie beyond the PLE vocabulary and read row 0, as in the reference."""
        c = self.config
        ids = mx.where((ids >= 0) & (ids < c.vocab_size_per_layer_input), ids, 0)
        rows = self.embed_tokens_per_layer(ids)
        return rows.reshape(*ids.shape, c.num_hidden_layers, c.hidden_size_per_layer_input)

    def project_per_layer_inputs(self, embeddings: mx.array, per_layer_inputs: mx.array | None) -> mx.array:
        c = self.config
        projected = self.per_layer_model_projection(embeddings) * mx.array(c.hidden_size**-0.5, dtype=embeddings.dtype)
        projected = projected.reshape(*embeddings.shape[:-1], c.num_hidden_layers, c.hidden_size_per_layer_input)
        projected = self.per_layer_projection_norm(projected)
        if per_layer_inputs is None:
            return projected
        return (projected + per_layer_inputs) * mx.array(2**-0.5, dtype=embeddings.dtype)

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
        fill_cache_only: bool = False,
    ) -> mx.array | None:
        """Final normed hidden states, or None with `fill_cache_only`: then only the layers that
        fill the cache run (a prompt chunk whose logits are not needed). `embeddings` are scaled
        like `embed_tokens(ids)`; when both are given, the ids still supply the per-layer inputs
        (so multimodal embeddings keep the token-identity half)."""
        if embeddings is None:
            if ids is None:
                raise ValueError("Give token ids, embeddings, or both.")
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
        steps = plan.steps[: plan.last_cache_step + 1] if fill_cache_only else plan.steps

        target_rms = mx.sqrt(mx.mean(embeddings * embeddings, axis=-1, keepdims=True))
        streams = mx.stack(
            [embeddings] + [_match_magnitude(proj(embeddings), target_rms) for proj in self.altup_projections]
        )
        shared_kv = {}  # step -> its (keys, values), for the KV-shared steps above
        for position, step in enumerate(steps):
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
        if fill_cache_only:
            return None

        target_rms = mx.sqrt(mx.mean(streams[0] * streams[0], axis=-1, keepdims=True))
        streams = [streams[0]] + [
            _match_magnitude(proj(streams[i + 1]), target_rms) for i, proj in enumerate(self.altup_unembed_projections)
        ]
        return self.norm(mx.mean(mx.stack(streams), axis=0))


def prefix_rows(linear: nn.Module, n: int) -> nn.Module:
    """The first `n` outputs of a (possibly quantized) bias-free linear layer: a view, no copy."""
    return _with(linear, {k: v[:n] for k, v in _weights(linear).items()})


def prefix_columns(linear: nn.Module, n: int) -> nn.Module:
    """The part of a bias-free linear layer that reads the first `n` inputs. Quantized weights are
    cut on group boundaries (`n` a multiple of the group size)."""
    weights = _weights(linear)
    if "scales" in weights:
        if n % linear.group_size:
            raise ValueError(f"A width of {n} does not fall on the quantization's {linear.group_size}-wide groups.")
        columns = {"weight": n * linear.bits // 32, "scales": n // linear.group_size, "biases": n // linear.group_size}
        weights = {k: v[:, : columns[k]] for k, v in weights.items()}
    else:
        weights = {"weight": weights["weight"][:, :n]}
    return _with(linear, weights)


def _weights(linear: nn.Module) -> dict[str, mx.array]:
    return {k: linear[k] for k in ("weight", "scales", "biases") if k in linear}


def _with(linear: nn.Module, weights: dict[str, mx.array]) -> nn.Module:
    """A shallow copy of `linear` holding `weights`: the layer's own code runs on the slice."""
    sliced = object.__new__(type(linear))
    sliced.__dict__.update(linear.__dict__)
    dict.update(sliced, linear)
    dict.update(sliced, weights)
    return sliced
