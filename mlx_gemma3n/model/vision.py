"""MobileNet-V5 image encoder: timm's `mobilenetv5_300m_enc`, as Gemma 3n uses it.

A convolutional stem, four stages of edge-residual (fused MBConv), universal inverted
residual and mobile multi-query attention blocks, then a multi-scale fusion adapter that
merges the last two stages into a fixed grid (16x16 for Gemma 3n) of 2048-d features.

Everything runs channels-last (NHWC). Parameter names equal the checkpoint's names below
`model.vision_tower.timm_model.`; `sanitize` turns torch's OIHW conv kernels into MLX's OHWI.

Numerics: every RMS norm is taken in float32. float16's range (65504) is too narrow for the
pre-norm activations that large trained conv kernels produce, so with float16 parameters the
tower computes in float32; with bfloat16 (float32's range) or float32 it computes in that dtype.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import mlx.core as mx
import numpy as np
from mlx import nn

from ..config import ConfigError, VisionConfig

# timm's block strings for mobilenetv5_300m (type, r=repeats, a=start dw kernel, k=mid dw kernel,
# s=stride, e=expansion, c=channels, h=heads, d=key/value dim, v=key/value stride).
_UIR_640 = ["uir_r1_a5_k0_s1_e4_c640"] * 7
_MQA_640 = ["mqa_r1_k3_h12_v2_s1_d64_c640", "uir_r1_a0_k0_s1_e2_c640"] * 14
_MQA_1280 = ["mqa_r1_k3_h16_s1_d96_c1280", "uir_r1_a0_k0_s1_e2_c1280"] * 19
ARCH_300M = [
    ["er_r1_k3_s2_e4_c128", "er_r1_k3_s1_e4_c128", "er_r1_k3_s1_e4_c128"],
    ["uir_r1_a3_k5_s2_e6_c256", "uir_r1_a5_k0_s1_e4_c256", "uir_r1_a3_k0_s1_e4_c256",
     "uir_r1_a5_k0_s1_e4_c256", "uir_r1_a3_k0_s1_e4_c256"],
    ["uir_r1_a5_k5_s2_e6_c640", *_UIR_640, "uir_r1_a0_k0_s1_e1_c640", *_MQA_640],
    ["uir_r1_a5_k5_s2_e6_c1280", *_MQA_1280],
]

NORM_EPS = 1e-6  # timm's RmsNorm2d default; the checkpoint config does not carry it
LARGE_MAP_STAGES = 2  # stages at 1/4 and 1/8 of the input resolution
MSFA_OUT_CHANNELS = 2048  # fixed in timm's MobileNetV5Encoder

# timm.create_model keyword arguments (VisionConfig.model_args) that we honour.
_MODEL_ARGS = {
    "channel_multiplier": 1.0,
    "group_size": None,
    "pad_type": "same",
    "stem_size": 64,
    "stem_bias": True,
    "fix_stem": None,  # timm: channel_multiplier < 1
    "in_chans": 3,
    "msfa_indices": (-2, -1),
    "msfa_output_resolution": 16,
    "layer_scale_init_value": 1e-5,
    "drop_rate": 0.0,  # training only
    "drop_path_rate": 0.0,  # training only
}


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's channel rounding: nearest multiple of `divisor`, never more than 10 % down."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


def _num_groups(group_size: int | None, channels: int) -> int:
    return channels // group_size if group_size else 1


def _decode_block(block: str) -> dict:
    kind, *ops = block.split("_")
    opts = {}
    for op in ops:
        key, value = re.split(r"(\d.*)", op)[:2]
        opts[key] = int(value) if value.isdigit() else float(value)
    return {"kind": kind, **opts}


def rms_norm(x: mx.array, weight: mx.array, eps: float = NORM_EPS) -> mx.array:
    """RMS norm over channels (the last axis), accumulated in float32 whatever the input dtype
    (timm's RmsNorm2dFp32). One fused kernel: composed ops hold several float32 copies of a
    high-resolution feature map at once (a 768x768 image: 3.2 GB of activations, not 0.8)."""
    return mx.fast.rms_norm(x, weight, eps)


def _padding(size: int, kernel: int, stride: int, pad_type: str) -> tuple[int, int]:
    if pad_type == "same":
        # TensorFlow 'SAME': output ceil(size / stride), the odd pixel of padding goes after.
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2
    if pad_type == "valid":
        return 0, 0
    p = (stride - 1 + kernel - 1) // 2  # timm's '' (PyTorch-style symmetric)
    return p, p


class Conv2d(nn.Module):
    """A 2-D convolution with timm's padding rules (`pad_type` 'same', '' or 'valid')."""

    def __init__(self, in_chs, out_chs, kernel_size=1, stride=1, groups=1, bias=False, pad_type=""):
        super().__init__()
        scale = math.sqrt(1.0 / (in_chs // groups * kernel_size**2))
        self.weight = mx.random.uniform(-scale, scale, (out_chs, kernel_size, kernel_size, in_chs // groups))
        if bias:
            self.bias = mx.zeros((out_chs,))
        self.kernel_size, self.stride, self.groups, self.pad_type = kernel_size, stride, groups, pad_type.lower()

    @property
    def pointwise(self) -> bool:
        """A 1x1 kernel with stride 1: a matrix over channels (99% of this tower's parameters)."""
        return self.kernel_size == 1 and self.stride == 1 and self.groups == 1

    def to_quantized(self, group_size: int, bits: int, mode: str = "affine") -> nn.Module:
        """A pointwise conv is a linear layer over the channels of NHWC inputs: quantized as one."""
        from .quantized import QuantizedLinear

        if not self.pointwise:
            raise ValueError(f"a {self.kernel_size}x{self.kernel_size} convolution cannot be quantized")
        out_chs, in_chs = self.weight.shape[0], self.weight.shape[-1]
        linear = nn.Linear(in_chs, out_chs, bias="bias" in self)
        linear.weight = self.weight.reshape(out_chs, in_chs)
        if "bias" in self:
            linear.bias = self.bias
        return QuantizedLinear.from_linear(linear, group_size=group_size, bits=bits, mode=mode)

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight.astype(x.dtype)
        if self.pointwise:
            y = x @ w.reshape(w.shape[0], -1).T  # a plain matmul over channels
        else:
            (top, bottom), (left, right) = (
                _padding(n, self.kernel_size, self.stride, self.pad_type) for n in x.shape[1:3]
            )
            y = mx.conv_general(x, w, stride=self.stride, padding=([top, left], [bottom, right]), groups=self.groups)
        return y + self.bias.astype(y.dtype) if "bias" in self else y


class RmsNorm2d(nn.Module):
    """RMS norm over channels, optionally followed by tanh-GELU (timm's RmsNorm2d / RmsNormAct2d)."""

    def __init__(self, channels: int, act: bool = False):
        super().__init__()
        self.weight = mx.ones((channels,))
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        x = rms_norm(x, self.weight)
        return nn.gelu_approx(x) if self.act else x


class ConvNormAct(nn.Module):
    def __init__(self, in_chs, out_chs, kernel_size, stride=1, groups=1, bias=False, act=True, pad_type=""):
        super().__init__()
        self.conv = Conv2d(in_chs, out_chs, kernel_size, stride, groups, bias, pad_type)
        self.bn = RmsNorm2d(out_chs, act=act)  # timm keeps the name `bn` for weight compatibility

    def __call__(self, x: mx.array) -> mx.array:
        return self.bn(self.conv(x))


class LayerScale2d(nn.Module):
    def __init__(self, channels: int, init_value: float):
        super().__init__()
        self.gamma = mx.full((channels,), init_value)

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.gamma.astype(x.dtype)


class EdgeResidual(nn.Module):
    """Fused MBConv: a full k x k expansion conv, then a pointwise projection."""

    def __init__(self, in_chs, out_chs, kernel_size, stride, exp_ratio, group_size, pad_type):
        super().__init__()
        mid_chs = make_divisible(in_chs * exp_ratio)
        self.conv_exp = Conv2d(in_chs, mid_chs, kernel_size, stride, _num_groups(group_size, mid_chs), pad_type=pad_type)
        self.bn1 = RmsNorm2d(mid_chs, act=True)
        self.conv_pwl = Conv2d(mid_chs, out_chs, 1, pad_type=pad_type)
        self.bn2 = RmsNorm2d(out_chs)
        self.has_skip = in_chs == out_chs and stride == 1

    def __call__(self, x: mx.array) -> mx.array:
        y = self.bn2(self.conv_pwl(self.bn1(self.conv_exp(x))))
        return x + y if self.has_skip else y


class UniversalInvertedResidual(nn.Module):
    """MobileNet-V4's UIB: optional depthwise conv, pointwise expansion, optional depthwise conv,
    pointwise projection, layer scale."""

    def __init__(self, in_chs, out_chs, start_kernel=0, mid_kernel=0, stride=1, exp_ratio=1.0,
                 group_size=1, pad_type="", layer_scale=None, noskip=False):
        super().__init__()
        if start_kernel:
            start_stride = 1 if mid_kernel else stride
            self.dw_start = ConvNormAct(in_chs, in_chs, start_kernel, start_stride,
                                        _num_groups(group_size, in_chs), act=False, pad_type=pad_type)
        mid_chs = make_divisible(in_chs * exp_ratio)
        self.pw_exp = ConvNormAct(in_chs, mid_chs, 1, pad_type=pad_type)
        if mid_kernel:
            self.dw_mid = ConvNormAct(mid_chs, mid_chs, mid_kernel, stride, _num_groups(group_size, mid_chs),
                                      pad_type=pad_type)
        self.pw_proj = ConvNormAct(mid_chs, out_chs, 1, act=False, pad_type=pad_type)
        if layer_scale is not None:
            self.layer_scale = LayerScale2d(out_chs, layer_scale)
        self.has_skip = in_chs == out_chs and stride == 1 and not noskip

    def __call__(self, x: mx.array) -> mx.array:
        y = self.dw_start(x) if "dw_start" in self else x
        y = self.pw_exp(y)
        y = self.dw_mid(y) if "dw_mid" in self else y
        y = self.pw_proj(y)
        y = self.layer_scale(y) if "layer_scale" in self else y
        return x + y if self.has_skip else y


class _Projection(nn.Module):
    """A 1x1 projection, preceded (for keys and values) by an optional strided depthwise
    conv + norm that shrinks the grid attended over."""

    def __init__(self, dim, out_dim, down_stride=1, down_kernel=3, pad_type=""):
        super().__init__()
        if down_stride > 1:
            self.down_conv = Conv2d(dim, dim, down_kernel, down_stride, groups=dim, pad_type=pad_type)
            self.norm = RmsNorm2d(dim)
        self.proj = Conv2d(dim, out_dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        if "down_conv" in self:
            x = self.norm(self.down_conv(x))
        return self.proj(x)


class MultiQueryAttention2d(nn.Module):
    """Multi-query attention over a feature map: many query heads share one key and one value
    head, whose grid may be down-sampled by `kv_stride`."""

    def __init__(self, dim, out_dim, num_heads, key_dim, value_dim, kv_stride, dw_kernel, pad_type):
        super().__init__()
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.query = _Projection(dim, num_heads * key_dim)
        self.key = _Projection(dim, key_dim, kv_stride, dw_kernel, pad_type)
        self.value = _Projection(dim, value_dim, kv_stride, dw_kernel, pad_type)
        self.output = _Projection(num_heads * value_dim, out_dim)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, _ = x.shape
        # Query channels are laid out head-major (h * key_dim + d), as in timm.
        q = self.query(x).reshape(B, H * W, self.num_heads, self.key_dim).transpose(0, 2, 1, 3)
        k = self.key(x).reshape(B, 1, -1, self.key_dim)
        v = self.value(x).reshape(B, 1, -1, self.value_dim)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.key_dim**-0.5)
        o = o.transpose(0, 2, 1, 3).reshape(B, H, W, self.num_heads * self.value_dim)
        return self.output(o)


class MobileAttention(nn.Module):
    """Pre-norm multi-query attention block with layer scale and residual."""

    def __init__(self, in_chs, out_chs, stride, num_heads, key_dim, kv_stride, dw_kernel, pad_type, layer_scale):
        super().__init__()
        self.norm = RmsNorm2d(in_chs)
        self.attn = MultiQueryAttention2d(in_chs, out_chs, num_heads, key_dim, key_dim, kv_stride, dw_kernel, pad_type)
        if layer_scale is not None:
            self.layer_scale = LayerScale2d(out_chs, layer_scale)
        self.has_skip = in_chs == out_chs and stride == 1

    def __call__(self, x: mx.array) -> mx.array:
        y = self.attn(self.norm(x))
        y = self.layer_scale(y) if "layer_scale" in self else y
        return x + y if self.has_skip else y


def _nearest_indices(out_size: int, in_size: int) -> mx.array:
    # torch 'nearest': floor(i * (in / out)) with the scale in float32, clipped to the input.
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return mx.array(np.minimum(idx, in_size - 1).astype(np.int32))


def _bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    # torch 'bilinear', align_corners=False, no antialias, as an (out, in) interpolation matrix.
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + 0.5) * scale - 0.5, 0).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = np.clip(src - i0, 0, 1)
    m = np.zeros((out_size, in_size), np.float32)
    np.add.at(m, (np.arange(out_size), i0), 1 - lam)
    np.add.at(m, (np.arange(out_size), i1), lam)
    return m


class MultiScaleFusionAdapter(nn.Module):
    """Upsample coarser feature maps to the finest one (nearest), concatenate on channels, mix them
    with a pointwise inverted bottleneck, resize to the output grid, then RMS-normalise."""

    def __init__(self, in_chs: int, out_chs: int, output_resolution: int | tuple[int, int]):
        super().__init__()
        self.ffn = UniversalInvertedResidual(in_chs, out_chs, exp_ratio=2.0, noskip=True)
        self.norm = RmsNorm2d(out_chs)
        r = output_resolution
        self.out_h, self.out_w = (r, r) if isinstance(r, int) else (int(r[0]), int(r[1]))

    def __call__(self, features: list[mx.array]) -> mx.array:
        H, W = features[0].shape[1:3]
        resized = []
        for f in features:
            h, w = f.shape[1:3]
            if h < H or w < W:
                f = mx.take(mx.take(f, _nearest_indices(H, h), axis=1), _nearest_indices(W, w), axis=2)
            resized.append(f)
        x = self.ffn(mx.concatenate(resized, axis=-1))

        oh, ow = self.out_h, self.out_w
        if (H, W) != (oh, ow):
            if H % oh or W % ow:
                mh, mw = (mx.array(_bilinear_matrix(o, n)).astype(x.dtype) for o, n in ((oh, H), (ow, W)))
                x = mx.einsum("oh,bhwc,pw->bopc", mh, x, mw)
            else:
                sh, sw = H // oh, W // ow  # average pooling with kernel = stride
                pooled = x.reshape(x.shape[0], oh, sh, ow, sw, x.shape[-1]).astype(mx.float32).mean(axis=(2, 4))
                x = pooled.astype(x.dtype)
        return self.norm(x)


def _model_args(config: VisionConfig) -> dict:
    args = dict(config.model_args or {})
    unknown = sorted(set(args) - set(_MODEL_ARGS))
    if unknown:
        raise ConfigError(
            f"vision_config.model_args has keys mlx_gemma3n's MobileNet-V5 does not implement: {', '.join(unknown)}."
        )
    args = {**_MODEL_ARGS, **args}
    if args["fix_stem"] is None:
        args["fix_stem"] = args["channel_multiplier"] < 1.0
    return args


class VisionTower(nn.Module):
    """MobileNet-V5 encoder: (B, H, W, 3) pixels in [0, 1] -> (B, 16 * 16, 2048) soft-token features.

    The tokens are the fusion adapter's grid flattened row-major, before Gemma 3n's
    `* hidden_size**0.5` and the multimodal embedder.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        a = _model_args(config)
        mult, pad, ls = a["channel_multiplier"], a["pad_type"], a["layer_scale_init_value"]

        def round_chs(c):
            return make_divisible(c * mult) if mult else c

        stem = a["stem_size"] if a["fix_stem"] else round_chs(a["stem_size"])
        self.conv_stem = ConvNormAct(a["in_chans"], stem, 3, stride=2, bias=a["stem_bias"], pad_type=pad)

        in_chs, feature_chs = stem, [stem]
        self.blocks = []
        for stage in ARCH_300M:
            blocks = []
            for i, spec in enumerate(map(_decode_block, stage)):
                out_chs = round_chs(spec["c"])
                stride = spec["s"] if i == 0 else 1
                group_size = spec.get("gs", a["group_size"])
                if spec["kind"] == "er":
                    gs = 0 if group_size is None else group_size
                    block = EdgeResidual(in_chs, out_chs, spec["k"], stride, spec["e"], gs, pad)
                elif spec["kind"] == "uir":
                    gs = 1 if group_size is None else group_size
                    block = UniversalInvertedResidual(in_chs, out_chs, spec.get("a", 0), spec["k"], stride,
                                                      spec["e"], gs, pad, ls)
                else:
                    block = MobileAttention(in_chs, out_chs, stride, spec["h"], spec["d"], spec.get("v", 1),
                                            spec["k"], pad, ls)
                blocks.append(block)
                in_chs = out_chs
            self.blocks.append(blocks)
            feature_chs.append(in_chs)

        # Feature 0 is the stem's output, feature i the output of stage i (timm's feature_take_indices).
        n, take = len(feature_chs), a["msfa_indices"]
        take = list(range(n - take, n)) if isinstance(take, int) else [i + n if i < 0 else i for i in take]
        if not all(0 <= i < n for i in take):
            raise ConfigError(f"vision_config.model_args: msfa_indices {a['msfa_indices']} must pick among {n} features.")
        self.msfa_indices = frozenset(take)
        self.msfa = MultiScaleFusionAdapter(
            sum(feature_chs[i] for i in take), MSFA_OUT_CHANNELS, a["msfa_output_resolution"]
        )

    def __call__(self, pixel_values: mx.array, between_blocks: Callable[[], None] | None = None) -> mx.array:
        """`between_blocks`, when given, is called after each block with the block evaluated (a
        lazy graph cannot be stopped halfway); it may raise to abandon the image there."""
        dtype = self.conv_stem.conv.weight.dtype
        x = pixel_values.astype(mx.float32 if dtype == mx.float16 else dtype)
        x = self.conv_stem(x)
        features = [x] if 0 in self.msfa_indices else []
        for i, stage in enumerate(self.blocks, start=1):
            for block in stage:
                x = block(x)
                if between_blocks is not None:
                    mx.eval(x)
                    between_blocks()
                elif i <= LARGE_MAP_STAGES and mx.default_device() == mx.gpu:
                    # Evaluated block by block where the feature maps are large: a GPU back-end
                    # holds the temporaries of every command in flight, and one graph of the
                    # whole tower keeps several of these maps alive at once (768x768 on an H100:
                    # 0.47 GB of activations instead of 0.78, for 3 ms more). The CPU back-end
                    # frees as it goes.
                    mx.eval(x)
            if i in self.msfa_indices:
                features.append(x)
        x = self.msfa(features)
        # Row-major over the grid, as transformers flattens (B, C, H, W) -> (B, H * W, C).
        return x.reshape(x.shape[0], -1, x.shape[-1])


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Checkpoint tensors (names below `model.vision_tower.timm_model.`) -> MLX layout.

    Every 4-D tensor of this tower is a conv kernel: torch (O, I, kH, kW) -> MLX (O, kH, kW, I).
    A quantized pointwise kernel is stored as its 2-D matrix and stays as it is.
    """
    return {k: v.transpose(0, 2, 3, 1) if v.ndim == 4 else v for k, v in weights.items()}
