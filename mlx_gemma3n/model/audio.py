"""Gemma 3n audio encoder: the USM conformer.

log-mel (B, T, 128) -> two stride-2 convolutions (SSCP) -> conformer blocks -> every
`conf_reduction_factor`-th frame: one encoding per 160 ms. Semantics follow transformers'
`Gemma3nAudioEncoder`; masks are True where a frame is padding, as there.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from ..config import AudioConfig
from .text import RMSNorm


def _clipping(config: AudioConfig) -> float:
    # The reference clamps activations to `gradient_clipping` at inference too.
    return float(config.gradient_clipping)


class CumulativeGroupNorm(nn.Module):
    """Group norm (one group) whose statistics accumulate over time, so frame t only
    sees frames <= t: the sub-sampler stays streamable. Input (B, T, F, C)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.weight = mx.ones((channels,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        dtype = x.dtype
        x = x.astype(mx.float32)
        group = x.shape[2] * x.shape[3]
        count = mx.arange(1, x.shape[1] + 1, dtype=mx.float32)[None, :, None, None] * group
        mean = mx.cumsum(x.sum(axis=(2, 3), keepdims=True), axis=1) / count
        # Each step's squared deviations are taken from that step's running mean, then summed
        # over time: not the textbook running variance, but what the reference computes.
        sq = mx.square(x - mean).sum(axis=(2, 3), keepdims=True)
        var = mx.cumsum(sq, axis=1) / count
        y = (x - mean) * mx.rsqrt(var + self.eps) * self.weight.astype(mx.float32)
        return y.astype(dtype)


class SSCPConvBlock(nn.Module):
    """Conv2d over (time, frequency) -> cumulative group norm -> ReLU.

    Time is padded "reverse causal" (kernel - 1 frames after the clip, none before);
    frequency by one bin on each side."""

    def __init__(self, config: AudioConfig, idx: int):
        super().__init__()
        in_channels = 1 if idx == 0 else config.sscp_conv_channel_size[idx - 1]
        out_channels = config.sscp_conv_channel_size[idx]
        kernel = tuple(config.sscp_conv_kernel_size[idx])
        self.time_padding = kernel[0] - 1
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride=tuple(config.sscp_conv_stride_size[idx]), bias=False)
        self.norm = CumulativeGroupNorm(out_channels, config.sscp_conv_group_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:  # (B, T, F, C), channels last
        x = mx.pad(x, [(0, 0), (0, self.time_padding), (1, 1), (0, 0)])
        return nn.relu(self.norm(self.conv(x)))


class SubSampleConvProjection(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        self.conv_0 = SSCPConvBlock(config, 0)
        self.conv_1 = SSCPConvBlock(config, 1)
        freq = config.input_feat_size
        for (_, kw), (_, sw) in zip(config.sscp_conv_kernel_size, config.sscp_conv_stride_size):
            freq = (freq + 2 - kw) // sw + 1
        self.input_proj_linear = nn.Linear(freq * config.sscp_conv_channel_size[-1], config.hidden_size, bias=False)

    def __call__(self, features: mx.array) -> mx.array:
        x = self.conv_1(self.conv_0(features[..., None]))
        b, t, f, c = x.shape
        return self.input_proj_linear(x.reshape(b, t, f * c))  # frequency-major, as the reference flattens


def _timing_signal(positions: mx.array, channels: int) -> mx.array:
    """Transformer sinusoids [sin | cos] with timescales from 1 to 1e4."""
    n = channels // 2
    inv_timescales = mx.exp(mx.arange(n, dtype=mx.float32) * -(math.log(1.0e4) / max(n - 1, 1)))
    scaled = positions.astype(mx.float32)[:, None] * inv_timescales[None, :]
    return mx.concatenate([mx.sin(scaled), mx.cos(scaled)], axis=-1)


class RelativePositionEmbedding(nn.Module):
    """Transformer-XL style logits: content (q.k) plus position (q.R), with R a projected
    sinusoid of the key's distance into the past (max_backward .. -max_forward)."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.num_heads = config.conf_num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.channels = config.hidden_size
        self.max_backward = max(0, config.conf_attention_context_left - 1)
        self.max_forward = config.conf_attention_context_right
        self.pos_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def __call__(self, queries: mx.array, keys: mx.array) -> mx.array:
        # queries (B, U, W, N, H) blocks of W frames; keys (B, U, C, N, H) each block's context.
        b, u, w, n, h = queries.shape
        c = keys.shape[2]
        positions = mx.arange(self.max_backward, -self.max_forward - 1, -1)
        span = positions.shape[0]
        sin_emb = self.pos_proj(_timing_signal(positions, self.channels).astype(queries.dtype))
        sin_emb = sin_emb.reshape(span, n, h).transpose(1, 2, 0)  # (N, H, F)

        q = queries.transpose(0, 3, 1, 2, 4)  # (B, N, U, W, H)
        term_ac = q @ keys.transpose(0, 3, 1, 4, 2)  # (B, N, U, W, C)
        term_bd = (q.reshape(b, n, u * w, h) @ sin_emb).reshape(b, n, u, w, span)

        # Relative shift: pad each row to C + 1 and re-read the block as rows of C, which
        # slides row w right by w so that entry (w, c) holds distance c - w.
        term_bd = mx.pad(term_bd, [(0, 0)] * 4 + [(0, c + 1 - span)])
        term_bd = term_bd.reshape(b, n, u, w * (c + 1))[..., : w * c].reshape(b, n, u, w, c)
        return term_ac + term_bd


class AudioAttention(nn.Module):
    """Chunked local self-attention: the frames are cut into blocks of `chunk_size`, and a
    block's queries attend to keys from `context_left - 1` frames before the block to
    `context_right` frames after it; query t sees keys t - (context_left - 1) .. t + context_right."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.num_heads = config.conf_num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.chunk_size = config.conf_attention_chunk_size
        self.max_past = max(0, config.conf_attention_context_left - 1)
        self.max_future = config.conf_attention_context_right
        self.context_size = self.chunk_size + self.max_past + self.max_future
        self.softcap = config.conf_attention_logit_cap

        self.relative_position_embedding = RelativePositionEmbedding(config)
        self.per_dim_scale = mx.zeros((self.head_dim,))
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

        # Query scale: 1/sqrt(head_dim), normalised so that per_dim_scale = 0 means exactly that.
        self.q_scale = self.head_dim**-0.5 / math.log(2.0)  # 1 / softplus(0) = 1 / ln 2
        w = mx.arange(self.chunk_size)[:, None]
        k = mx.arange(self.context_size)[None, :]
        self._local_mask = (k >= w) & (k <= w + self.max_past + self.max_future)  # (W, C)

    def _blocks(self, x: mx.array) -> mx.array:
        """(B, T, ...) -> (B, U, W, ...) non-overlapping blocks, zero padded at the end."""
        t = x.shape[1]
        u = -(-t // self.chunk_size)
        x = mx.pad(x, [(0, 0), (0, u * self.chunk_size - t)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(x.shape[0], u, self.chunk_size, *x.shape[2:])

    def _context(self, x: mx.array) -> mx.array:
        """(B, T, ...) -> (B, U, C, ...): for block u, frames u*W - max_past .. (u+1)*W + max_future - 1."""
        t = x.shape[1]
        u = -(-t // self.chunk_size)
        pad = [(0, 0), (self.max_past, self.max_future + self.chunk_size - 1)] + [(0, 0)] * (x.ndim - 2)
        x = mx.pad(x, pad)
        index = mx.arange(u)[:, None] * self.chunk_size + mx.arange(self.context_size)[None, :]
        return x[:, index]

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        q = q * (nn.softplus(self.per_dim_scale) * self.q_scale).astype(q.dtype)

        q_blocks = self._blocks(q)  # (B, U, W, N, H)
        k_blocks = self._context(k)  # (B, U, C, N, H)
        v_blocks = self._context(v)
        valid = self._context(~mask)[:, None, :, None, :] & self._local_mask  # (B, 1, U, W, C)

        logits = self.relative_position_embedding(q_blocks, k_blocks).astype(mx.float32)
        logits = mx.tanh(logits / self.softcap) * self.softcap
        # A fully masked row (a padded query) becomes uniform, exactly as the reference's finfo.min fill.
        logits = mx.where(valid, logits, mx.finfo(mx.float32).min)
        probs = mx.softmax(logits, axis=-1).astype(v.dtype)  # (B, N, U, W, C)

        out = probs @ v_blocks.transpose(0, 3, 1, 2, 4)  # (B, N, U, W, H)
        u = q_blocks.shape[1]
        out = out.transpose(0, 2, 3, 1, 4).reshape(b, u * self.chunk_size, self.num_heads, self.head_dim)
        return out[:, :t]


class ConformerAttention(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        self.clip = _clipping(config)
        self.pre_attn_norm = RMSNorm(config.hidden_size)
        self.attn = AudioAttention(config)
        self.post = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.post_norm = RMSNorm(config.hidden_size)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        h = self.pre_attn_norm(mx.clip(x, -self.clip, self.clip))
        h = self.attn(h, mask)
        h = self.post(h.reshape(*h.shape[:2], -1))
        return x + self.post_norm(mx.clip(h, -self.clip, self.clip))


class ConformerFeedForward(nn.Module):
    """Macaron half-step FFN: its output enters the residual at `conf_residual_weight`."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.clip = _clipping(config)
        self.residual_weight = config.conf_residual_weight
        self.pre_layer_norm = RMSNorm(config.hidden_size)
        self.ffw_layer_1 = nn.Linear(config.hidden_size, config.hidden_size * 4, bias=False)
        self.ffw_layer_2 = nn.Linear(config.hidden_size * 4, config.hidden_size, bias=False)
        self.post_layer_norm = RMSNorm(config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.pre_layer_norm(mx.clip(x, -self.clip, self.clip))
        h = self.ffw_layer_2(nn.silu(self.ffw_layer_1(h)))
        h = self.post_layer_norm(mx.clip(h, -self.clip, self.clip))
        return x + h * self.residual_weight


class DepthwiseConv1d(nn.Module):
    """Valid depthwise conv over time, weight (channels, kernel, 1) as MLX's Conv1d lays it out.
    A sum of shifted copies: several times faster than a grouped conv on MLX's CPU back-end."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = mx.zeros((channels, kernel_size, 1))

    def __call__(self, x: mx.array) -> mx.array:  # (B, T + kernel - 1, C) -> (B, T, C)
        k = self.weight.shape[1]
        t = x.shape[1] - k + 1
        w = self.weight[:, :, 0].T  # (K, C)
        return sum(x[:, i : i + t] * w[i] for i in range(k))


class ConformerLightConv1d(nn.Module):
    """GLU -> causal depthwise conv over time -> norm -> SiLU -> projection, residual."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        d = config.hidden_size
        self.clip = _clipping(config)
        self.pre_layer_norm = RMSNorm(d, eps=config.rms_norm_eps)
        self.linear_start = nn.Linear(d, d * 2, bias=False)
        self.depthwise_conv1d = DepthwiseConv1d(d, config.conf_conv_kernel_size)
        self.conv_norm = RMSNorm(d, eps=config.rms_norm_eps)
        self.linear_end = nn.Linear(d, d, bias=False)
        self.causal_padding = config.conf_conv_kernel_size - 1

    def __call__(self, x: mx.array) -> mx.array:
        a, gate = mx.split(self.linear_start(self.pre_layer_norm(x)), 2, axis=-1)
        h = a * mx.sigmoid(gate)
        h = self.depthwise_conv1d(mx.pad(h, [(0, 0), (self.causal_padding, 0), (0, 0)]))
        h = self.conv_norm(mx.clip(h, -self.clip, self.clip))
        return x + self.linear_end(nn.silu(h))


class ConformerBlock(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        self.clip = _clipping(config)
        self.ffw_layer_start = ConformerFeedForward(config)
        self.attention = ConformerAttention(config)
        self.lconv1d = ConformerLightConv1d(config)
        self.ffw_layer_end = ConformerFeedForward(config)
        self.norm = RMSNorm(config.hidden_size)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = self.attention(self.ffw_layer_start(x), mask)
        # Padded frames are zeroed so the causal conv cannot carry them forward.
        x = self.lconv1d(mx.where(mask[..., None], mx.zeros((), x.dtype), x))
        x = self.ffw_layer_end(x)
        return self.norm(mx.clip(x, -self.clip, self.clip))


class AudioTower(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        self.config = config
        self.subsample_conv_projection = SubSampleConvProjection(config)
        self.conformer = [ConformerBlock(config) for _ in range(config.conf_num_hidden_layers)]

    def __call__(self, features: mx.array, mask: mx.array,
                 between_blocks: Callable[[], None] | None = None) -> tuple[mx.array, mx.array]:
        """features (B, T, mel) log-mel; mask (B, T) True on padding frames.

        Returns (encodings (B, T', hidden), mask (B, T') True on padding), with padded
        encodings zeroed. `between_blocks`, when given, is called after each conformer block
        with the block evaluated; it may raise to abandon the clip there."""
        dtype = self.subsample_conv_projection.conv_0.conv.weight.dtype  # convs are never quantized
        x = self.subsample_conv_projection(features.astype(dtype))

        # A sub-sampled frame takes the mask of the first input frame of its receptive field.
        stride = math.prod(s[0] for s in self.config.sscp_conv_stride_size)
        index = mx.minimum(mx.arange(x.shape[1]) * stride, mask.shape[1] - 1)
        mask = mask[:, index]

        for block in self.conformer:
            x = block(x, mask)
            if between_blocks is not None:
                mx.eval(x)
                between_blocks()

        r = self.config.conf_reduction_factor
        if r > 1:
            x, mask = x[:, ::r], mask[:, ::r]
        return mx.where(mask[..., None], mx.zeros((), x.dtype), x), mask


# Non-persistent buffers of the reference; some exporters write them anyway. We compute them.
_BUFFERS = ("inv_timescales", "q_scale", "local_causal_valid_mask", "softcap", "gradient_clipping")


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Checkpoint tensors (names below `model.audio_tower.`, torch layout) -> AudioTower's."""
    out = {}
    for name, w in weights.items():
        if name.rsplit(".", 1)[-1] in _BUFFERS:
            continue
        if name.startswith("subsample_conv_projection.") and name.endswith(".conv.weight"):
            w = w.transpose(0, 2, 3, 1)  # (O, I, kH, kW) -> (O, kH, kW, I)
        elif name.endswith("depthwise_conv1d.weight"):
            w = w.transpose(0, 2, 1)  # (O, I, K) -> (O, K, I)
        out[name] = w
    return out
