"""The MLX audio tower equals transformers' Gemma3nAudioEncoder on random weights (float32)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import Gemma3nAudioConfig
from transformers.initialization import no_init_weights
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder

from mlx_gemma3n.config import AudioConfig
from mlx_gemma3n.model.audio import AudioTower, sanitize

TOL = 1e-3

SMALL = {
    "hidden_size": 64,
    "conf_num_attention_heads": 4,
    "conf_num_hidden_layers": 2,
    "sscp_conv_channel_size": (8, 4),
    "input_feat_size": 32,
}
# Exercises what the published config leaves idle: right context, a soft-cap that bites,
# clamps that clip, another chunk/kernel/reduction geometry.
ODD = {
    **SMALL,
    "conf_attention_chunk_size": 5,
    "conf_attention_context_left": 7,
    "conf_attention_context_right": 3,
    "conf_attention_logit_cap": 2.0,
    "conf_conv_kernel_size": 3,
    "conf_reduction_factor": 3,
    "gradient_clipping": 0.5,
}


def _lists(v):
    return [_lists(x) for x in v] if isinstance(v, (tuple, list)) else v


def build(overrides: dict, seed: int = 0) -> tuple[Gemma3nAudioEncoder, AudioTower]:
    """A reference encoder with every parameter random, and our tower loaded from its state_dict."""
    ref_kw = {k: _lists(v) for k, v in overrides.items()}
    with no_init_weights():  # every tensor is overwritten below; skip the slow default init
        ref = Gemma3nAudioEncoder(Gemma3nAudioConfig(**ref_kw)).eval()
    rng = np.random.default_rng(seed)
    # Matrices are windows at random offsets into one pool of normals: independent enough
    # within a tensor and across layers, and cheap for the 0.7 B parameters of the full size.
    pool = rng.standard_normal(1 << 24, dtype=np.float32)
    weights = {}
    with torch.no_grad():
        for name, p in ref.state_dict().items():
            if p.ndim > 1:  # linear / conv: unit-variance outputs
                start = int(rng.integers(0, pool.size - p.numel()))
                fan_in = int(np.prod(p.shape[1:]))
                value = pool[start : start + p.numel()].reshape(p.shape) * np.float32(fan_in**-0.5)
            elif name.endswith("per_dim_scale"):
                value = rng.standard_normal(p.shape, dtype=np.float32) * np.float32(0.5)
            else:  # norm scales
                value = rng.uniform(0.5, 1.5, p.shape).astype(np.float32)
            p.copy_(torch.from_numpy(value))
            weights[name] = mx.array(value)
    tower = AudioTower(AudioConfig(**overrides))
    tower.load_weights(list(sanitize(weights).items()), strict=True)
    mx.eval(tower.parameters())
    return ref, tower


def features_and_mask(lengths: list[int], mel: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = max(lengths)
    features = (rng.standard_normal((len(lengths), t, mel)) * 2.0 - 3.0).astype(np.float32)
    mask = np.arange(t)[None, :] >= np.array(lengths)[:, None]  # True on padding
    features[mask] = 0.0
    return features, mask


def run_both(ref, tower, features, mask):
    with torch.no_grad():
        out = ref(torch.from_numpy(features), torch.from_numpy(mask))
    ours, our_mask = tower(mx.array(features), mx.array(mask))
    return (np.array(ours), np.array(our_mask)), (out.last_hidden_state.numpy(), out.audio_mel_mask.numpy())


def assert_matches(ours, theirs):
    (enc, mask), (ref_enc, ref_mask) = ours, theirs
    assert mask.dtype == np.bool_ and mask.shape == ref_mask.shape, (mask.shape, ref_mask.shape)
    assert (mask == ref_mask).all(), f"masks differ at {np.argwhere(mask != ref_mask)[:5].tolist()}"
    assert enc.shape == ref_enc.shape, (enc.shape, ref_enc.shape)
    diff = np.abs(enc - ref_enc)
    worst = float(diff.max())
    assert worst <= TOL, f"worst |Δ| = {worst:.3g} at {np.unravel_index(diff.argmax(), diff.shape)}"


@pytest.fixture(scope="module")
def small():
    return build(SMALL)


@pytest.fixture  # ~5 GB in torch and MLX together: freed right after its one test
def full_size():
    return build({})


def test_small_config_matches_reference(small):
    features, mask = features_and_mask([96], SMALL["input_feat_size"])
    assert_matches(*run_both(*small, features, mask))


def test_full_size_config_matches_reference_on_a_short_clip(full_size):
    features, mask = features_and_mask([250], 128)  # 2.5 s
    assert_matches(*run_both(*full_size, features, mask))


def test_padded_batch_of_two_clips_matches_reference(small):
    features, mask = features_and_mask([300, 173], SMALL["input_feat_size"])
    ours, theirs = run_both(*small, features, mask)
    assert_matches(ours, theirs)
    enc, out_mask = ours
    assert out_mask[1].any() and not out_mask[0].any()
    assert (enc[out_mask] == 0).all()  # padded encodings are zeroed


@pytest.mark.parametrize("length", [1, 7, 50, 97, 203])
def test_lengths_off_chunk_and_stride_multiples_match_reference(small, length):
    features, mask = features_and_mask([length], SMALL["input_feat_size"])
    assert_matches(*run_both(*small, features, mask))


def test_right_context_soft_cap_and_clipping_match_reference():
    ref, tower = build(ODD, seed=3)
    features, mask = features_and_mask([131, 64, 9], ODD["input_feat_size"])
    assert_matches(*run_both(ref, tower, features, mask))


def test_output_mask_is_input_mask_at_each_output_frames_first_input_frame(small):
    _, tower = small
    t, length = 203, 130
    _, mask = features_and_mask([t, length], SMALL["input_feat_size"])
    _, out_mask = tower(mx.zeros((2, t, SMALL["input_feat_size"])), mx.array(mask))
    frames = math.ceil(math.ceil(t / 2) / 2)  # two stride-2 convolutions with reverse-causal padding
    expected = mask[:, np.minimum(np.arange(frames) * 4, t - 1)][:, ::4]
    np.testing.assert_array_equal(np.array(out_mask), expected)


def test_bfloat16_tower_stays_close_to_float32(small):
    _, tower = small
    features, mask = features_and_mask([150, 111], SMALL["input_feat_size"])
    f32, _ = tower(mx.array(features), mx.array(mask))
    tower.set_dtype(mx.bfloat16)
    try:
        bf16, _ = tower(mx.array(features), mx.array(mask))
    finally:
        tower.set_dtype(mx.float32)  # the module fixture is shared
    assert bf16.dtype == mx.bfloat16
    rel = float(mx.abs(bf16.astype(mx.float32) - f32).max() / mx.abs(f32).max())
    assert rel < 0.05, f"bf16 deviates by {rel:.3g} of the largest activation"


def test_sanitize_converts_torch_conv_layouts_and_drops_buffers():
    weights = {
        "subsample_conv_projection.conv_0.conv.weight": mx.zeros((128, 1, 3, 3)),
        "subsample_conv_projection.conv_1.conv.weight": mx.zeros((32, 128, 3, 3)),
        "conformer.0.lconv1d.depthwise_conv1d.weight": mx.zeros((1536, 1, 5)),
        "conformer.0.attention.attn.q_proj.weight": mx.zeros((1536, 1536)),
        "conformer.0.attention.attn.relative_position_embedding.inv_timescales": mx.zeros((1, 1, 768)),
        "conformer.0.attention.attn.q_scale": mx.zeros(()),
    }
    shapes = {k: tuple(v.shape) for k, v in sanitize(weights).items()}
    assert shapes == {
        "subsample_conv_projection.conv_0.conv.weight": (128, 3, 3, 1),
        "subsample_conv_projection.conv_1.conv.weight": (32, 3, 3, 128),
        "conformer.0.lconv1d.depthwise_conv1d.weight": (1536, 5, 1),
        "conformer.0.attention.attn.q_proj.weight": (1536, 1536),
    }
