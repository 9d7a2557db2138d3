"""MatFormer slicing to disk: a sub-model (see `submodel.py`) written as a standalone checkpoint
with Hugging Face names and config, through convert's atomic, streaming writer.

    slice_checkpoint("google/gemma-3n-E4B-it", "gemma-3n-E2.54B", Submodel.preset("E2.54B"))
"""

from __future__ import annotations

import re
from pathlib import Path

from .convert import (
    TensorPart, check_options, check_output_dir, output_config, plan, write_checkpoint,
)
from .config import ModelConfig
from .errors import InputError
from .quantize import DEFAULT_GROUP_SIZE
from .submodel import Submodel
from .weights import PLE_NAME, Checkpoint, TensorLocation

_PROJECTION = "language_model.per_layer_model_projection"



def _part(where: TensorLocation, rows=(), cols=(), logical_cols: int = 0) -> TensorPart:
    """Rows and columns of `where` by (start, stop) ranges; columns in logical units (one weight),
    mapped to stored ones (packed words, quantization groups) by the stored width."""
    n_rows, n_cols = where.shape
    # Scaled, not divided by a unit: at 3 bits 32 weights fill 3 words, no whole number per word.
    stored_cols = tuple((a * n_cols // logical_cols, b * n_cols // logical_cols) for a, b in cols)
    return TensorPart(
        where.file, where.offset, where.dtype,
        (sum(b - a for a, b in rows) if rows else n_rows, sum(b - a for a, b in stored_cols) if cols else n_cols),
        stored_shape=where.shape, rows=tuple(rows), cols=stored_cols,
    )


def _column_unit(checkpoint: Checkpoint, name: str, logical_cols: int) -> int:
    """How many logical columns one stored column of tensor `name` (or of its quantization
    groups) holds: 1 unquantized, the group size when quantized."""
    base = name.rsplit(".", 1)[0]
    scales = checkpoint.locations.get(base + ".scales")
    return logical_cols // scales.shape[-1] if scales is not None else 1


def _renumber(name: str, old: int, new: int) -> str:
    return re.sub(rf"(language_model\.layers\.){old}\.", rf"\g<1>{new}.", name, count=1)


def _sliced_locations(checkpoint: Checkpoint, submodel: Submodel) -> dict[str, TensorLocation]:
    """Checkpoint name -> where its bytes lie, for every tensor of the sub-model."""
    t = checkpoint.config.text
    kept, widths = submodel.kept_layers(t), submodel.widths(t)
    new_index = {old: new for new, old in enumerate(kept)}
    width = dict(zip(kept, widths))
    d = t.hidden_size_per_layer_input
    blocks = tuple((k * d, (k + 1) * d) for k in kept)
    out = {}
    for name, where in checkpoint.locations.items():
        ours = checkpoint.our_name(name)
        if ours is None:
            continue  # tied head, K/V weights of KV-shared layers
        parts = ours.split(".")
        if parts[:2] == ["language_model", "layers"]:
            old = int(parts[2])
            if old not in new_index:
                continue
            w, stored = width[old], t.intermediate_size[old]
            if parts[3] == "mlp" and w != stored:
                if parts[4] in ("gate_proj", "up_proj"):
                    where = _part(where, rows=((0, w),))
                else:
                    unit = _column_unit(checkpoint, name, stored)
                    if w % unit:
                        raise InputError(
                            f"layer {old}'s down_proj is quantized in groups of {unit} columns, so its width must "
                            f"be a multiple of {unit}, not {w}: choose such widths or slice the unquantized checkpoint."
                        )
                    where = _part(where, cols=((0, w),), logical_cols=stored)
            name = _renumber(name, old, new_index[old])
        elif ours.startswith(PLE_NAME + "."):
            unit = _column_unit(checkpoint, name, t.num_hidden_layers * d)
            if d % unit:
                raise InputError(
                    f"the Per-Layer Embedding table is quantized in groups of {unit} columns, which straddle its "
                    f"{d}-column layer blocks: slice the unquantized checkpoint."
                )
            where = _part(where, cols=blocks, logical_cols=t.num_hidden_layers * d)
        elif ours.startswith(_PROJECTION + "."):
            where = _part(where, rows=blocks)
        out[name] = where
    return out


def _sliced_raw_config(checkpoint: Checkpoint, submodel: Submodel) -> dict:
    raw = dict(checkpoint.config.raw)
    if "text_config" in raw:
        raw["text_config"] = submodel.sliced_config(raw["text_config"])
    else:
        raw = submodel.sliced_config(raw)
    if isinstance(raw.get("quantization"), dict):  # per-layer entries follow their layers
        kept = {old: new for new, old in enumerate(submodel.kept_layers(checkpoint.config.text))}
        block = {}
        for key, value in raw["quantization"].items():
            layer = re.search(r"language_model\.layers\.(\d+)\.", key)
            if layer is None:
                block[key] = value
            elif int(layer.group(1)) in kept:
                block[_renumber(key, int(layer.group(1)), kept[int(layer.group(1))])] = value
        raw["quantization"] = block
    return raw


def slice_checkpoint(
    model: str | Path,
    out: str | Path,
    submodel: Submodel,
    quantize: bool = False,
    bits: int = 4,
    group_size: int = DEFAULT_GROUP_SIZE,
    recipe: str = "uniform",
    ple_bits: int | None = None,
    dtype: str | None = None,
    show_progress: bool = True,
) -> Path:
    """Write `submodel` of `model` (a Hugging Face checkpoint or one of our conversions) into
    `out` as a standalone checkpoint, optionally quantized; all or nothing. Returns `out`."""
    if quantize or ple_bits:
        check_options(quantize, bits, group_size, recipe, ple_bits)
    out = check_output_dir(out)
    checkpoint = Checkpoint.open(model)
    if checkpoint.layout != "hf":
        raise InputError(
            f"{checkpoint.path} is an mlx-vlm conversion: slice the original checkpoint or one converted by "
            "mlx_gemma3n.convert."
        )
    if checkpoint.quantized and (quantize or ple_bits):
        raise InputError(
            f"{checkpoint.path} is already quantized: slice it without -q/--ple-bits, or slice the original "
            "checkpoint and quantize while slicing."
        )
    locations = _sliced_locations(checkpoint, submodel)
    raw = _sliced_raw_config(checkpoint, submodel)
    sliced = Checkpoint(checkpoint.path, ModelConfig.from_dict(raw), locations)
    tensors = plan(sliced, quantize, bits, group_size, recipe, ple_bits, dtype)
    config = output_config(raw, tensors, quantize, bits, group_size, recipe, ple_bits, dtype)
    return write_checkpoint(checkpoint.path, tensors, config, out, show_progress, f"Slicing to {out.name}")
