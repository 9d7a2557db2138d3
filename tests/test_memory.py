"""Memory: the Per-Layer Embedding table read row by row from disk, towers read only when needed,
quantized conversion (ours and mlx-vlm's) that loads back close to bf16, and conversion that
fails cleanly."""

import errno
import json
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

from mlx_gemma3n import convert as convert_module
from mlx_gemma3n.config import load_config
from mlx_gemma3n.cli.convert import main
from mlx_gemma3n.convert import ConvertError, convert
from mlx_gemma3n.errors import InputError
from mlx_gemma3n.loading import load, load_model, preload_towers, unload_towers
from mlx_gemma3n.ple import PerLayerEmbeddings
from mlx_gemma3n.model.text import QuantizedScaledEmbedding
from mlx_gemma3n.quantize import kl_divergence
from mlx_gemma3n.weights import CheckpointError

# Text ids, special tokens and the audio/vision placeholder ids (beyond the PLE vocabulary).
IDS = mx.array([[2, 105, 9, 17, 300, 17, 262_145, 99, 262_273, 5000, 262_143, 106, 9, 9]])

# Documented bounds (nats, mean over positions) on the tiny random checkpoint, whose weights are
# much larger than trained ones (so these are loose): measured 8-bit ~1e-3, 4-bit ~0.15.
KL_8BIT = 0.01
KL_4BIT = 0.5


@pytest.fixture(scope="module")
def reference_logits(tiny):
    model, _ = load_model(tiny[0], dtype=mx.float32, lazy_ple=False)
    return model(IDS)


@pytest.fixture(scope="module")
def q8(tiny, tmp_path_factory):
    return convert(tiny[0], tmp_path_factory.mktemp("conv") / "q8", quantize=True, bits=8, group_size=32,
                   show_progress=False)


@pytest.fixture(scope="module")
def q4(tiny, tmp_path_factory):
    return convert(tiny[0], tmp_path_factory.mktemp("conv") / "q4", quantize=True, bits=4, group_size=32,
                   ple_bits=4, show_progress=False)


def worst(a, b) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


# ----------------------------------------------------------------------------- lazy PLE

@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_lazy_ple_logits_equal_the_fully_loaded_table_bit_for_bit(tiny, dtype):
    full, _ = load_model(tiny[0], dtype=dtype, lazy_ple=False)
    lazy, _ = load_model(tiny[0], dtype=dtype)
    a, b = full(IDS), lazy(IDS)
    assert mx.array_equal(a, b).item(), f"worst |diff| {worst(a, b)}"


def test_lazy_quantized_ple_equals_the_loaded_quantized_table_bit_for_bit(q4):
    full, _ = load_model(q4, dtype=mx.float32, lazy_ple=False)
    lazy, _ = load_model(q4, dtype=mx.float32)
    assert isinstance(full.language_model.embed_tokens_per_layer, QuantizedScaledEmbedding)
    assert lazy.language_model.embed_tokens_per_layer.quantized
    a, b = full(IDS), lazy(IDS)
    assert mx.array_equal(a, b).item(), f"worst |diff| {worst(a, b)}"


def test_lazy_ple_is_the_default_and_holds_no_parameters(tiny):
    model, _ = load_model(tiny[0])
    ple = model.language_model.embed_tokens_per_layer
    assert isinstance(ple, PerLayerEmbeddings)
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert not any("embed_tokens_per_layer" in k for k in names)


def test_a_resident_table_lets_the_next_step_be_built_before_the_token_is_known(tiny, tmp_path):
    """The lazy table must read the sampled token on the host before the next step's graph can
    exist; the resident one (`lazy_ple=False`, the CLI's --resident-ple) gathers on the device, so
    the next graph reaches back through the unevaluated sampling."""
    for lazy_ple in (True, False):
        model, _ = load_model(tiny[0], dtype=mx.float32, lazy_ple=lazy_ple)
        cache = model.make_cache()
        token = mx.argmax(model(mx.array([[2, 105, 9, 17]]), cache=cache)[:, -1:], axis=-1)
        following = model(token, cache=cache)
        dot = tmp_path / "step.dot"
        mx.export_to_dot(str(dot), following)
        assert ('label ="ArgReduce"' in dot.read_text()) == (not lazy_ple)  # the sampling's argmax


def test_hot_rows_come_from_the_cache_and_the_cache_stays_bounded(tiny):
    model, checkpoint = load_model(tiny[0])
    text = checkpoint.config.text
    ple = model.language_model.embed_tokens_per_layer
    row_bytes = text.num_hidden_layers * text.hidden_size_per_layer_input * 4  # the tiny table is float32
    small = PerLayerEmbeddings(
        checkpoint.locations["model.language_model.embed_tokens_per_layer.weight"], ple.scale,
        ple.num_embeddings, ple.dims, mx.float32, cache_bytes=4 * row_bytes,
    )
    first = small(mx.array([[7, 8, 7]]))
    assert (small.hits, small.misses) == (0, 2)
    again = small(mx.array([[7]]))
    assert small.hits == 1 and mx.array_equal(again[0, 0], first[0, 0]).item()
    small(mx.array([list(range(100, 140))]))
    assert len(small._cache) <= small._capacity == 4


def test_ple_ids_out_of_range_are_an_error_not_a_garbage_read(tiny):
    model, _ = load_model(tiny[0])
    with pytest.raises(InputError, match="must lie in"):
        model.language_model.embed_tokens_per_layer(mx.array([[262_144]]))


# ----------------------------------------------------------------------------- what a process imports

# Any import of these fails at once: PyTorch alone would add ~0.5 GB to the process.
REFUSE_HEAVY_IMPORTS = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "torch", "mlx_lm"):
            raise ImportError(f"{name} was imported")
sys.meta_path.insert(0, Refuse())
"""


def test_loading_and_generating_import_neither_transformers_torch_nor_mlx_lm(tiny):
    code = REFUSE_HEAVY_IMPORTS + (
        "from mlx_gemma3n import ChatSession, generate, load\n"
        f"model, tokenizer = load({str(tiny[0])!r})\n"
        "generate(model, tokenizer, 'hello world', max_tokens=4, temperature=0.7, top_k=5, repetition_penalty=1.2)\n"
        "print(len(list(ChatSession(model, tokenizer).send('the cat', max_tokens=3))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "3"


# ----------------------------------------------------------------------------- towers on demand

def test_text_only_generation_reads_no_audio_or_vision_tensor_from_mixed_shards(tiny):
    from mlx_gemma3n import generate

    model, tokenizer = load(tiny[0])
    checkpoint_names = model.towers.load.checkpoint.read_names
    generate(model, tokenizer, "hello world", max_tokens=4, temperature=0.0)
    towers = [n for n in checkpoint_names if "audio_tower" in n or "vision_tower" in n]
    assert not towers and not model.towers.loaded("audio") and not model.towers.loaded("vision")


def test_text_only_generation_opens_no_tower_file_of_a_converted_checkpoint(q8):
    from mlx_gemma3n import generate

    model, tokenizer = load(q8)
    checkpoint = model.towers.load.checkpoint
    generate(model, tokenizer, "hello world", max_tokens=4, temperature=0.0)
    assert {p.name for p in checkpoint.opened} == {"model-00001-of-00001.safetensors"}
    model.towers.get("audio")
    assert "audio_tower.safetensors" in {p.name for p in checkpoint.opened}
    assert "vision_tower.safetensors" not in {p.name for p in checkpoint.opened}


def test_towers_can_be_preloaded_and_unloaded(tiny):
    model, _ = load(tiny[0], preload=("audio",))
    assert model.towers.loaded("audio") and not model.towers.loaded("vision")
    preload_towers(model, "vision")
    assert model.towers.loaded("vision")
    unload_towers(model)
    assert not model.towers.loaded("audio") and not model.towers.loaded("vision")
    model.towers.get("audio")  # and they come back on use
    assert model.towers.loaded("audio")


# ----------------------------------------------------------------------------- conversion

@pytest.mark.parametrize("which, bound", [("q8", KL_8BIT), ("q4", KL_4BIT)])
def test_quantized_conversion_stays_within_the_documented_kl_of_bf16(which, bound, request, reference_logits):
    path = request.getfixturevalue(which)
    model, _ = load_model(path, dtype=mx.float32)
    assert isinstance(model.language_model.layers[0].mlp.gate_proj, nn.QuantizedLinear)
    assert isinstance(model.language_model.embed_tokens, QuantizedScaledEmbedding)
    kl = kl_divergence(reference_logits, model(IDS))
    assert kl < bound, f"KL {kl:.5f} nats exceeds {bound}"


def test_quantized_towers_load_as_quantized_layers(q4):
    model, _ = load_model(q4, dtype=mx.float32)
    audio = model.towers.get("audio")
    assert isinstance(audio.conformer[0].ffw_layer_start.ffw_layer_1, nn.QuantizedLinear)


def test_the_vision_towers_pointwise_convolutions_are_quantized_at_8_bits(tiny, q4):
    """Even in a 4-bit conversion (`VISION_BITS`); other kernels stay floating point."""
    from mlx_gemma3n.model.vision import Conv2d

    tower = load_model(q4, dtype=mx.float32)[0].towers.get("vision")
    float_tower = load_model(tiny[0], dtype=mx.float32)[0].towers.get("vision")
    layers = dict(tower.named_modules())
    quantized = [m for m in layers.values() if isinstance(m, nn.QuantizedLinear)]
    assert quantized and {m.bits for m in quantized} == {8}
    for path, m in float_tower.named_modules():
        if isinstance(m, Conv2d):  # every pointwise kernel whose width takes whole groups is quantized
            assert isinstance(layers[path], nn.QuantizedLinear) == (m.pointwise and m.weight.shape[-1] % 32 == 0)
    pixels = mx.array(np.random.default_rng(0).random((1, 64, 64, 3), dtype=np.float32))
    a, b = tower(pixels), float_tower(pixels)
    error = (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()
    # Measured 0.033: 8-bit rounding (~0.4% per weight) compounded over the random tower's blocks.
    assert error < 0.05, f"relative error of the quantized tower's output: {error:.4f}"


def test_converted_config_round_trips(tiny, q4):
    original, converted = load_config(tiny[0]), load_config(q4)
    assert converted.text == original.text and converted.audio == original.audio
    assert converted.vision == original.vision and converted.eos_token_ids == original.eos_token_ids
    assert converted.quantization["bits"] == 4 and converted.quantization["group_size"] == 32
    assert converted.quantization["mode"] == "affine"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (q4 / name).read_bytes() == (tiny[0] / name).read_bytes()


def test_mixed_recipe_keeps_the_sensitive_layers_at_8_bits(tiny, tmp_path):
    out = convert(tiny[0], tmp_path / "mixed", quantize=True, bits=4, group_size=32, recipe="mixed",
                  show_progress=False)
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert config["model.language_model.embed_tokens"] == {"group_size": 32, "bits": 8}
    model, _ = load_model(out)
    assert model.language_model.embed_tokens.bits == 8
    assert model.language_model.layers[0].mlp.gate_proj.bits == 4


def test_command_line_conversion(tiny, tmp_path, capsys):
    assert main(["--model", str(tiny[0]), "--out", str(tmp_path / "cli"), "-q", "--bits", "8"]) == 0
    assert "Wrote" in capsys.readouterr().out
    assert main(["--model", str(tiny[0]), "--out", str(tmp_path / "cli"), "-q"]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input

def test_a_ple_file_of_the_wrong_shape_is_named(q8, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(q8, broken)
    table = load_file(broken / "ple.safetensors")
    name = "model.language_model.embed_tokens_per_layer.weight"
    table[name] = table[name][:, :32]
    save_file(table, broken / "ple.safetensors")  # no fingerprint: only the shape can tell
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    assert index["weight_map"][name] == "ple.safetensors"
    with pytest.raises(CheckpointError, match=r"ple.safetensors: the Per-Layer Embedding table has shape \(262144, 32\)"):
        load_model(broken)


def test_a_file_converted_from_another_model_is_refused(tiny, q8, tmp_path):
    from checkpoints import make_checkpoint

    other_src = tmp_path / "other"
    make_checkpoint(other_src, dict(hidden_size_per_layer_input=4))
    other = convert(other_src, tmp_path / "other-q8", quantize=True, bits=8, group_size=32, show_progress=False)
    mixed = tmp_path / "mixed"
    shutil.copytree(q8, mixed)
    shutil.copy(other / "ple.safetensors", mixed / "ple.safetensors")
    with pytest.raises(CheckpointError, match="was converted from another model"):
        load_model(mixed)


def test_a_disk_that_fills_up_leaves_no_output_behind(tiny, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = convert_module._to_bytes

    def filling_disk(a):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(a)

    monkeypatch.setattr(convert_module, "_to_bytes", filling_disk)
    with pytest.raises(ConvertError, match="filled up while converting.*nothing was left behind"):
        convert(tiny[0], tmp_path / "out", quantize=True, bits=4, group_size=32, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_too_little_free_space_is_refused_before_writing(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 10**6))
    with pytest.raises(ConvertError, match="Not enough disk space .* Nothing was written"):
        convert(tiny[0], tmp_path / "out", quantize=True, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_already_quantized_checkpoint_is_not_converted_again(q8, tmp_path):
    with pytest.raises(ConvertError, match="already quantized"):
        convert(q8, tmp_path / "again", quantize=True, show_progress=False)


# ----------------------------------------------------------------------------- mlx-vlm conversions

@pytest.fixture(scope="module")
def mlx_vlm_pair(tmp_path_factory):
    """A tiny checkpoint mlx-vlm can read (uniform FFN widths, the KV weights of shared layers as in
    Google's files, processor files), mlx-vlm's own 4-bit conversion of it, and ours."""
    pytest.importorskip("mlx_vlm")
    from unittest import mock

    from checkpoints import make_checkpoint, write_processor_files

    root = tmp_path_factory.mktemp("mlx-vlm")
    src = root / "hf"
    make_checkpoint(src, dict(intermediate_size=[128] * 8), seed=3)
    tensors = load_file(src / "model.safetensors")
    rng = np.random.default_rng(0)
    for i in (5, 6, 7):  # transformers 5 leaves these out; mlx-vlm wants them
        p = f"model.language_model.layers.{i}.self_attn."
        tensors[p + "k_proj.weight"] = rng.standard_normal((32, 64)).astype(np.float32) * 0.1
        tensors[p + "v_proj.weight"] = rng.standard_normal((32, 64)).astype(np.float32) * 0.1
        tensors[p + "k_norm.weight"] = np.ones(16, np.float32)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    write_processor_files(src)

    # mlx-vlm builds the full-size MobileNet-V5 whatever vision_config.model_args says; our tiny
    # tower (channel_multiplier 0.25) is loaded into it non-strictly, and saved as it came.
    real = nn.Module.load_weights
    with mock.patch.object(nn.Module, "load_weights", lambda self, w, strict=True: real(self, w, strict=False)):
        from mlx_vlm.convert import convert as mlx_vlm_convert

        mlx_vlm_convert(str(src), mlx_path=str(root / "mlx-vlm-4bit"), quantize=True, q_bits=4, q_group_size=32)
    ours = convert(src, root / "ours-4bit", quantize=True, bits=4, group_size=32, ple_bits=4, show_progress=False)
    return src, root / "mlx-vlm-4bit", ours


def test_an_mlx_vlm_conversion_loads_and_matches_ours(mlx_vlm_pair):
    _, theirs, ours = mlx_vlm_pair
    text_ids = mx.array([[2, 105, 9, 17, 300, 17, 99, 5000, 262_143, 106, 9, 9]])
    a_model, checkpoint = load_model(theirs, dtype=mx.float32)
    b_model, _ = load_model(ours, dtype=mx.float32)
    assert checkpoint.layout == "mlx-vlm" and a_model.language_model.embed_tokens_per_layer.quantized
    a, b = a_model(text_ids), b_model(text_ids)
    assert mx.array_equal(a, b).item(), f"worst |diff| {worst(a, b)}"


def test_a_submodel_runs_elastically_from_an_mlx_vlm_conversion_as_from_ours(mlx_vlm_pair):
    from mlx_gemma3n.submodel import Submodel

    _, theirs, ours = mlx_vlm_pair
    text_ids = mx.array([[2, 105, 9, 17, 300, 17, 99, 5000, 262_143, 106, 9, 9]])
    submodel = Submodel([1], [64])
    a_model, _ = load_model(theirs, dtype=mx.float32)
    b_model, _ = load_model(ours, dtype=mx.float32)
    a, b = a_model(text_ids, submodel=submodel), b_model(text_ids, submodel=submodel)
    assert mx.array_equal(a, b).item(), f"worst |diff| {worst(a, b)}"
    assert worst(a, a_model(text_ids)) > 1e-3  # and it is another model than the full one


def test_an_mlx_vlm_conversion_brings_its_towers_back_to_our_layout(mlx_vlm_pair):
    src, theirs, _ = mlx_vlm_pair
    a_model, _ = load_model(theirs, dtype=mx.float32)
    b_model, _ = load_model(src, dtype=mx.float32)
    pixels = mx.array(np.random.default_rng(0).random((1, 64, 64, 3), dtype=np.float32))
    a, b = a_model.towers.get("vision")(pixels), b_model.towers.get("vision")(pixels)
    assert mx.array_equal(a, b).item(), f"vision worst |diff| {worst(a, b)}"
    features = mx.array(np.random.default_rng(1).standard_normal((1, 40, 128), dtype=np.float32))
    pad = mx.zeros((1, 40), dtype=mx.bool_)
    (a, _), (b, _) = a_model.towers.get("audio")(features, pad), b_model.towers.get("audio")(features, pad)
    assert mx.array_equal(a, b).item(), f"audio worst |diff| {worst(a, b)}"


def test_on_a_cpu_each_prompt_chunk_and_each_reply_hand_their_freed_memory_back(tiny, monkeypatch):
    """MLX's cache of freed buffers and glibc's free heap pages go back to the system after every
    prompt chunk, so that a long prompt's temporaries are not kept resident for the next chunk,
    and after the reply."""
    from mlx_gemma3n.runtime import generation

    releases = []
    monkeypatch.setattr(generation, "release_freed_memory", lambda: releases.append(1))
    model, tokenizer = load(tiny[0], dtype=mx.float32)
    prompt = list(range(10, 23))  # 13 tokens: 12 go in as chunks of 4, the last one with the reply
    replies = list(generation.stream_tokens(model, tokenizer, prompt, max_tokens=2, prefill_step_size=4,
                                            sampling=generation.SamplingOptions(temperature=0.0)))
    assert len(replies) == 2
    assert len(releases) == 3 + 1


def test_on_a_cpu_mlx_keeps_no_freed_buffers_once_a_model_is_loaded(tiny):
    """Freed buffers go back to the C library at once, where buffers of any size can reuse them,
    instead of waiting in MLX's cache for one of their own size."""
    model, tokenizer = load(tiny[0], dtype=mx.float32)
    logits = model(mx.array([list(range(10, 60))]))
    mx.eval(logits)
    del logits
    assert mx.get_cache_memory() == 0
