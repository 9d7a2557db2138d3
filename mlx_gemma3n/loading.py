"""`load(model)`: checkpoint -> (Gemma3n, tokenizer), with as little resident as possible:
the Per-Layer Embedding table stays on disk (memory-mapped, rows gathered per step), the towers
stay on disk until the first image or audio, and quantized checkpoints load as MLX quantized
layers (ours, or mlx-vlm's conversions)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from .heap import keep_no_freed_buffers, release_freed_memory
from .model.gemma3n import Gemma3n
from .model.text import fuse_for_inference
from .ple import DEFAULT_CACHE_BYTES, PerLayerEmbeddings
from .quantize import apply_quantization
from .tokenizer import Tokenizer, load_tokenizer
from .towers import Towers, check_kinds
from .errors import InputError
from .weights import PLE_NAME, Checkpoint, CheckpointError, load_into


def _load_part(module, weights, what: str, checkpoint: Checkpoint, dtype) -> None:
    try:
        apply_quantization(module, weights, what)
    except ValueError as e:
        raise CheckpointError(f"{checkpoint.path}: {e}") from None
    load_into(module, weights, what, checkpoint.path, dtype)


class TowerLoader:
    """Reads a tower from the checkpoint when it is first needed."""

    def __init__(self, checkpoint: Checkpoint, dtype):
        self.checkpoint, self.dtype = checkpoint, dtype

    def __call__(self, kind: str):
        checkpoint = self.checkpoint
        if kind == "vision":
            from .model import vision as module

            tower = module.VisionTower(checkpoint.config.vision)
        else:
            from .model import audio as module

            tower = module.AudioTower(checkpoint.config.audio)
        weights = checkpoint.read(f"{kind}_tower.")
        if not weights:
            raise CheckpointError(f"{checkpoint.path} has no {kind} tower weights: this checkpoint is text-only.")
        _load_part(tower, module.sanitize(weights), f"{kind} tower", checkpoint, self.dtype)
        mx.eval(tower.parameters())
        release_freed_memory()
        return tower


def lazy_per_layer_embeddings(checkpoint: Checkpoint, dtype, cache_bytes: int = DEFAULT_CACHE_BYTES) -> PerLayerEmbeddings:
    """The checkpoint's PLE table as a memory-mapped store (floating point or quantized)."""
    text = checkpoint.config.text
    names = checkpoint.names_for(PLE_NAME)
    if "weight" not in names:
        raise CheckpointError(f"{checkpoint.path} has no Per-Layer Embedding table ({PLE_NAME}.weight).")
    where = {k: checkpoint.locations[v] for k, v in names.items()}
    checkpoint.read_names.update(names.values())  # read, though only row by row
    return PerLayerEmbeddings(
        where["weight"], text.hidden_size_per_layer_input**0.5, text.vocab_size_per_layer_input,
        text.num_hidden_layers * text.hidden_size_per_layer_input, dtype,
        scales=where.get("scales"), biases=where.get("biases"), cache_bytes=cache_bytes,
    )


def default_dtype() -> mx.Dtype:
    """The compute dtype that is fast where we run: MLX's CPU back-end multiplies bfloat16
    matrices several times slower than float32 (an image: 90 s against 25 s on a 2-core x86 CPU);
    GPUs (Metal, CUDA) are fastest in bfloat16, which also holds half the memory."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def resolve_dtype(dtype: mx.Dtype | str | None) -> mx.Dtype:
    """None or "auto": `default_dtype()`; a name such as "float32"; or an MLX dtype."""
    if dtype is None or dtype == "auto":
        return default_dtype()
    if isinstance(dtype, str):
        if dtype not in ("bfloat16", "float16", "float32"):
            raise InputError(f"dtype {dtype!r} is not one of auto, bfloat16, float16 or float32.")
        return getattr(mx, dtype)
    return dtype


def load_model(
    model: str | Path | Checkpoint, dtype: mx.Dtype | str | None = None, lazy_ple: bool = True
) -> tuple[Gemma3n, Checkpoint]:
    """The model (towers not loaded) and its checkpoint, computing in `dtype` (see `resolve_dtype`).
    With `lazy_ple` (the default) the Per-Layer Embedding table is read row by row from disk
    instead of being loaded."""
    dtype = resolve_dtype(dtype)
    checkpoint = model if isinstance(model, Checkpoint) else Checkpoint.open(model)
    keep_no_freed_buffers()
    net = Gemma3n(checkpoint.config)
    skip = ()
    if lazy_ple:
        net.language_model.embed_tokens_per_layer = lazy_per_layer_embeddings(checkpoint, dtype)
        skip = (PLE_NAME + ".",)
    for part in ("language_model", "embed_vision", "embed_audio"):
        weights = checkpoint.read(f"{part}.", skip=skip if part == "language_model" else ())
        _load_part(getattr(net, part), weights, part.replace("_", " "), checkpoint, dtype)
    mx.eval(net.parameters())
    # The buffers each merge replaces go back at once: left to the end, they add up (E2B 4-bit:
    # 1.56 GB resident after loading instead of 1.47).
    fuse_for_inference(net, after_each_layer=release_freed_memory)
    net.embed_multimodal_ids()
    release_freed_memory()
    # The towers are managed beside the network, which takes them as arguments.
    net.towers = Towers(TowerLoader(checkpoint, dtype))
    return net, checkpoint


def preload_towers(model: Gemma3n, kinds=("audio", "vision")) -> None:
    """Load the named towers now (e.g. before a latency-sensitive first image or audio)."""
    from .runtime.engine import Engine

    for kind in check_kinds(kinds):
        Engine.of(model).run(model.towers.get, kind)


def unload_towers(model: Gemma3n, kinds=("audio", "vision")) -> None:
    """Release the named towers and give their memory back (a tower in use goes when its
    request is done); they load again on next use."""
    model.towers.release(kinds)


def _eos_ids(checkpoint: Checkpoint) -> list[int]:
    ids = list(checkpoint.config.eos_token_ids)
    generation = checkpoint.path / "generation_config.json"
    if generation.exists():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    return list(dict.fromkeys(ids))


def load(
    model: str | Path,
    dtype: mx.Dtype | str | None = None,
    lazy_ple: bool = True,
    preload: tuple[str, ...] = (),
    keep_towers: bool = True,
) -> tuple[Gemma3n, Tokenizer]:
    """Load a Gemma 3n checkpoint (directory or Hugging Face repo id: original, converted by
    `mlx_gemma3n.convert`, or an mlx-vlm conversion) and its tokenizer. The model computes in
    `dtype`: by default float32 on a CPU and bfloat16 on a GPU (`default_dtype`). Towers load on first
    use unless named in `preload` ("audio", "vision"), and stay loaded unless `keep_towers` is
    False: then each is released after each use (least memory; the next image or audio reads
    it again)."""
    checkpoint = Checkpoint.open(model)
    if not (checkpoint.path / "tokenizer.json").exists():
        raise CheckpointError(f"{checkpoint.path} has no tokenizer.json: copy the tokenizer files in.")
    # The tokenizer first: loading the weights then reuses the heap the tokenizer's loading freed
    # (E2B: a peak 27 MB lower than the other way round).
    tokenizer = load_tokenizer(checkpoint.path, eos_token_ids=_eos_ids(checkpoint))
    net, _ = load_model(checkpoint, dtype, lazy_ple)
    net.towers.keep = keep_towers
    preload_towers(net, preload)
    return net, tokenizer
