"""The MobileNet-V5 vision tower matches timm's `mobilenetv5_300m_enc` as transformers wires it for Gemma 3n.

The reference is transformers' TimmWrapperModel built from a Gemma3nVisionConfig (exactly what
Gemma3nModel builds as `vision_tower`), run with do_pooling=False and flattened the way
`Gemma3nModel.get_image_features` flattens it. Every parameter of the reference is randomised,
then copied into ours through `sanitize` + `load_weights(strict=True)`. Comparisons are float32.

Run with: LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python3 -m pytest tests/test_vision_tower.py
The two 768x768 tests are marked `slow`: on 2 shared CPU cores the full-size one took ~100 s and
the small-tower one ~55 s; the rest of the file ~30 s.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

from mlx_gemma3n.config import ConfigError, VisionConfig
from mlx_gemma3n.model import vision
from mlx_gemma3n.model.vision import VisionTower, sanitize

PREFIX = "model.vision_tower.timm_model."

# The small tower: timm's channel multiplier shrinks every stage (the stem, the attention heads
# and the 2048-d fusion output keep their size), ~38 M parameters instead of ~300 M.
SMALL = {"channel_multiplier": 0.25}
TOLERANCE = 1e-4  # float32, max |Δ| on outputs of magnitude ~1-10 (measured: <= 1.2e-5)


def reference_tower(model_args, seed=0):
    """transformers' vision tower for Gemma 3n, every parameter randomised at a sensible scale."""
    config = transformers.Gemma3nVisionConfig(model_args=model_args)
    model = transformers.AutoModel.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.ndim == 4:  # conv kernels: unit gain
                t.copy_(torch.randn(t.shape, generator=gen) / t[0].numel() ** 0.5)
            elif name.endswith("gamma"):  # layer scales (timm initialises them to 1e-5, hiding the branch)
                t.copy_(torch.rand(t.shape, generator=gen) * 0.8 + 0.2)
            elif name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            else:  # norm weights (timm initialises them to 1)
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    return model


def our_tower(reference, model_args) -> VisionTower:
    tower = VisionTower(VisionConfig(model_args=model_args))
    tower.load_weights(list(sanitize(checkpoint_tensors(reference.state_dict())).items()), strict=True)
    return tower


def checkpoint_tensors(state_dict) -> dict[str, mx.array]:
    """The reference's tensors named as the loader hands them to `sanitize` (checkpoint name minus PREFIX)."""
    return {k.removeprefix("timm_model."): mx.array(v.numpy()) for k, v in state_dict.items()}


def reference_tokens(reference, pixels: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = reference(pixel_values=pixels, do_pooling=False, return_dict=True).last_hidden_state
    # Gemma3nModel.get_image_features: (B, C, H, W) -> (B, C, H*W) -> (B, H*W, C).
    return out.reshape(out.shape[0], out.shape[1], -1).permute(0, 2, 1).numpy()


def our_tokens(tower, pixels: torch.Tensor) -> np.ndarray:
    out = tower(mx.array(pixels.permute(0, 2, 3, 1).numpy()))
    return np.array(out.astype(mx.float32))


def images(batch, height, width, seed=1):
    return torch.rand((batch, 3, height, width), generator=torch.Generator().manual_seed(seed))


def assert_close(ours, ref, tol, what):
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    worst = float(np.abs(ours - ref).max())
    assert worst <= tol, f"{what}: max |Δ| = {worst:.3g} > {tol} (reference max |x| = {np.abs(ref).max():.3g})"


@pytest.fixture(scope="module")
def small():
    reference = reference_tower(SMALL)
    return reference, our_tower(reference, SMALL)


def test_small_tower_matches_timm_on_a_batch(small):
    reference, tower = small
    pixels = images(2, 384, 384)  # grids 192 > 96 > 48 > 24 > 12: even sizes like 768, fused 24x24 -> 16x16
    assert_close(our_tokens(tower, pixels), reference_tokens(reference, pixels), TOLERANCE, "2 x 384x384")


@pytest.mark.parametrize(
    "height, width",
    [
        (300, 300),  # odd grids (75, 19): asymmetric 'same' padding, nearest 10 -> 19, bilinear 19 -> 16
        (512, 256),  # fused grid 32x16: average-pooled 2x1 down to 16x16
        (256, 320),  # non-square 16x20 grid: bilinear on the width only
        (192, 192),  # fused grid 12x12: bilinear *up* to 16x16
    ],
)
def test_small_tower_matches_timm_at_other_input_sizes(small, height, width):
    reference, tower = small
    pixels = images(1, height, width)
    assert_close(our_tokens(tower, pixels), reference_tokens(reference, pixels), TOLERANCE, f"{height}x{width}")


@pytest.mark.slow
def test_small_tower_matches_timm_on_a_768_image(small):
    reference, tower = small
    pixels = images(1, 768, 768)  # the processor's size: fused grid 48x48, average-pooled 3x3
    assert_close(our_tokens(tower, pixels), reference_tokens(reference, pixels), TOLERANCE, "768x768")


def test_parameter_names_and_shapes_equal_the_checkpoint():
    # transformers' full-size tower on the meta device: the names and shapes a Gemma 3n checkpoint
    # carries below PREFIX (those of the published E2B), without allocating them.
    with torch.device("meta"):
        reference = transformers.AutoModel.from_config(transformers.Gemma3nVisionConfig())
    expected = {k.removeprefix("timm_model."): tuple(v.shape) for k, v in reference.state_dict().items()}
    expected = {k: (v[0], v[2], v[3], v[1]) if len(v) == 4 else v for k, v in expected.items()}  # after sanitize
    tower = VisionTower(VisionConfig())  # parameters stay lazy: nothing is allocated
    ours = {k: tuple(v.shape) for k, v in tree_flatten(tower.parameters())}
    assert len(expected) == 548
    assert sorted(set(ours) ^ set(expected)) == []
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}


def test_sanitize_makes_torch_conv_kernels_channels_last():
    kernel = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5)  # torch (O, I, kH, kW)
    out = sanitize({"blocks.0.0.conv_exp.weight": mx.array(kernel), "msfa.norm.weight": mx.ones((4,))})
    np.testing.assert_array_equal(np.array(out["blocks.0.0.conv_exp.weight"]), kernel.transpose(0, 2, 3, 1))
    assert out["msfa.norm.weight"].shape == (4,)


def test_model_args_it_cannot_honour_are_rejected():
    with pytest.raises(ConfigError, match="features_only"):
        VisionTower(VisionConfig(model_args={"features_only": True}))


@pytest.mark.parametrize("dtype, tolerance", [(mx.bfloat16, 0.1), (mx.float16, 0.02)], ids=["bfloat16", "float16"])
def test_low_precision_stays_finite_and_close_with_large_weights(small, dtype, tolerance, monkeypatch):
    reference, _ = small
    # Large trained kernels: conv gains of 100 push pre-norm activations far past float16's 65504
    # (which a float16 pipeline would turn into inf / NaN). The attention query and key projections
    # keep unit gain: their product sets the softmax temperature, and scaling it turns attention
    # into a hard arg-max that any rounding flips, a property of the weights, not of our numerics.
    def gain(name, t):
        attention_logits = ".query.proj" in name or ".key.proj" in name
        return 100.0 if t.ndim == 4 and not attention_logits else 1.0

    big = {k: v * gain(k, v) for k, v in reference.state_dict().items()}
    tower = VisionTower(VisionConfig(model_args=SMALL))
    tower.load_weights(list(sanitize(checkpoint_tensors(big)).items()), strict=True)
    pixels = mx.array(images(1, 256, 256).permute(0, 2, 3, 1).numpy())

    norm, peaks = vision.rms_norm, []

    def recording_rms_norm(x, weight, eps=vision.NORM_EPS):
        peaks.append(mx.abs(x).max().item())
        return norm(x, weight, eps)

    monkeypatch.setattr(vision, "rms_norm", recording_rms_norm)
    exact = tower(pixels)
    monkeypatch.setattr(vision, "rms_norm", norm)
    assert max(peaks) > 65504, f"the test's premise: norm inputs beyond float16's range (peak {max(peaks):.3g})"

    tower.set_dtype(dtype)
    low = tower(pixels)
    assert bool(mx.isfinite(low).all()), f"{dtype} output has inf/NaN"
    rel = (mx.abs(low.astype(mx.float32) - exact).max() / mx.abs(exact).max()).item()
    assert rel < tolerance, f"{dtype}: max |Δ| / max |x| = {rel:.3g} against float32"


@pytest.mark.slow
def test_full_size_tower_matches_timm_on_a_768_image():
    reference = reference_tower(None)
    tower = our_tower(reference, None)
    pixels = images(1, 768, 768)
    expected = reference_tokens(reference, pixels)
    del reference
    assert_close(our_tokens(tower, pixels), expected, TOLERANCE, "full size 768x768")
