"""Find a checkpoint (local directory or Hugging Face repo id), read its safetensors lazily,
map checkpoint names to ours, and check that every tensor is there with the right shape.

Knows names and shapes, nothing about layers; layout quirks of a tower live in its `sanitize`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ConfigError, ModelConfig, load_config


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or not what its config says."""


# What a download needs; the PLE table and towers come with the safetensors.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]

# Checkpoint prefix -> our module path. Longest prefix first.
_PREFIXES = (
    ("model.vision_tower.timm_model.", "vision_tower."),
    ("model.audio_tower.", "audio_tower."),
    ("model.language_model.", "language_model."),
    ("model.embed_vision.", "embed_vision."),
    ("model.embed_audio.", "embed_audio."),
)
# KV-shared layers compute no keys or values; published files still carry these (unused).
_SHARED_LAYER_UNUSED = ("k_proj", "v_proj", "k_norm", "v_norm")


def resolve(model: str | Path) -> Path:
    """A local checkpoint directory, or a Hugging Face repo id downloaded (only the files needed)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; give the checkpoint's directory (the one holding config.json).")
        return path
    if str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise CheckpointError(f"{model} does not exist: give a checkpoint directory or a Hugging Face repo id.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as e:  # the hub raises many kinds; the person needs one sentence
        raise CheckpointError(f"Could not download {model} from the Hugging Face Hub ({type(e).__name__}: {e}).") from None


def _safetensors_header(file: Path) -> dict:
    """Read and check a safetensors header, so a truncated download fails here, by name."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file} is truncated or empty ({size} bytes): download it again.")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{file} is truncated (its header alone claims {n} bytes): download it again.")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file} is not a safetensors file (unreadable header).") from None
    header.pop("__metadata__", None)
    end = 8 + n + max((t["data_offsets"][1] for t in header.values()), default=0)
    if size < end:
        raise CheckpointError(f"{file} is truncated ({size} of {end} bytes): download it again.")
    return header


@dataclass
class Checkpoint:
    """A checkpoint on disk: its config and where each of its tensors lies."""

    path: Path
    config: ModelConfig
    shapes: dict[str, tuple[int, ...]]  # checkpoint name -> shape
    files: dict[str, Path]  # checkpoint name -> file
    opened: set[Path] = field(default_factory=set)  # files read so far (towers load on demand)

    @classmethod
    def open(cls, model: str | Path) -> "Checkpoint":
        path = resolve(model)
        try:
            config = load_config(path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            names_by_file: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                names_by_file.setdefault(file, []).append(name)
            for file in names_by_file:
                if not (path / file).exists():
                    raise CheckpointError(f"{path / file} is missing: the index lists it; download it again.")
            files = sorted(path / f for f in names_by_file)
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} holds no .safetensors weights.")
        shapes, where = {}, {}
        for file in files:
            for name, info in _safetensors_header(file).items():
                shapes[name], where[name] = tuple(info["shape"]), file
        return cls(path, config, shapes, where)

    def our_name(self, name: str) -> str | None:
        """Our parameter path for a checkpoint name, or None for tensors we do not use."""
        if name == "lm_head.weight":  # tied to embed_tokens
            return None
        for theirs, ours in _PREFIXES:
            if name.startswith(theirs):
                ours = ours + name[len(theirs):]
                break
        else:
            return name
        parts = ours.split(".")
        if parts[:2] == ["language_model", "layers"] and parts[3] == "self_attn" and parts[4] in _SHARED_LAYER_UNUSED:
            text = self.config.text
            if text.kv_source(int(parts[2])) != int(parts[2]):
                return None
        return ours

    def read(self, prefix: str) -> dict[str, mx.array]:
        """Every tensor whose (our) name starts with `prefix`, lazily, named below the prefix."""
        wanted = {}
        for name in self.shapes:
            ours = self.our_name(name)
            if ours is not None and ours.startswith(prefix):
                wanted.setdefault(self.files[name], {})[name] = ours[len(prefix):]
        out = {}
        for file, names in wanted.items():
            self.opened.add(file)
            tensors = mx.load(str(file))
            out.update({ours: tensors[theirs] for theirs, ours in names.items()})
        return out


def load_into(module, weights: dict[str, mx.array], what: str, path: Path, dtype: mx.Dtype | None) -> None:
    """Load `weights` into `module`, first checking names and shapes so that a mismatch is one sentence."""
    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(
            f"{path}: the {what} is missing {len(missing)} tensors (e.g. {', '.join(missing[:3])}); "
            "the checkpoint is incomplete or does not match its config.json."
        )
    if unexpected:
        raise CheckpointError(
            f"{path}: the {what} has {len(unexpected)} tensors its config.json does not call for "
            f"(e.g. {', '.join(unexpected[:3])}); the checkpoint does not match its config."
        )
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: {what} tensor {name} has shape {tuple(value.shape)}, but config.json implies "
                f"{tuple(expected[name].shape)}."
            )
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    module.load_weights(list(weights.items()), strict=True)
