"""Quantization recipes: "compact" stores the MLP of the KV-shared layers at 3 bits and everything
else as uniform 4-bit does; its checkpoints load, run through our CPU-fast quantized layer, stay within a
measured KL of float and are smaller than uniform 4-bit's by exactly the bit they save."""

import json

import mlx.core as mx
import pytest

from mlx_gemma3n.convert import ConvertError, check_options, convert
from mlx_gemma3n.errors import InputError
from mlx_gemma3n.loading import load_model
from mlx_gemma3n.model.quantized import QuantizedLinear, dequantize_f32
from mlx_gemma3n.quantize import kl_divergence, recipe_bits

IDS = mx.array([[2, 105, 9, 17, 300, 17, 99, 5000, 262_143, 106, 9, 9]])
GROUP_SIZE = 32  # divides every width of the tiny checkpoint
# KL (nats) of the tiny random checkpoint's logits from float32's, whose weights are far larger
# than trained ones: measured uniform 4-bit 0.167, compact 0.183.
KL_COMPACT = 0.4


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    return {recipe: convert(tiny[0], root / recipe, quantize=True, bits=4, group_size=GROUP_SIZE, recipe=recipe,
                            show_progress=False)
            for recipe in ("uniform", "compact")}


SHARED = 5  # the tiny checkpoint's first KV-shared layer (8 layers, the last 3 shared)


@pytest.mark.parametrize("path, bits", [
    ("language_model.layers.5.mlp.gate_proj", 3),
    ("language_model.layers.6.mlp.up_proj", 3),
    ("language_model.layers.7.mlp.down_proj", 3),
    ("language_model.layers.4.mlp.down_proj", 4),
    ("language_model.layers.0.mlp.gate_proj", 4),
    ("language_model.layers.7.self_attn.q_proj", 4),
    ("language_model.layers.7.laurel.linear_left", 4),
    ("language_model.embed_tokens", 4),
    ("audio_tower.conformer.0.ffw_layer_end.ffw_layer_2", 4),
])
def test_compact_puts_the_mlp_of_the_kv_shared_layers_at_3_bits_and_the_rest_at_4(path, bits):
    assert recipe_bits(path, 4, "compact", first_kv_shared_layer=SHARED) == bits


def test_compact_without_the_first_kv_shared_layer_is_refused():
    with pytest.raises(InputError, match="first KV-shared layer"):
        recipe_bits("language_model.layers.7.mlp.down_proj", 4, "compact")


def test_an_unknown_recipe_is_an_input_error_naming_the_choices():
    with pytest.raises(InputError, match="uniform, mixed, compact"):
        recipe_bits("language_model.embed_tokens", 4, "smallest")


def test_compact_is_refused_at_other_than_4_bits():
    with pytest.raises(ConvertError, match="compact recipe is defined at 4 bits"):
        check_options(True, 8, 128, "compact", None)


def test_compact_checkpoint_lists_its_3_bit_layers_in_the_config(tiny, converted):
    block = json.loads((converted["compact"] / "config.json").read_text())["quantization"]
    layers = {k: v for k, v in block.items() if isinstance(v, dict)}
    count = len(json.loads((tiny[0] / "config.json").read_text())["text_config"]["layer_types"])
    assert block["bits"] == 4 and block["recipe"] == "compact"
    assert layers == {f"model.language_model.layers.{i}.mlp.{proj}": {"group_size": GROUP_SIZE, "bits": 3}
                      for i in range(SHARED, count) for proj in ("gate_proj", "up_proj", "down_proj")}


def test_compact_checkpoint_loads_its_3_bit_layers_as_ours(converted):
    model, _ = load_model(converted["compact"], dtype=mx.float32)
    for i, layer in enumerate(model.language_model.layers):
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            assert isinstance(proj, QuantizedLinear) and proj.bits == (3 if i >= SHARED else 4)


@pytest.mark.parametrize("rows", [1, 6])  # MLX's kernel below DEQUANTIZE_FROM_ROWS, the float GEMM from it
def test_a_3_bit_layer_multiplies_with_the_weight_it_stores(converted, rows):
    model, _ = load_model(converted["compact"], dtype=mx.float32)
    layer = model.language_model.layers[6].mlp.down_proj
    assert layer.bits == 3
    x = mx.random.normal((rows, layer.weight.shape[1] * 32 // 3), key=mx.random.key(rows))
    w = dequantize_f32(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    worst = mx.abs(layer(x) - x @ w.T).max().item()
    assert worst < 1e-4, f"worst difference {worst:.2e}"


def test_compact_runs_within_the_measured_kl_of_float(tiny, converted):
    reference, _ = load_model(tiny[0], dtype=mx.float32)
    model, _ = load_model(converted["compact"], dtype=mx.float32)
    kl = kl_divergence(reference(IDS), model(IDS))
    assert 0 < kl < KL_COMPACT, f"KL {kl:.4f} nats, bound {KL_COMPACT}"


def test_compact_is_smaller_than_uniform_4_bit_by_one_bit_per_weight_of_the_shared_layers_mlp(tiny, converted):
    sizes = {recipe: json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
             for recipe, path in converted.items()}
    text = json.loads((tiny[0] / "config.json").read_text())["text_config"]
    weights = sum(3 * text["hidden_size"] * width for width in text["intermediate_size"][SHARED:])
    assert sizes["uniform"] - sizes["compact"] == weights // 8
