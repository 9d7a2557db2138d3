"""Convert a Gemma 3n checkpoint for MLX: optionally quantized, towers and the Per-Layer
Embedding table in files of their own (so a text-only session never opens the towers' files).

    python -m mlx_gemma3n.convert --model google/gemma-3n-E2B-it --out gemma-3n-E2B-it-4bit -q
    python -m mlx_gemma3n.convert --model M --out DIR -q --bits 4 --group-size 128 --recipe mixed --ple-bits 8

The output keeps Hugging Face's tensor names and layouts; quantized weights are stored as MLX
stores them (`weight` packed in uint32, `scales`, `biases`), and config.json gains a
`quantization` block. Tensors are streamed one block of rows at a time, so converting needs
far less memory than the checkpoint's size. The output appears only when complete: it is
written to a hidden directory beside it and renamed at the end; on any failure (a full disk
included) that directory is removed.
"""

from __future__ import annotations

import errno
import mmap
import json
import os
import shutil
import secrets
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import Gemma3nError
from .quantize import BITS, DEFAULT_GROUP_SIZE, GROUP_SIZES, RECIPES, as_matrix, quantizable, recipe_bits
from .weights import FINGERPRINT_KEY, PLE_NAME, Checkpoint, CheckpointError, TensorLocation, model_fingerprint


class ConvertError(Gemma3nError, RuntimeError):
    """A conversion that cannot be done; nothing was written."""


_NP = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
_MX = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32, "U32": mx.uint32}
_ST = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint32: "U32"}
_SIZE = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4}
BLOCK_BYTES = 64 << 20  # source bytes quantized and written at a time
SHARD_BYTES = 2 << 30


@dataclass(frozen=True)
class TensorPart(TensorLocation):
    """Some rows of a stored 2-D tensor and, of those, some columns; `shape` is the part's.
    Ranges are (start, stop) pairs; none means all."""

    stored_shape: tuple[int, int] = (0, 0)
    rows: tuple[tuple[int, int], ...] = ()
    cols: tuple[tuple[int, int], ...] = ()


def _index(ranges: tuple[tuple[int, int], ...]) -> np.ndarray:
    return np.concatenate([np.arange(a, b) for a, b in ranges])


@dataclass
class _Tensor:
    """One source tensor and what becomes of it."""

    name: str  # checkpoint name, kept in the output
    source: TensorLocation
    file: str  # output file
    dtype: str  # output float dtype (safetensors name)
    bits: int | None = None  # quantized to this many bits, or None
    group_size: int | None = None

    def outputs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of what is written: the tensor, or its weight/scales/biases."""
        if self.bits is None:
            return [(self.name, self.dtype, self.source.shape)]
        rows, cols = as_matrix(self.source.shape)  # a pointwise kernel is written as its matrix
        base = self.name[: -len(".weight")]
        return [
            (base + ".weight", "U32", (rows, cols * self.bits // 32)),
            (base + ".scales", self.dtype, (rows, cols // self.group_size)),
            (base + ".biases", self.dtype, (rows, cols // self.group_size)),
        ]

    @property
    def nbytes(self) -> int:
        return sum(_SIZE[d] * int(np.prod(s)) for _, d, s in self.outputs())


def _quantizable_modules(config) -> set[str]:
    """Our module paths of every Linear/Embedding of the model and its towers, and of the vision
    tower's pointwise convolutions (built lazily: MLX allocates nothing until parameters are
    evaluated)."""
    from .model.audio import AudioTower
    from .model.gemma3n import Gemma3n
    from .model.vision import VisionTower

    net = Gemma3n(config)
    net.audio_tower = AudioTower(config.audio)
    net.vision_tower = VisionTower(config.vision)
    return {path for path, m in net.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding)) or getattr(m, "pointwise", False)}


def plan(
    checkpoint: Checkpoint,
    quantize: bool = False,
    bits: int = 4,
    group_size: int = DEFAULT_GROUP_SIZE,
    recipe: str = "uniform",
    ple_bits: int | None = None,
    dtype: str | None = None,
) -> list[_Tensor]:
    """What every tensor of `checkpoint` becomes in the converted output. Weights that are
    already quantized (packed uint32) are copied as they are."""
    layers = _quantizable_modules(checkpoint.config) if quantize or ple_bits else set()
    shared = checkpoint.config.text.first_kv_shared_layer
    tensors = []
    for name, where in checkpoint.locations.items():
        ours = checkpoint.our_name(name)
        if ours is None:
            continue  # tied head, KV weights of KV-shared layers: never used
        packed = where.dtype == "U32" and checkpoint.quantized
        if where.dtype not in _NP and not packed:
            raise ConvertError(f"{where.file}: {name} is stored as {where.dtype}; only bf16/f16/f32 checkpoints convert.")
        if ours.startswith(PLE_NAME + "."):
            file = "ple.safetensors"
        elif ours.startswith(("audio_tower.", "vision_tower.")):
            file = ours.split(".", 1)[0] + ".safetensors"
        else:
            file = "model"
        t = _Tensor(name, where, file, where.dtype if packed else dtype or where.dtype)
        module, _, leaf = ours.rpartition(".")
        if leaf == "weight" and not packed and module in layers and quantizable(where.shape, group_size):
            if module == PLE_NAME:
                t.bits = ple_bits
            elif quantize:
                t.bits = recipe_bits(module, bits, recipe, first_kv_shared_layer=shared)
            t.group_size = group_size if t.bits else None
        tensors.append(t)
    # The decoder and embedders go into shards of at most SHARD_BYTES.
    main = [t for t in tensors if t.file == "model"]
    shards, used = [[]], 0
    for t in main:
        if shards[-1] and used + t.nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += t.nbytes
    for i, shard in enumerate(shards):
        for t in shard:
            t.file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    return tensors


class _Source:
    """Row blocks of source tensors, read through memory maps of their files."""

    def __init__(self):
        self._maps = {}

    def rows(self, where: TensorLocation):
        if where.file not in self._maps:
            with open(where.file, "rb") as f:
                self._maps[where.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        stored = where.stored_shape if isinstance(where, TensorPart) else where.shape
        count = int(np.prod(stored))
        np_dtype = np.uint32 if where.dtype == "U32" else _NP[where.dtype]
        flat = np.frombuffer(self._maps[where.file], dtype=np_dtype, count=count, offset=where.offset)
        matrix = flat.reshape(stored[0], -1) if stored else flat.reshape(1, 1)
        rows = _index(where.rows) if isinstance(where, TensorPart) and where.rows else None
        cols = _index(where.cols) if isinstance(where, TensorPart) and where.cols else None
        step = max(1, BLOCK_BYTES // max(1, matrix.strides[0]))
        for start in range(0, matrix.shape[0] if rows is None else len(rows), step):
            block = matrix[start : start + step] if rows is None else matrix[rows[start : start + step]]
            block = mx.array(np.ascontiguousarray(block if cols is None else block[:, cols]))
            if hasattr(mmap, "MADV_DONTNEED"):  # keep the read pages out of our resident set
                self._maps[where.file].madvise(mmap.MADV_DONTNEED)
            yield block.view(mx.bfloat16) if where.dtype == "BF16" else block


def _to_bytes(a: mx.array) -> bytes:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a).tobytes()


def _write_file(path: Path, tensors: list[_Tensor], source: _Source, metadata: dict, progress) -> None:
    header, offset = {"__metadata__": metadata}, 0
    for t in tensors:
        for name, dtype, shape in t.outputs():
            nbytes = _SIZE[dtype] * int(np.prod(shape))
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for t in tensors:
            out_dtype = _MX[t.dtype]
            side = []  # scales and biases of a quantized tensor follow its packed weight
            for block in source.rows(t.source):
                block = block.astype(out_dtype)
                if t.bits is None:
                    f.write(_to_bytes(block))
                else:
                    wq, scales, biases = mx.quantize(block, group_size=t.group_size, bits=t.bits)
                    f.write(_to_bytes(wq))
                    side.append((_to_bytes(scales), _to_bytes(biases)))
                progress(block.size * _SIZE[t.source.dtype])
            for k in (0, 1):
                for pair in side:
                    f.write(pair[k])
        f.flush()
        os.fsync(f.fileno())


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, processor, generation config, chat template: everything but weights and config."""
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            if f.stat().st_size < (256 << 20):
                shutil.copy2(f, dst / f.name)


def check_options(quantize: bool, bits: int, group_size: int, recipe: str, ple_bits: int | None) -> None:
    """Refuse quantization options we do not write, before any work starts."""
    if bits not in BITS or (quantize and bits not in (4, 8) and recipe == "mixed"):
        raise ConvertError(f"bits must be one of {BITS} (4 or 8 are the tested ones), not {bits}.")
    if ple_bits is not None and ple_bits not in (4, 8):
        raise ConvertError(f"--ple-bits must be 4 or 8, not {ple_bits}.")
    if group_size not in GROUP_SIZES:
        raise ConvertError(f"group size must be one of {GROUP_SIZES}, not {group_size}.")
    if recipe not in RECIPES:
        raise ConvertError(f"Unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}.")
    if quantize and recipe == "compact" and bits != 4:
        raise ConvertError(f"The compact recipe is defined at 4 bits, not {bits}: use --bits 4 or another recipe.")


def check_output_dir(out: str | Path) -> Path:
    """`out` as an absolute path, refused (see `check_output`) unless it can become the new checkpoint."""
    out = Path(out).expanduser().absolute()
    check_output(out)
    return out


def convert(
    model: str | Path,
    out: str | Path,
    quantize: bool = False,
    bits: int = 4,
    group_size: int = DEFAULT_GROUP_SIZE,
    recipe: str = "uniform",
    ple_bits: int | None = None,
    dtype: str | None = None,
    show_progress: bool = True,
) -> Path:
    """Convert `model` (a directory or Hugging Face repo id) into `out`; returns `out`."""
    check_options(quantize, bits, group_size, recipe, ple_bits)
    out = check_output_dir(out)
    try:
        checkpoint = Checkpoint.open(model)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    if checkpoint.quantized:
        raise ConvertError(
            f"{checkpoint.path} is already quantized: convert from the original (bf16) checkpoint instead."
        )
    if checkpoint.layout != "hf":
        raise ConvertError(f"{checkpoint.path} is an mlx-vlm conversion: convert from the original checkpoint instead.")
    tensors = plan(checkpoint, quantize, bits, group_size, recipe, ple_bits, dtype)
    config = output_config(checkpoint.config.raw, tensors, quantize, bits, group_size, recipe, ple_bits, dtype)
    return write_checkpoint(checkpoint.path, tensors, config, out, show_progress, f"Converting to {out.name}")


def output_config(raw: dict, tensors, quantize, bits, group_size, recipe, ple_bits, dtype) -> dict:
    """The config.json of the output: `raw` with the quantization block and dtype it now has."""
    config = dict(raw)
    config.pop("quantization_config", None)
    if quantize or ple_bits:
        config["quantization"] = _quantization_block(tensors, bits if quantize else ple_bits, group_size, recipe)
    if dtype:
        config["dtype"] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype]
    return config


def write_checkpoint(
    side_files: Path, tensors: list[_Tensor], config: dict, out: Path, show_progress: bool = True, desc: str = ""
) -> Path:
    """Write `tensors` (from `plan`), `config` and the tokenizer and other small files of the
    directory `side_files` into `out` (checked by `check_output_dir`), all or nothing."""
    total = sum(t.nbytes for t in tensors)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if total * 1.01 + (16 << 20) > free:
        raise ConvertError(
            f"Not enough disk space in {out.parent}: the converted checkpoint needs {total / 1e9:.2f} GB and "
            f"{free / 1e9:.2f} GB are free. Nothing was written."
        )

    # os.mkdir, unlike tempfile.mkdtemp (0o700), honours the umask: the renamed result gets the
    # permissions any directory the person makes gets.
    tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    tmp.mkdir()
    bar = None
    try:
        by_file: dict[str, list[_Tensor]] = {}
        for t in tensors:
            by_file.setdefault(t.file, []).append(t)
        if show_progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(int(np.prod(t.source.shape)) * _SIZE[t.source.dtype] for t in tensors),
                       unit="B", unit_scale=True, desc=desc)
        metadata = {"format": "mlx", FINGERPRINT_KEY: model_fingerprint(config)}
        source = _Source()
        for file, group in by_file.items():
            _write_file(tmp / file, group, source, metadata, bar.update if bar else (lambda n: None))
        weight_map = {name: t.file for t in tensors for name, _, _ in t.outputs()}
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
        _copy_side_files(side_files, tmp)
        # config.json last: a directory without it is not a checkpoint.
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException as e:
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConvertError(
                f"The disk holding {out.parent} filled up while converting (the output needs "
                f"{total / 1e9:.2f} GB); nothing was left behind. Free some space and convert again."
            ) from None
        if isinstance(e, OSError):
            raise ConvertError(
                f"Could not write {out} ({e.strerror or e}); nothing was left behind: choose another --out."
            ) from None
        raise
    if bar is not None:
        bar.close()
    return out


def check_output(out: Path) -> None:
    """Fail now, not after minutes of work, when `out` cannot become the converted checkpoint."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out} already exists and is not empty: choose another --out or remove it.")
    ancestor = out.parent
    while not ancestor.exists():  # the missing parents are created later
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConvertError(f"{ancestor} is a file, so {out} cannot be made inside it: choose another --out.")
    if not _writable(ancestor):
        raise ConvertError(
            f"{ancestor} cannot be written to (a read-only file system, or not your directory): choose another --out."
        )


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)


def _quantization_block(tensors, bits, group_size, recipe) -> dict:
    """The config's quantization block: defaults, plus every layer that differs (by module path,
    as checkpoint names), so that readers which do not infer bits from shapes load it too."""
    block = {"group_size": group_size, "bits": bits, "mode": "affine", "recipe": recipe}
    for t in tensors:
        if t.name.endswith(".weight") and t.source.dtype in _NP and len(t.source.shape) == 2:
            module = t.name[: -len(".weight")]
            if t.bits is not None and t.bits != bits:
                block[module] = {"group_size": t.group_size, "bits": t.bits}
    return block


if __name__ == "__main__":
    from .cli.convert import main

    sys.exit(main())
