"""MatFormer sub-models: recipes and presets, their validation, and checkpoints sliced to disk
that equal transformers' model built from the sliced config and weights."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from checkpoints import make_checkpoint
from mlx_gemma3n.cli.matformer import main
from mlx_gemma3n.config import TextConfig
from mlx_gemma3n.convert import convert
from mlx_gemma3n.errors import InputError
from mlx_gemma3n import ChatSession, SamplingOptions, generate
from mlx_gemma3n.loading import load, load_model
from mlx_gemma3n.runtime.generation import stream_tokens
from mlx_gemma3n.slicing import slice_checkpoint
from mlx_gemma3n.submodel import PRESETS, Submodel, effective_parameters

TOL = 1e-3
# E4B-like: full attention every 5th layer, a KV-shared block (layers 6-9) fed by layers 4
# (full) and 5 (sliding), equal FFN widths, sparse FFNs in the first layers.
LAYERS = 10
TEXT = dict(
    num_hidden_layers=LAYERS, num_kv_shared_layers=4, intermediate_size=[128] * LAYERS,
    layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(LAYERS)],
    activation_sparsity_pattern=[0.95] * 3 + [0.0] * (LAYERS - 3),
    hidden_size_per_layer_input=32, vocab_size_per_layer_input=4096,
)
PLE_DIM = TEXT["hidden_size_per_layer_input"]
P = "model.language_model."


def worst(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def e4b_config() -> TextConfig:
    """Published E4B's text config: transformers' defaults."""
    from transformers import Gemma3nTextConfig

    return TextConfig.from_dict(Gemma3nTextConfig().to_dict())


def e2b_config() -> TextConfig:
    from transformers import Gemma3nTextConfig

    return TextConfig.from_dict(
        Gemma3nTextConfig(num_hidden_layers=30, intermediate_size=8192, num_kv_shared_layers=10).to_dict()
    )


@pytest.fixture(scope="module")
def e4b_like(tmp_path_factory):
    path = tmp_path_factory.mktemp("e4b-like")
    make_checkpoint(path, TEXT, seed=5)
    return path


@pytest.fixture(scope="module")
def ids():
    rng = np.random.RandomState(1)
    ids = np.concatenate([rng.randint(0, 4096, 20), rng.randint(4096, 262_144, 10)])[None]
    ids[0, 5], ids[0, 12] = 262_150, 262_300  # a vision and an audio id
    return ids


# ----------------------------------------------------------------------------- presets


def test_e4b_and_e2b_presets_count_the_parameters_google_counts():
    config = e4b_config()
    assert effective_parameters(config) == 3_980_491_248
    assert Submodel.preset("E4B").effective_parameters(config) == 3_980_491_248
    assert Submodel.preset("e2b").effective_parameters(config) == 1_905_495_648  # the notebook's E2B check


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_fits_e4b_and_its_size_is_near_the_published_one(preset):
    """Within 0.02 B: one layer at the wrong width would be 0.05 B off."""
    config = e4b_config()
    submodel = Submodel.preset(preset.name)
    kept = submodel.kept_layers(config)
    assert len(kept) == 35 - len(preset.skipped) and not set(kept) & set(preset.skipped)
    assert [i for i, w in zip(kept, submodel.widths(config)) if w == 16384] == [i for i in kept if i in preset.wide]
    assert abs(submodel.effective_parameters(config) / 1e9 - preset.effective_params_b) <= 0.02


def test_e2b_preset_config_is_googles_e2b():
    sliced = TextConfig.from_dict(Submodel.preset("E2B").sliced_config(e4b_config()))
    assert sliced == e2b_config()


def test_sliced_config_keeps_the_kept_layers_entries():
    text = TextConfig.from_dict(TEXT)
    sliced = Submodel([1, 7], [64, 96, 128, 64, 96, 128, 64, 96]).sliced_config(dict(TEXT))
    assert sliced["num_hidden_layers"] == 8
    assert sliced["num_kv_shared_layers"] == 3  # layer 7 was shared, layer 1 was not
    assert sliced["layer_types"] == [text.layer_types[i] for i in (0, 2, 3, 4, 5, 6, 8, 9)]
    assert sliced["activation_sparsity_pattern"] == [0.95, 0.95] + [0.0] * 6
    assert sliced["intermediate_size"] == [64, 96, 128, 64, 96, 128, 64, 96]
    assert sliced["vocab_size_per_layer_input"] == 4096  # the rest as given


def test_submodels_are_hashable_values():
    assert Submodel([21, 20, 20], 8192) == Submodel((20, 21), [8192])
    assert len({Submodel.preset("E2B"), Submodel.preset("E2B")}) == 1


@pytest.mark.parametrize("submodel, message", [
    (Submodel([5]), r"layer 5 cannot be skipped: the KV-shared layers 6-9 reuse its keys and values"),
    (Submodel([4, 8]), r"layer 4 cannot be skipped"),
    (Submodel([8], [256]), r"width 256 at layer 0, which stores 128"),
    (Submodel([8], [64, 64]), r"ffn_hidden_dims has 2 widths for 9 kept layers: give one per kept layer or one for all"),
    (Submodel([10]), r"names layer 10, but this model's layers are 0-9"),
    (Submodel.preset("E2.54B"), r"preset E2.54B is written for a 35-layer model \(E4B\) and this model has 10 layers"),
])
def test_a_recipe_that_breaks_the_model_is_refused_with_the_reason(submodel, message):
    with pytest.raises(InputError, match=message):
        submodel.validate(TextConfig.from_dict(TEXT))


def test_a_preset_on_e2b_is_refused():
    with pytest.raises(InputError, match="written for a 35-layer model .* has 30 layers"):
        Submodel.preset("E2.54B").widths(e2b_config())


def test_an_unknown_preset_names_the_known_ones():
    with pytest.raises(InputError, match="Unknown preset 'E9B': choose one of E4B, E2B, E1.96B"):
        Submodel.preset("E9B")


# ----------------------------------------------------------------------------- slicing to disk

RECIPES = {
    "skip-below-shared-block": Submodel([1, 3]),
    "skip-inside-shared-block": Submodel([6, 9], [64]),
    "mixed-widths": Submodel([2, 7], [128, 64, 96, 32, 128, 64, 96, 48]),
}


@pytest.fixture(scope="module", params=list(RECIPES))
def sliced(request, e4b_like, tmp_path_factory):
    submodel = RECIPES[request.param]
    out = slice_checkpoint(e4b_like, tmp_path_factory.mktemp("sliced") / request.param, submodel, show_progress=False)
    return submodel, out


def test_sliced_checkpoint_equals_transformers_on_the_sliced_weights(sliced, ids):
    from transformers import Gemma3nForConditionalGeneration

    _, out = sliced
    ours, _ = load(out, dtype=mx.float32)
    theirs = Gemma3nForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = theirs(input_ids=torch.tensor(ids)).logits.numpy()
    diff = worst(np.array(ours(mx.array(ids))), expected)
    assert diff <= TOL, f"worst |Δlogit| {diff:.2e}"


def test_sliced_weights_are_the_kept_layers_prefixes(sliced, e4b_like):
    submodel, out = sliced
    full = load_file(e4b_like / "model.safetensors")
    part = {}
    for f in out.glob("*.safetensors"):
        part.update(load_file(f))
    text = TextConfig.from_dict(TEXT)
    kept, widths = submodel.kept_layers(text), submodel.widths(text)
    for new, (old, w) in enumerate(zip(kept, widths)):
        a, b = f"{P}layers.{new}.", f"{P}layers.{old}."
        np.testing.assert_array_equal(part[a + "mlp.gate_proj.weight"], full[b + "mlp.gate_proj.weight"][:w])
        np.testing.assert_array_equal(part[a + "mlp.up_proj.weight"], full[b + "mlp.up_proj.weight"][:w])
        np.testing.assert_array_equal(part[a + "mlp.down_proj.weight"], full[b + "mlp.down_proj.weight"][:, :w])
        np.testing.assert_array_equal(part[a + "self_attn.q_proj.weight"], full[b + "self_attn.q_proj.weight"])
        block = slice(old * PLE_DIM, (old + 1) * PLE_DIM)
        np.testing.assert_array_equal(
            part[P + "embed_tokens_per_layer.weight"][:, new * PLE_DIM : (new + 1) * PLE_DIM],
            full[P + "embed_tokens_per_layer.weight"][:, block])
        np.testing.assert_array_equal(
            part[P + "per_layer_model_projection.weight"][new * PLE_DIM : (new + 1) * PLE_DIM],
            full[P + "per_layer_model_projection.weight"][block])
    assert not any(k.startswith(f"{P}layers.{len(kept)}.") for k in part)
    assert (out / "tokenizer.json").exists()


def test_a_refused_recipe_leaves_nothing_behind(e4b_like, tmp_path):
    with pytest.raises(InputError, match="layer 4 cannot be skipped"):
        slice_checkpoint(e4b_like, tmp_path / "out", Submodel([4]), show_progress=False)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- quantized conversions


@pytest.fixture(scope="module")
def q4(e4b_like, tmp_path_factory):
    return convert(e4b_like, tmp_path_factory.mktemp("q") / "q4", quantize=True, bits=4, group_size=32, ple_bits=4,
                   show_progress=False)


def _dequantized(model, name):
    m = model
    for part in name.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return np.array(mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits))


def test_a_quantized_conversion_slices_to_the_prefixes_of_its_weights(q4, tmp_path, ids):
    submodel = Submodel([3, 8], [64, 96, 32, 128, 64, 96, 32, 64])
    out = slice_checkpoint(q4, tmp_path / "q4-sliced", submodel, show_progress=False)
    full, _ = load_model(q4, dtype=mx.float32, lazy_ple=False)
    part, _ = load_model(out, dtype=mx.float32, lazy_ple=False)
    text = TextConfig.from_dict(TEXT)
    for new, (old, w) in enumerate(zip(submodel.kept_layers(text), submodel.widths(text))):
        a, b = f"language_model.layers.{new}.mlp.", f"language_model.layers.{old}.mlp."
        np.testing.assert_array_equal(_dequantized(part, a + "gate_proj"), _dequantized(full, b + "gate_proj")[:w])
        np.testing.assert_array_equal(_dequantized(part, a + "down_proj"), _dequantized(full, b + "down_proj")[:, :w])
        np.testing.assert_array_equal(
            _dequantized(part, "language_model.embed_tokens_per_layer")[:, new * PLE_DIM : (new + 1) * PLE_DIM],
            _dequantized(full, "language_model.embed_tokens_per_layer")[:, old * PLE_DIM : (old + 1) * PLE_DIM])
    assert np.isfinite(np.array(part(mx.array(ids)))).all()


def test_a_quantized_width_off_the_group_boundary_is_refused(q4, tmp_path):
    with pytest.raises(InputError, match="quantized in groups of 32 columns, so its width must be a multiple of 32, not 48"):
        slice_checkpoint(q4, tmp_path / "out", Submodel([], [48]), show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_slicing_while_quantizing_equals_quantizing_the_float_slice(e4b_like, tmp_path, ids):
    submodel = RECIPES["mixed-widths"]
    at_once = slice_checkpoint(e4b_like, tmp_path / "at-once", submodel, quantize=True, bits=4, group_size=32,
                               show_progress=False)
    float_slice = slice_checkpoint(e4b_like, tmp_path / "float", submodel, show_progress=False)
    two_steps = convert(float_slice, tmp_path / "two-steps", quantize=True, bits=4, group_size=32, show_progress=False)
    a, _ = load_model(at_once, dtype=mx.float32)
    b, _ = load_model(two_steps, dtype=mx.float32)
    assert worst(np.array(a(mx.array(ids))), np.array(b(mx.array(ids)))) == 0.0


def test_the_quantization_block_follows_the_renumbered_layers(e4b_like, tmp_path):
    mixed = convert(e4b_like, tmp_path / "mixed", quantize=True, bits=4, group_size=32, recipe="mixed",
                    show_progress=False)
    out = slice_checkpoint(mixed, tmp_path / "sliced", Submodel([0, 1]), show_progress=False)
    before = json.loads((mixed / "config.json").read_text())["quantization"]
    after = json.loads((out / "config.json").read_text())["quantization"]
    gate = "model.language_model.layers.{}.per_layer_input_gate"
    assert before[gate.format(9)] == after[gate.format(7)] == {"group_size": 32, "bits": 8}
    def per_layer(block, i):
        return {k.split(f".layers.{i}.")[1]: v for k, v in block.items() if f"language_model.layers.{i}." in k}

    assert per_layer(before, 2) and [per_layer(after, i) for i in range(8)] == [per_layer(before, i) for i in range(2, 10)]
    assert not per_layer(after, 8) and not per_layer(after, 9)
    load_model(out, dtype=mx.float32)  # every tensor where the config puts it


# ----------------------------------------------------------------------------- command line


def test_list_prints_every_preset_with_its_size_and_mmlu(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for p in PRESETS:
        assert any(line.split() == [p.name, str(35 - len(p.skipped)), f"{p.effective_params_b:.2f}", f"{p.mmlu:.2f}"]
                   for line in out.splitlines()), p.name


def test_the_command_writes_the_sub_model(e4b_like, tmp_path):
    out = tmp_path / "cli"
    assert main(["--model", str(e4b_like), "--out", str(out), "--layers-to-skip", "7,8", "--ffn-hidden-dims", "64"]) == 0
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert text["num_hidden_layers"] == 8 and text["intermediate_size"] == [64] * 8 and text["num_kv_shared_layers"] == 2


@pytest.mark.parametrize("argv, status, message", [
    (["--preset", "E9B"], 2, "error: Unknown preset 'E9B'"),
    (["--layers-to-skip", "1,x"], 2, "error: argument --layers-to-skip: '1,x' is not a comma-separated list"),
    (["--layers-to-skip", "4"], 1, "error: layer 4 cannot be skipped"),
])
def test_bad_input_is_one_line_and_a_status(e4b_like, tmp_path, capsys, argv, status, message):
    assert main(["--model", str(e4b_like), "--out", str(tmp_path / "out"), *argv]) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message) and not (tmp_path / "out").exists()


def test_a_missing_model_is_one_line_and_status_1(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--preset", "E2B"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "does not exist" in err[0]


# ----------------------------------------------------------------------------- elastic execution


@pytest.fixture(scope="module")
def full(e4b_like):
    return load(e4b_like, dtype=mx.float32)


def test_an_elastic_submodel_equals_its_sliced_checkpoint(full, sliced, ids):
    model, tokenizer = full
    submodel, out = sliced
    standalone, _ = load(out, dtype=mx.float32)
    diff = worst(model(mx.array(ids), submodel=submodel), standalone(mx.array(ids)))
    assert diff <= 1e-4, f"worst |Δlogit| {diff:.2e}"
    greedy = dict(temperature=0.0, max_tokens=8)
    assert generate(model, tokenizer, "hello world", submodel=submodel, **greedy) == generate(
        standalone, tokenizer, "hello world", **greedy)


def test_the_full_model_is_unchanged_after_running_a_submodel(full, ids):
    model, _ = full
    before = np.array(model(mx.array(ids)))
    model(mx.array(ids), submodel=RECIPES["mixed-widths"])
    # The same weights; only the order of a sum differs (down_proj is now stored in two blocks).
    diff = worst(model(mx.array(ids)), before)
    assert diff <= 1e-5, f"worst |Δlogit| {diff:.2e}"


def test_a_chat_changes_size_and_goes_on_from_its_conversation(full):
    model, tokenizer = full
    greedy = SamplingOptions(temperature=0.0)
    session = ChatSession(model, tokenizer, sampling=greedy)
    list(session.send("hello world", max_tokens=4))
    session.resize(RECIPES["skip-inside-shared-block"])
    second = [r.token for r in session.send("the cat", max_tokens=4)]
    assert session.last_prefill == len(session.last_prompt)  # recomputed at the new size
    fresh = [r.token for r in stream_tokens(model, tokenizer, session.last_prompt, max_tokens=4, sampling=greedy,
                                            submodel=RECIPES["skip-inside-shared-block"])]
    assert second == fresh


def test_an_elastic_submodel_of_a_quantized_conversion_equals_its_slice(q4, tmp_path, ids):
    submodel = Submodel([6, 9], [64])
    model, _ = load(q4, dtype=mx.float32)
    standalone, _ = load(slice_checkpoint(q4, tmp_path / "q4-slice", submodel, show_progress=False), dtype=mx.float32)
    diff = worst(model(mx.array(ids), submodel=submodel), standalone(mx.array(ids)))
    assert diff <= 1e-4, f"worst |Δlogit| {diff:.2e}"


def test_an_elastic_recipe_that_breaks_the_model_is_refused(full, ids):
    model, _ = full
    with pytest.raises(InputError, match="layer 4 cannot be skipped"):
        model(mx.array(ids), submodel=Submodel([4]))
    with pytest.raises(InputError, match="written for a 35-layer model"):
        model.make_cache(submodel="E2B")


def test_chat_size_command_shows_and_refuses_in_one_line(full):
    import io

    from mlx_gemma3n.cli.chat import Chat

    model, tokenizer = full
    out = io.StringIO()
    chat = Chat(ChatSession(model, tokenizer), max_tokens=2, out=out)
    chat.command("/size")
    chat.command("/size E2B")  # a preset of E4B's 35 layers: this model has 10
    lines = out.getvalue().splitlines()
    assert lines[0] == "[size: full]"
    assert lines[1].startswith("error: preset E2B is written for a 35-layer model")
    assert chat.session.plan is None
