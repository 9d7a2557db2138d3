"""Typed Gemma 3n configs, read from a checkpoint's `config.json`.

Two dialects exist in the wild and both load to the same `ModelConfig`:
transformers 4.53 (`rope_theta`, `rope_local_base_freq`) and transformers 5
(`rope_parameters` keyed by layer type). Fields we do not know, and fields that
contradict each other, are errors: a silently ignored field is a silently wrong model.
"""

from __future__ import annotations

import json
import math
import numbers
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError


class ConfigError(CheckpointError):
    """A config.json that does not describe a Gemma 3n model we can run."""


# Keys every transformers config carries (and older releases carried) that say nothing
# about the architecture.
_GENERIC_KEYS = frozenset(
    """
    _name_or_path architectures chunk_size_feed_forward dtype torch_dtype id2label label2id
    is_encoder_decoder model_type output_attentions output_hidden_states problem_type return_dict
    transformers_version use_cache initializer_range tie_word_embeddings pad_token_id bos_token_id
    eos_token_id add_cross_attention bad_words_ids begin_suppress_tokens cross_attention_hidden_size
    decoder_start_token_id diversity_penalty do_sample early_stopping encoder_no_repeat_ngram_size
    exponential_decay_length_penalty finetuning_task forced_bos_token_id forced_eos_token_id
    is_decoder length_penalty max_length min_length no_repeat_ngram_size num_beam_groups num_beams
    num_return_sequences output_scores prefix pruned_heads remove_invalid_values repetition_penalty
    return_dict_in_generate sep_token_id suppress_tokens task_specific_params temperature
    tf_legacy_loss tie_encoder_decoder tokenizer_class top_k top_p torchscript typical_p use_bfloat16
    label_names num_classes num_labels attention_dropout altup_lr_multiplier
    _attn_implementation_autoset
    """.split()
)


def _check_known(section: str, d: dict, known: set[str]) -> None:
    unknown = sorted(set(d) - known - _GENERIC_KEYS)
    if unknown:
        raise ConfigError(
            f"{section} has fields mlx_gemma3n does not know: {', '.join(unknown)}. "
            "It is not a Gemma 3n config we can run faithfully; check the checkpoint."
        )


def _same(section: str, name: str, a, b) -> None:
    if a is not None and b is not None and not math.isclose(float(a), float(b)):
        raise ConfigError(f"{section}: {name} is given twice with different values ({a} and {b}).")


# What a field's value may be beyond its type. Integers are positive unless listed as
# non-negative; numbers may be any finite value unless listed as positive or as fractions.
_NON_NEGATIVE = frozenset(
    """
    altup_active_idx num_kv_shared_layers conf_attention_context_left conf_attention_context_right vocab_offset
    eos_token_ids boi_token_id eoi_token_id image_token_id boa_token_id eoa_token_id audio_token_id
    """.split()
)
_POSITIVE = frozenset(
    """
    rms_norm_eps rope_theta rope_local_base_freq final_logit_softcapping altup_coef_clip gradient_clipping
    conf_attention_logit_cap sscp_conv_group_norm_eps
    """.split()
)
_FRACTIONS = frozenset({"activation_sparsity_pattern"})  # probabilities in [0, 1)
_CHOICES = {
    "hidden_activation": ("gelu_pytorch_tanh", "gelu"),
    "layer_types": ("full_attention", "sliding_attention"),
    "architecture": ("mobilenetv5_300m_enc",),
}


def _shown(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind(value) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (numbers.Integral, "an integer"), (numbers.Real, "a float"),
                       (str, "a string"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "a list" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"


def _expected(name: str, hint) -> str:
    if hint is int:
        return "a non-negative integer" if name in _NON_NEGATIVE else "a positive integer"
    if hint is float:
        return "a positive number" if name in _POSITIVE else "a number in [0, 1)" if name in _FRACTIONS else "a finite number"
    if hint is bool:
        return "true or false"
    if hint is str:
        return "one of " + ", ".join(json.dumps(c) for c in _CHOICES[name]) if name in _CHOICES else "a string"
    if hint is dict:
        return "an object"
    return "a list"


def _in_range(name: str, hint, value) -> bool:
    if hint is int:
        return value >= 0 if name in _NON_NEGATIVE else value > 0
    if hint is float:
        return math.isfinite(value) and (
            value > 0 if name in _POSITIVE else 0 <= value < 1 if name in _FRACTIONS else True
        )
    if hint is str and name in _CHOICES:
        return value in _CHOICES[name]
    return True


def _checked(where: str, name: str, value, hint):
    """`value` as the type `hint` asks for (lists become tuples), or a ConfigError naming `where`.

    An integer must be a JSON integer: transformers writes them so, and a 4.0 or a "4" means the
    file was made by hand or by a tool we should not trust to have got the rest right.
    """
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} is {_shown(value)} ({_kind(value)}); it must be a list.")
        if items[-1] is not Ellipsis and len(value) != len(items):
            raise ConfigError(f"{where} is {_shown(value)} (a list of {len(value)}); it must be a list of {len(items)} items.")
        each = items if items[-1] is not Ellipsis else (items[0],) * len(value)
        return tuple(_checked(f"{where}[{i}]", name, v, h) for i, (v, h) in enumerate(zip(value, each)))
    kinds = {int: numbers.Integral, float: numbers.Real, bool: bool, str: str, dict: dict}[hint]
    if not isinstance(value, kinds) or (hint is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where} is {_shown(value)} ({_kind(value)}); it must be {_expected(name, hint)}.")
    normalised = hint(value) if hint in (int, float) else value
    if not _in_range(name, hint, normalised):
        raise ConfigError(f"{where} is {_shown(value)}; it must be {_expected(name, hint)}.")
    return normalised


def _check_fields(config, section: str) -> None:
    """Check every field of the dataclass `config` against its annotation, normalising in place."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        if f.name != "raw" and not is_dataclass(hints[f.name]):  # the sections check themselves
            where = f"{section}.{f.name}" if section else f.name
            object.__setattr__(config, f.name, _checked(where, f.name, getattr(config, f.name), hints[f.name]))


def _section(where: str, value) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} is {_shown(value)} ({_kind(value)}); it must be an object.")
    return value


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 262_400
    hidden_size: int = 2048
    intermediate_size: tuple[int, ...] = ()
    num_hidden_layers: int = 35
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 32_768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # full-attention layers
    rope_local_base_freq: float = 10_000.0  # sliding-window layers
    sliding_window: int = 512
    layer_types: tuple[str, ...] = ()
    final_logit_softcapping: float | None = 30.0
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    altup_active_idx: int = 0
    altup_coef_clip: float = 120.0
    altup_correct_scale: bool = True
    altup_num_inputs: int = 4
    num_kv_shared_layers: int = 15
    laurel_rank: int = 64
    activation_sparsity_pattern: tuple[float, ...] = ()
    attention_bias: bool = False

    def __post_init__(self):
        _check_fields(self, "text_config")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TextConfig":
        section = "text_config"
        known = {f.name for f in fields(cls)} | {
            "rope_parameters", "rope_scaling", "query_pre_attn_scalar", "use_bidirectional_attention",
        }
        _check_known(section, d, known)
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        n = _checked(f"{section}.num_hidden_layers", "num_hidden_layers", d.get("num_hidden_layers", cls.num_hidden_layers), int)
        kw["num_hidden_layers"] = n

        if d.get("rope_scaling"):
            raise ConfigError(f"{section}: rope_scaling {d['rope_scaling']} is not supported (Gemma 3n uses plain RoPE).")
        if d.get("use_bidirectional_attention"):
            raise ConfigError(f"{section}: use_bidirectional_attention is set; Gemma 3n generation is causal.")
        rope = _section(f"{section}.rope_parameters", d.get("rope_parameters") or {})
        for layer_type, ours in (("full_attention", "rope_theta"), ("sliding_attention", "rope_local_base_freq")):
            where = f"{section}.rope_parameters.{layer_type}"
            params = _section(where, rope.get(layer_type) or {})
            if params.get("rope_type", "default") != "default":
                raise ConfigError(f"{section}: rope_type {params['rope_type']!r} for {layer_type} is not supported.")
            if ours in d:
                kw[ours] = _checked(f"{section}.{ours}", ours, d[ours], float)
            if "rope_theta" in params:
                theta = _checked(f"{where}.rope_theta", ours, params["rope_theta"], float)
                _same(section, f"the {layer_type} rope theta", theta, kw.get(ours))
                kw[ours] = theta

        ffn = d.get("intermediate_size", 16_384)
        kw["intermediate_size"] = ffn if isinstance(ffn, (list, tuple)) else [ffn] * n
        kw["layer_types"] = d.get("layer_types") or [
            "full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n)
        ]
        sparsity = d.get("activation_sparsity_pattern")
        if sparsity is None:
            sparse = 10 if n > 10 else 0
            sparsity = [0.95] * sparse + [0.0] * (n - sparse)
        elif not isinstance(sparsity, (list, tuple)):
            sparsity = [sparsity] * n
        kw["activation_sparsity_pattern"] = sparsity
        config = cls(**kw)
        config.validate()
        return config

    def validate(self) -> None:
        s, n = "text_config", self.num_hidden_layers
        for name in ("intermediate_size", "layer_types", "activation_sparsity_pattern"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"{s}: {name} has {len(getattr(self, name))} entries for {n} layers.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{s}: {self.num_attention_heads} heads cannot share {self.num_key_value_heads} kv heads.")
        if not 0 <= self.num_kv_shared_layers < n:
            raise ConfigError(f"{s}: num_kv_shared_layers={self.num_kv_shared_layers} must lie in [0, {n}).")
        if self.num_kv_shared_layers and set(self.layer_types[: self.first_kv_shared_layer]) != set(self.layer_types):
            raise ConfigError(f"{s}: the KV-shared layers need a layer of each type below them to share from.")
        if not 0 <= self.altup_active_idx < self.altup_num_inputs:
            raise ConfigError(f"{s}: altup_active_idx {self.altup_active_idx} is out of range.")

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers


@dataclass(frozen=True)
class VisionConfig:
    architecture: str = "mobilenetv5_300m_enc"
    model_args: dict | None = None
    hidden_size: int = 2048
    vocab_size: int = 128
    vocab_offset: int = 262_144
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        _check_fields(self, "vision_config")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        _check_known("vision_config", d, {f.name for f in fields(cls)} | {"do_pooling", "pretrained_cfg"})
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class AudioConfig:
    vocab_size: int = 128
    vocab_offset: int = 262_272
    input_feat_size: int = 128
    hidden_size: int = 1536
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10  # the reference clamps activations to this at inference too
    conf_attention_chunk_size: int = 12
    conf_attention_context_left: int = 13
    conf_attention_context_right: int = 0
    conf_attention_logit_cap: float = 50.0
    conf_num_attention_heads: int = 8
    conf_num_hidden_layers: int = 12
    conf_conv_kernel_size: int = 5
    conf_reduction_factor: int = 4
    conf_residual_weight: float = 0.5
    sscp_conv_channel_size: tuple[int, ...] = (128, 32)
    sscp_conv_group_norm_eps: float = 1e-3
    sscp_conv_kernel_size: tuple[tuple[int, int], ...] = ((3, 3), (3, 3))
    sscp_conv_stride_size: tuple[tuple[int, int], ...] = ((2, 2), (2, 2))

    def __post_init__(self):
        _check_fields(self, "audio_config")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AudioConfig":
        _check_known("audio_config", d, {f.name for f in fields(cls)})
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    eos_token_ids: tuple[int, ...] = (1, 106)
    audio_soft_tokens_per_image: int = 188
    vision_soft_tokens_per_image: int = 256
    boi_token_id: int = 255_999
    eoi_token_id: int = 262_144
    image_token_id: int = 262_145
    boa_token_id: int = 256_000
    eoa_token_id: int = 262_272
    audio_token_id: int = 262_273
    quantization: dict | None = None  # written by our converter (and mlx-vlm's)
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        _check_fields(self, "")

    _TOKEN_FIELDS = (
        "audio_soft_tokens_per_image", "vision_soft_tokens_per_image", "boi_token_id", "eoi_token_id",
        "image_token_id", "boa_token_id", "eoa_token_id", "audio_token_id",
    )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if d.get("model_type") not in ("gemma3n", "gemma3n_text"):
            raise ConfigError(
                f"model_type is {d.get('model_type')!r}, not 'gemma3n': this is not a Gemma 3n checkpoint."
            )
        if d["model_type"] == "gemma3n_text":  # a text-only config
            return cls(text=TextConfig.from_dict(d), eos_token_ids=_ids(d.get("eos_token_id", 1)), raw=d)
        # mlx-vlm's conversions also embed a copy of generation_config.json.
        known = {"text_config", "vision_config", "audio_config", "quantization", "quantization_config",
                 "generation_config", *cls._TOKEN_FIELDS}
        _check_known("config.json", d, known)
        if "text_config" not in d:
            raise ConfigError("config.json has no text_config: it is not a complete Gemma 3n config.")
        text_config = _section("text_config", d["text_config"])
        text = TextConfig.from_dict(text_config)
        eos = _ids(d.get("eos_token_id")) + _ids(text_config.get("eos_token_id", 1))
        return cls(
            text=text,
            vision=VisionConfig.from_dict(_section("vision_config", d.get("vision_config") or {})),
            audio=AudioConfig.from_dict(_section("audio_config", d.get("audio_config") or {})),
            eos_token_ids=tuple(dict.fromkeys(_checked("eos_token_id", "eos_token_ids", eos, tuple[int, ...]))) or (1,),
            quantization=d.get("quantization") or d.get("quantization_config"),
            raw=d,
            **{k: d[k] for k in cls._TOKEN_FIELDS if d.get(k) is not None},
        )


def _ids(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"{file} does not exist: a Gemma 3n checkpoint directory holds a config.json.")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON ({e}).") from None
    try:
        return ModelConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{file}: a field has the wrong type ({e}).") from None
