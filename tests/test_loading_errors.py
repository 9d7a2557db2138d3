"""A checkpoint that is not right stops loading with one sentence that names the problem and the file."""

import json
import os

import pytest
from safetensors.numpy import load_file, save_file

from mlx_gemma3n import load
from mlx_gemma3n.config import ConfigError, ModelConfig, load_config
from mlx_gemma3n.weights import CheckpointError


@pytest.fixture
def copy(tiny, tmp_path):
    """A copy of the tiny checkpoint: small files copied, weights linked (edit them via `rewrite`)."""
    src, _ = tiny
    dst = tmp_path / "ckpt"
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            os.symlink(f, dst / f.name)
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def weights_file(path):
    return next(path.glob("*.safetensors"))


def rewrite(path, edit):
    file = weights_file(path)
    tensors = load_file(file)
    edit(tensors)
    file.unlink()
    save_file(tensors, file, metadata={"format": "pt"})


def edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def one_line(message: str) -> bool:
    return "\n" not in message and message.endswith(".")


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load(tmp_path / "nowhere")
    assert one_line(str(e.value))


def test_a_file_instead_of_a_directory(copy):
    with pytest.raises(CheckpointError, match="is a file; give the checkpoint's directory"):
        load(copy / "config.json")


def test_not_a_gemma3n_config(copy):
    edit_config(copy, lambda c: c.update(model_type="llama"))
    with pytest.raises(CheckpointError, match="not a Gemma 3n checkpoint") as e:
        load(copy)
    assert str(copy / "config.json") in str(e.value)


def test_unknown_config_field(copy):
    edit_config(copy, lambda c: c["text_config"].update(mystery_knob=3))
    with pytest.raises(CheckpointError, match="fields mlx_gemma3n does not know: mystery_knob"):
        load(copy)


def test_contradictory_rope_thetas(copy):
    edit_config(copy, lambda c: c["text_config"].update(rope_theta=12345.0))
    with pytest.raises(CheckpointError, match="full_attention rope theta is given twice with different values"):
        load(copy)


def test_layer_types_of_the_wrong_length(copy):
    edit_config(copy, lambda c: c["text_config"].update(layer_types=["full_attention"] * 3))
    with pytest.raises(CheckpointError, match="layer_types has 3 entries for 8 layers"):
        load(copy)


def test_config_that_is_not_json(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load(copy)


def test_missing_tensor_names_the_tensor_and_checkpoint(copy):
    rewrite(copy, lambda t: t.pop("model.language_model.layers.3.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensors \(e.g. layers.3.mlp.up_proj.weight\)") as e:
        load(copy)
    assert str(copy) in str(e.value) and one_line(str(e.value))


def test_unexpected_tensor(copy):
    def add(t):
        t["model.language_model.layers.0.self_attn.extra.weight"] = t["model.language_model.norm.weight"]

    rewrite(copy, add)
    with pytest.raises(CheckpointError, match="tensors its config.json does not call for"):
        load(copy)


def test_misshaped_tensor(copy):
    def shrink(t):
        name = "model.language_model.layers.1.mlp.gate_proj.weight"
        t[name] = t[name][:-1]

    rewrite(copy, shrink)
    with pytest.raises(CheckpointError, match=r"layers.1.mlp.gate_proj.weight has shape \(127, 64\).*\(128, 64\)"):
        load(copy)


def test_truncated_weights_file(copy):
    file = weights_file(copy)
    data = file.read_bytes()
    file.unlink()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is truncated .* download it again") as e:
        load(copy)
    assert file.name in str(e.value)


def test_no_weights(copy):
    weights_file(copy).unlink()
    with pytest.raises(CheckpointError, match="holds no .safetensors weights"):
        load(copy)


def test_missing_tokenizer(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        load(copy)


WRONG_FIELDS = [
    ("text_config", "num_attention_heads", "4", '"4" (a string); it must be a positive integer.'),
    ("text_config", "num_hidden_layers", 8.0, "8.0 (a float); it must be a positive integer."),
    ("text_config", "hidden_size", True, "true (a boolean); it must be a positive integer."),
    ("text_config", "head_dim", 0, "0; it must be a positive integer."),
    ("text_config", "num_kv_shared_layers", -1, "-1; it must be a non-negative integer."),
    ("text_config", "rms_norm_eps", 0, "0; it must be a positive number."),
    ("text_config", "final_logit_softcapping", "30", '"30" (a string); it must be a positive number.'),
    ("text_config", "intermediate_size", [128] * 7 + [None], "intermediate_size[7] is null (null)"),
    ("text_config", "layer_types", "sliding_attention", "(a string); it must be a list."),
    ("text_config", "hidden_activation", "relu", 'it must be one of "gelu_pytorch_tanh", "gelu".'),
    ("text_config", "activation_sparsity_pattern", 1.0, "activation_sparsity_pattern[0] is 1.0; it must be a number in [0, 1)."),
    ("text_config", "altup_correct_scale", 1, "1 (an integer); it must be true or false."),
    ("text_config", "rope_parameters", {"full_attention": {"rope_theta": "1e6"}}, "full_attention.rope_theta is \"1e6\""),
    ("vision_config", "architecture", "resnet50", 'it must be one of "mobilenetv5_300m_enc".'),
    ("vision_config", "model_args", [1], "[1] (a list); it must be an object."),
    ("audio_config", "conf_num_hidden_layers", "12", '"12" (a string); it must be a positive integer.'),
    ("audio_config", "sscp_conv_kernel_size", [[3, 3], [3]], "sscp_conv_kernel_size[1] is [3] (a list of 1); it must be a list of 2 items."),
    ("audio_config", "sscp_conv_channel_size", [128, 32.5], "sscp_conv_channel_size[1] is 32.5 (a float)"),
    ("audio_config", "conf_residual_weight", float("nan"), "NaN; it must be a finite number."),
    (None, "audio_token_id", "262273", '"262273" (a string); it must be a non-negative integer.'),
    (None, "eos_token_id", [1, -106], "eos_token_id[1] is -106; it must be a non-negative integer."),
    (None, "vision_config", 3, "vision_config is 3 (an integer); it must be an object."),
]


@pytest.mark.parametrize("section, name, value, message", WRONG_FIELDS, ids=[f"{s}.{n}" for s, n, *_ in WRONG_FIELDS])
def test_a_field_of_the_wrong_type_or_range_is_named(tiny, section, name, value, message):
    config = json.loads((tiny[0] / "config.json").read_text())
    (config[section] if section else config)[name] = value
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(config)
    where = f"{section}.{name}" if section else name
    assert str(e.value).startswith(where) and message in str(e.value), str(e.value)
    assert one_line(str(e.value))


def test_load_names_the_wrong_field_instead_of_a_type_error(copy):
    edit_config(copy, lambda c: c["text_config"].update(num_attention_heads="4"))
    with pytest.raises(CheckpointError) as e:
        load(copy)
    assert str(e.value) == (
        f'{copy / "config.json"}: text_config.num_attention_heads is "4" (a string); it must be a positive integer.'
    )


def test_fields_are_normalised_to_their_types(tiny):
    config = ModelConfig.from_dict(json.loads((tiny[0] / "config.json").read_text()))
    assert isinstance(config.text.intermediate_size, tuple) and isinstance(config.text.rms_norm_eps, float)
    assert config.audio.sscp_conv_kernel_size == ((3, 3), (3, 3))
    assert isinstance(config.text.layer_types, tuple)


def test_both_dialects_parse_to_the_same_config(tiny):
    new = json.loads((tiny[0] / "config.json").read_text())
    old = json.loads(json.dumps(new))
    rope = old["text_config"].pop("rope_parameters")
    old["text_config"].update(rope_theta=rope["full_attention"]["rope_theta"],
                              rope_local_base_freq=rope["sliding_attention"]["rope_theta"])
    assert ModelConfig.from_dict(old) == ModelConfig.from_dict(new)


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json does not exist"):
        load_config(tmp_path)
