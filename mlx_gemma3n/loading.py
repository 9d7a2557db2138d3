"""`load(model)`: checkpoint -> (Gemma3n, tokenizer), towers left on disk until first needed."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from .model.gemma3n import Gemma3n
from .weights import Checkpoint, CheckpointError, load_into


def _tower_builder(checkpoint: Checkpoint, dtype):
    def load_tower(kind: str):
        if kind == "vision":
            from .model import vision as module

            tower = module.VisionTower(checkpoint.config.vision)
        elif kind == "audio":
            from .model import audio as module

            tower = module.AudioTower(checkpoint.config.audio)
        else:
            raise ValueError(f"Unknown tower {kind!r}: Gemma 3n has a 'vision' and an 'audio' tower.")
        weights = checkpoint.read(f"{kind}_tower.")
        if not weights:
            raise CheckpointError(f"{checkpoint.path} has no {kind} tower weights: this checkpoint is text-only.")
        load_into(tower, module.sanitize(weights), f"{kind} tower", checkpoint.path, dtype)
        mx.eval(tower.parameters())
        return tower

    return load_tower


def load_model(model: str | Path, dtype: mx.Dtype = mx.bfloat16) -> tuple[Gemma3n, Checkpoint]:
    checkpoint = Checkpoint.open(model)
    net = Gemma3n(checkpoint.config)
    for part in ("language_model", "embed_vision", "embed_audio"):
        load_into(getattr(net, part), checkpoint.read(f"{part}."), part.replace("_", " "), checkpoint.path, dtype)
    mx.eval(net.parameters())
    net.load_tower = _tower_builder(checkpoint, dtype)
    return net, checkpoint


def _eos_ids(checkpoint: Checkpoint) -> list[int]:
    ids = list(checkpoint.config.eos_token_ids)
    generation = checkpoint.path / "generation_config.json"
    if generation.exists():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    return list(dict.fromkeys(ids))


def load(model: str | Path, dtype: mx.Dtype = mx.bfloat16) -> tuple[Gemma3n, TokenizerWrapper]:
    """Load a Gemma 3n checkpoint (directory or Hugging Face repo id) and its tokenizer."""
    net, checkpoint = load_model(model, dtype)
    if not (checkpoint.path / "tokenizer.json").exists() and not (checkpoint.path / "tokenizer.model").exists():
        raise CheckpointError(f"{checkpoint.path} has no tokenizer.json or tokenizer.model: copy the tokenizer files in.")
    tokenizer = load_tokenizer(checkpoint.path, eos_token_ids=_eos_ids(checkpoint))
    return net, tokenizer
