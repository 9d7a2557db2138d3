"""The Per-Layer Embedding table, never resident.

Gemma 3n gives every token, in every layer, a 256-wide embedding of its own: a table of
262144 x (layers x 256), 2.0 B parameters in E2B, 2.35 B in E4B, more than the rest of the
decoder. Each step needs only the rows of the tokens it processes, so the table stays in its
file: `PerLayerEmbeddings` memory-maps the file where it lies (a Hugging Face shard, our
converted `ple.safetensors`, an mlx-vlm file) and gathers just those rows into MLX arrays.

The rows may be stored in floating point (bf16/f16/f32) or quantized (MLX affine: packed
uint32 rows with per-group scales and biases, 8 or 4 bits). A small LRU cache keeps hot rows
(special tokens, punctuation) so that decoding rarely touches the file. Pages the gather
touched are dropped from the process's mapping afterwards, so resident memory does not grow
with the number of distinct tokens seen.
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import InputError
from .quantize import quantized_shape_info
from .weights import CheckpointError, TensorLocation

# safetensors dtype -> (numpy dtype of the stored bits, MLX dtype they are viewed as)
_DTYPES = {
    "BF16": (np.uint16, mx.bfloat16),
    "F16": (np.float16, mx.float16),
    "F32": (np.float32, mx.float32),
    "U32": (np.uint32, mx.uint32),
}
# About 270 rows of E2B's bf16 table: the special tokens and the commonest pieces. Any other row
# is a page-cache read of 15 KB, small beside the 1.3 GB of weights a decoded token reads.
DEFAULT_CACHE_BYTES = 4 << 20


class _MappedMatrix:
    """A 2-D tensor of a safetensors file, memory-mapped; rows copied out on demand."""

    def __init__(self, where: TensorLocation):
        if where.dtype not in _DTYPES:
            raise CheckpointError(f"{where.file}: the PLE table is stored as {where.dtype}, which mlx_gemma3n cannot read.")
        self.where = where
        self.np_dtype, self.mx_dtype = _DTYPES[where.dtype]
        with open(where.file, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        rows, cols = where.shape
        self.rows = np.frombuffer(self._map, dtype=self.np_dtype, count=rows * cols, offset=where.offset).reshape(rows, cols)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        out = self.rows[ids]  # a copy: the mapping's pages are free to go afterwards
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)  # clean file pages: the page cache keeps them
        return out

    def to_mx(self, rows: np.ndarray) -> mx.array:
        a = mx.array(rows)
        return a.view(self.mx_dtype) if self.np_dtype is np.uint16 else a


class PerLayerEmbeddings(nn.Module):
    """Drop-in for the decoder's `embed_tokens_per_layer`: `self(ids)` gives the scaled rows
    (ids.shape + (layers * ple_dims,)), read from disk. It holds no parameters."""

    def __init__(
        self,
        weight: TensorLocation,
        scale: float,
        num_embeddings: int,
        dims: int,
        dtype: mx.Dtype | None = mx.bfloat16,
        scales: TensorLocation | None = None,
        biases: TensorLocation | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        super().__init__()
        self._check(weight, scales, biases, num_embeddings, dims)
        # Plain attributes (not module children): nothing here is a parameter.
        parts = {"weight": _MappedMatrix(weight)}
        if scales is not None:
            parts.update(scales=_MappedMatrix(scales), biases=_MappedMatrix(biases))
        self.num_embeddings, self.dims, self.scale, self.dtype = num_embeddings, dims, scale, dtype
        if scales is not None:
            self.bits, self.group_size = quantized_shape_info(weight.shape, scales.shape, dims)
        object.__setattr__(self, "_parts", parts)
        row_bytes = sum(p.rows.strides[0] for p in parts.values())
        self._capacity = max(0, cache_bytes // row_bytes)
        object.__setattr__(self, "_cache", OrderedDict())  # id -> its stored rows, least recent first
        self.hits = self.misses = 0

    @property
    def quantized(self) -> bool:
        return "scales" in self._parts

    @property
    def files(self) -> set[Path]:
        return {p.where.file for p in self._parts.values()}

    @staticmethod
    def _check(weight, scales, biases, num_embeddings, dims):
        where = f"{weight.file}: the Per-Layer Embedding table"
        if weight.shape[0] != num_embeddings or len(weight.shape) != 2:
            raise CheckpointError(
                f"{where} has shape {weight.shape}, but config.json implies ({num_embeddings}, {dims}): "
                "the file belongs to another model."
            )
        if scales is None:
            if weight.shape[1] != dims:
                raise CheckpointError(
                    f"{where} has shape {weight.shape}, but config.json implies ({num_embeddings}, {dims}): "
                    "the file belongs to another model."
                )
            return
        if biases is None or weight.dtype != "U32" or scales.shape[0] != num_embeddings or biases.shape != scales.shape:
            raise CheckpointError(f"{where} is quantized but its weight, scales and biases do not fit together.")
        if quantized_shape_info(weight.shape, scales.shape, dims) is None:
            raise CheckpointError(
                f"{where} is quantized with shapes {weight.shape} / {scales.shape}, which do not fit the "
                f"({num_embeddings}, {dims}) table config.json implies: the file belongs to another model."
            )

    def _rows(self, unique: np.ndarray) -> list[np.ndarray]:
        """The stored rows (weight[, scales, biases]) of `unique` ids, through the hot-row cache."""
        missing = [int(i) for i in unique if int(i) not in self._cache]
        self.hits += len(unique) - len(missing)
        self.misses += len(missing)
        fresh = [p.gather(np.array(missing, dtype=np.int64)) for p in self._parts.values()] if missing else []
        parts = [np.empty((len(unique), p.rows.shape[1]), p.np_dtype) for p in self._parts_list()]
        lookup = {i: n for n, i in enumerate(missing)}
        for j, i in enumerate(unique.tolist()):
            if i in lookup:
                row = tuple(f[lookup[i]] for f in fresh)
                if self._capacity:
                    self._cache[i] = tuple(r.copy() for r in row)
            else:
                row = self._cache[i]
                self._cache.move_to_end(i)
            for k, r in enumerate(row):
                parts[k][j] = r
        while len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return parts

    def _parts_list(self):
        return list(self._parts.values())

    def __call__(self, ids: mx.array) -> mx.array:
        ids_np = np.array(ids, dtype=np.int64)
        if ids_np.size and (ids_np.min() < 0 or ids_np.max() >= self.num_embeddings):
            raise InputError(f"Per-layer embedding ids must lie in [0, {self.num_embeddings}).")
        unique, inverse = np.unique(ids_np.reshape(-1), return_inverse=True)
        stored = [p.to_mx(r) for p, r in zip(self._parts_list(), self._rows(unique))]
        if self.quantized:
            w, scales, biases = stored
            if self.dtype is not None:  # as the loaded table would be: scales cast first
                scales, biases = scales.astype(self.dtype), biases.astype(self.dtype)
            rows = mx.dequantize(w, scales, biases, group_size=self.group_size, bits=self.bits)
        else:
            rows = stored[0]
            if self.dtype is not None:
                rows = rows.astype(self.dtype)
        rows = rows[mx.array(inverse.reshape(ids_np.shape))]
        return rows * mx.array(self.scale, dtype=rows.dtype)

    def table(self) -> dict[str, mx.array]:
        """The whole stored table as MLX arrays (weight[, scales, biases]); for tests and conversion."""
        return {k: p.to_mx(np.asarray(p.rows)) for k, p in self._parts.items()}
