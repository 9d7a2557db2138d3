"""KV caches: full-attention layers keep every position, sliding-window layers only the
window, KV-shared layers none (they attend over their source layer's keys and values). A
full-attention cache may hold its keys and values quantized (`make_full_cache(kv_bits)`), as
it alone grows with the context; `attend` then takes what it returns.

Each cache takes a chunk of new keys/values (B, heads, L, dims), writes it in place into
buffers that grow by whole steps, and returns every key the chunk's queries may see. `mask(L)`,
asked before the update, gives the matching attention mask: None, "causal" (aligned to the
last key, as MLX's attention takes it) or a boolean (L, keys) array.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .errors import InputError
from .model.quantized import dequantize_f32

# The widths a quantized cache takes. Next-token KL against a float32 cache on a random checkpoint
# (`benchmarks/kv_cache.py`): 8-bit ~5x a bfloat16 cache's rounding, 4-bit ~1000x.
KV_BITS = (8, 4)
# Affine groups along the head dimension; MLX quantizes in groups of 32, 64 or 128.
KV_GROUP_SIZE = 64
# Cached positions a prompt chunk attends over at a time on the CPU (`attend_in_key_blocks`).
KEY_BLOCK = 4096


def attention_mask(n: int, past: int = 0, window: int | None = None):
    """The mask of `n` new queries over `past` earlier keys and their own: None when every key
    is visible, "causal" when causality alone hides some, else a boolean (n, past + n) array."""
    if n == 1 and (window is None or past < window):
        return None
    if window is None or (past == 0 and n <= window):
        return "causal"
    query = mx.arange(past, past + n)[:, None]  # positions counted from the first key
    key = mx.arange(past + n)[None]
    return (key <= query) & (key > query - window)


def last_query(mask):
    """Of an `attention_mask`, what its last query sees: it comes after every key, so causality
    alone hides nothing from it."""
    return mask[..., -1:, :] if isinstance(mask, mx.array) else None


def _fresh(old: mx.array | None, like: mx.array, capacity: int, start: int, stop: int) -> mx.array:
    """A buffer of `capacity` positions shaped like `like`, beginning with positions [start, stop) of `old`."""
    B, H, _, D = like.shape
    buffer = mx.zeros((B, H, capacity, D), like.dtype)
    if old is not None and stop > start:
        buffer[..., : stop - start, :] = old[..., start:stop, :]
    return buffer


class _Buffers:
    """Keys and values held in buffers of positions, written in place."""

    def __init__(self):
        self.keys = self.values = None

    def _reallocate(self, capacity: int, start: int, stop: int, like: tuple[mx.array, mx.array]) -> None:
        """New buffers of `capacity` positions, beginning with positions [start, stop) of the old."""
        self.keys = _fresh(self.keys, like[0], capacity, start, stop)
        self.values = _fresh(self.values, like[1], capacity, start, stop)

    def _write(self, at: int, keys: mx.array, values: mx.array) -> int:
        end = at + keys.shape[2]
        self.keys[..., at:end, :] = keys
        self.values[..., at:end, :] = values
        return end

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    @state.setter
    def state(self, arrays: list[mx.array]) -> None:
        self.keys, self.values = arrays

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


class _EveryPosition:
    """A full-attention layer's cache: it holds every position seen (`offset` of them), in
    buffers grown `step` positions at a time, and can drop the last ones. `reserve(n)` sizes the
    next growth for `n` more positions at once: a long prompt would otherwise copy the buffers
    at every step (at 32k positions, 128 copies of up to 67 MB each for E2B), and the freed
    copies fragment the heap."""

    step = 256
    reserved = 0  # positions the next growth makes room for

    def reserve(self, n: int) -> None:
        # In whole steps: replies of nearby lengths then share a buffer shape, and with it the
        # compiled decode step's trace (`model/decode.py`).
        self.reserved = -(-(self.offset + n) // self.step) * self.step

    def _capacity(self, end: int) -> int:
        return max(-(-end // self.step) * self.step, self.reserved)

    def mask(self, n: int):
        return attention_mask(n)

    def can_trim(self, n: int) -> bool:
        return n <= self.offset

    def trim(self, n: int) -> None:
        self.offset -= n


class KVCache(_EveryPosition, _Buffers):
    """Every position of a full-attention layer."""

    def __init__(self):
        super().__init__()
        self.offset = 0  # positions seen (and held)

    def _room(self, n: int, like: tuple[mx.array, mx.array]) -> int:
        """Room for `n` more positions; where they go."""
        if self.keys is None or self.offset + n > self.keys.shape[2]:
            self._reallocate(self._capacity(self.offset + n), 0, self.offset, like)
        return self.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.offset = self._write(self._room(keys.shape[2], (keys, values)), keys, values)
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def claim(self) -> int:
        """Room for one more position, counted as held; where it goes (see `SlotCache`)."""
        at = self._room(1, (self.keys, self.values))
        self.offset += 1
        return at

    def slot_view(self):
        """How a compiled decode step sees this kind of cache: (state, position, slot) -> a `SlotCache`."""
        return lambda state, position, slot: SlotCache(*state, position, slot, None)


class SlidingWindowCache(_Buffers):
    """The last `window - 1` positions of a sliding-window layer: with the chunk's own, all a
    query at window distance may see. The held positions sit at the front of the buffer and new
    ones are written after them; when the buffer is full, the positions still needed move to the
    front of a new one (once the window is full, a copy of it every `step` tokens)."""

    step = 64

    def __init__(self, window: int):
        super().__init__()
        self.window = window
        self.offset = 0  # positions seen
        self.held = 0  # of which the buffer holds the last `held`

    def _visible(self, n: int) -> int:
        """Keys a chunk of `n` new positions attends over: the past it may see, then its own."""
        return min(self.held, self.window - 1) + n

    def _room(self, n: int, like: tuple[mx.array, mx.array], whole: bool = False) -> int:
        """Room for `n` more positions; where they go. The buffer grows a step at a time while
        the window fills (or at once to its largest, `whole`), then holds the window and one step."""
        if self.keys is None or self.held + n > self.keys.shape[2]:
            past = self._visible(n) - n
            largest = self.window - 1 + max(n, self.step)
            capacity = largest if whole else min(-(-(past + n) // self.step) * self.step, largest)
            self._reallocate(capacity, self.held - past, self.held, like)
            self.held = past
        return self.held

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        visible = self._visible(n)
        self.held = self._write(self._room(n, (keys, values)), keys, values)
        self.offset += n
        return self.keys[..., self.held - visible : self.held, :], self.values[..., self.held - visible : self.held, :]

    def claim(self) -> int:
        """Room for one more position, counted as held; where it goes (see `SlotCache`). The buffer
        is grown to its largest at once, so that its shape changes at most once in a reply."""
        at = self._room(1, (self.keys, self.values), whole=True)
        self.held += 1
        self.offset += 1
        return at

    def reserve(self, n: int) -> None:
        """Nothing to do: the buffers never exceed the window and a step."""

    def slot_view(self):
        """How a compiled decode step sees this kind of cache: (state, position, slot) -> a `SlotCache`."""
        window = self.window
        return lambda state, position, slot: SlotCache(*state, position, slot, window)

    def mask(self, n: int):
        return attention_mask(n, self._visible(n) - n, self.window)

    def can_trim(self, n: int) -> bool:
        """Trimming must leave every position the next query may see."""
        return n <= self.offset and self.held - n >= min(self.offset - n, self.window - 1)

    def trim(self, n: int) -> None:
        self.held -= n
        self.offset -= n


class SlotCache:
    """A cache as one compiled decode step sees it: its buffers, the slot the new position goes to
    (claimed beforehand, outside the step, by the cache's `claim`) and the position itself, all
    arrays, so that one compiled function serves every step. The held positions are consecutive
    from the buffer's start: the query sees the slots up to its own, within the window."""

    def __init__(self, keys: mx.array, values: mx.array, position: mx.array, slot: mx.array, window: int | None):
        self.keys, self.values, self.offset, self.slot, self.window = keys, values, position, slot, window

    def mask(self, n: int) -> mx.array:
        """The slots the query sees, as a (1, slots) additive mask: 0, or -inf for a slot not yet
        written or out of the window, in the dtype of the scores it is added to."""
        held = mx.arange(self.state[0].shape[2])
        visible = held <= self.slot
        if self.window is not None:
            visible = visible & (held > self.slot - self.window)
        return mx.where(visible, 0.0, -mx.inf).astype(self.scores_dtype)[None]

    @property
    def scores_dtype(self):
        return self.keys.dtype

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys, self.slot, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.slot, axes=(2,))
        return self.keys, self.values

    @property
    def state(self) -> list[mx.array]:
        return [self.keys, self.values]


class QuantizedSlotCache(SlotCache):
    """A quantized cache (`QuantizedKVCache`) as one compiled decode step sees it: the new
    position's keys and values are quantized into the claimed slot of each buffer."""

    def __init__(self, buffers: list[mx.array], position: mx.array, slot: mx.array, group_size: int, bits: int):
        self.buffers, self.offset, self.slot, self.window = buffers, position, slot, None
        self.group_size, self.bits = group_size, bits

    scores_dtype = mx.float32  # `attend_quantized`'s softmax

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[QuantizedKV, QuantizedKV]:
        new = [*mx.quantize(keys, self.group_size, self.bits), *mx.quantize(values, self.group_size, self.bits)]
        self.buffers = [mx.slice_update(b, part, self.slot, axes=(2,)) for b, part in zip(self.buffers, new)]
        return (QuantizedKV(*self.buffers[:3], self.group_size, self.bits),
                QuantizedKV(*self.buffers[3:], self.group_size, self.bits))

    @property
    def state(self) -> list[mx.array]:
        return self.buffers


@dataclass(frozen=True)
class QuantizedKV:
    """Keys or values as `mx.quantize` holds them: (B, heads, positions, packed dims), with
    the scales and biases of each group of `group_size` dims."""

    data: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, heads, positions, dims) of the keys or values it stands for."""
        *held, packed = self.data.shape
        return (*held, packed * 32 // self.bits)

    def positions(self, block: slice) -> QuantizedKV:
        return QuantizedKV(self.data[..., block, :], self.scales[..., block, :], self.biases[..., block, :],
                           self.group_size, self.bits)

    def dequantize(self, dtype) -> mx.array:
        if mx.default_device() != mx.cpu:
            return mx.dequantize(self.data, self.scales, self.biases, group_size=self.group_size, bits=self.bits,
                                 dtype=dtype)
        flat = [a.reshape(-1, a.shape[-1]) for a in (self.data, self.scales, self.biases)]
        x = dequantize_f32(*flat, self.group_size, self.bits)
        return x.reshape(*self.data.shape[:-1], -1).astype(dtype)

    def matmul(self, x: mx.array, transpose: bool) -> mx.array:
        """x @ self.T (`transpose`) or x @ self, batched over (B, heads), in `x`'s dtype."""
        return mx.quantized_matmul(x, self.data, self.scales.astype(x.dtype), self.biases.astype(x.dtype),
                                   transpose=transpose, group_size=self.group_size, bits=self.bits)


class QuantizedKVCache(_EveryPosition):
    """Every position of a full-attention layer, keys and values quantized (affine, `bits` wide,
    in groups of `group_size` along the head dimension): a chunk is quantized once, as it is
    written, and attention reads the quantized form (`attend`)."""

    def __init__(self, bits: int, group_size: int = KV_GROUP_SIZE):
        self.bits, self.group_size = bits, group_size
        self.offset = 0  # positions seen (and held)
        self.buffers = None  # data, scales, biases of the keys, then of the values

    def _room(self, n: int, like: list[mx.array]) -> int:
        """Room for `n` more positions; where they go."""
        end = self.offset + n
        if self.buffers is None or end > self.buffers[0].shape[2]:
            old = self.buffers or [None] * len(like)
            self.buffers = [_fresh(held, part, self._capacity(end), 0, self.offset) for held, part in zip(old, like)]
        return self.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[QuantizedKV, QuantizedKV]:
        new = [*mx.quantize(keys, self.group_size, self.bits), *mx.quantize(values, self.group_size, self.bits)]
        start = self._room(keys.shape[2], new)
        self.offset = start + keys.shape[2]
        for buffer, part in zip(self.buffers, new):
            buffer[..., start : self.offset, :] = part
        held = [b[..., : self.offset, :] for b in self.buffers]
        return (QuantizedKV(*held[:3], self.group_size, self.bits),
                QuantizedKV(*held[3:], self.group_size, self.bits))

    def claim(self) -> int:
        """Room for one more position, counted as held; where it goes (see `QuantizedSlotCache`)."""
        at = self._room(1, self.buffers)
        self.offset += 1
        return at

    def slot_view(self):
        """How a compiled decode step sees this kind of cache: (state, position, slot) -> a `QuantizedSlotCache`."""
        group_size, bits = self.group_size, self.bits
        return lambda state, position, slot: QuantizedSlotCache(state, position, slot, group_size, bits)

    @property
    def state(self) -> list[mx.array]:
        return self.buffers or []

    @state.setter
    def state(self, arrays: list[mx.array]) -> None:
        self.buffers = arrays

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


def make_full_cache(kv_bits: int | None, head_dim: int):
    """A new cache for a full-attention layer: float keys and values, or `kv_bits`-wide ones."""
    if kv_bits is None:
        return KVCache()
    if type(kv_bits) is not int or kv_bits not in KV_BITS:
        raise InputError(f"kv_bits={kv_bits!r} is not a KV-cache width: give 8 or 4 (bits per key and value), "
                         "or None for an unquantized cache.")
    if head_dim % KV_GROUP_SIZE:
        raise InputError(f"This model's attention heads ({head_dim} dims) do not split into the KV cache's "
                         f"groups of {KV_GROUP_SIZE}: run it without kv_bits.")
    return QuantizedKVCache(kv_bits)


def attend(queries: mx.array, keys, values, scale: float, mask) -> mx.array:
    """Scaled dot-product attention of (B, heads, L, D) queries over float keys and values or
    over a quantized cache's (grouped-query: heads a multiple of the key/value heads)."""
    if mx.default_device() == mx.cpu and queries.shape[2] > 1 and keys.shape[2] > KEY_BLOCK:
        return attend_in_key_blocks(queries, keys, values, scale, mask)
    if not isinstance(keys, QuantizedKV):
        additive = isinstance(mask, mx.array) and mask.dtype != mx.bool_
        if queries.shape[2] == 1 and additive and _unfused_masked_attention():
            return attend_one_query(queries, keys, values, scale, mask)
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    # Decode through MLX's quantized kernel, prompt chunks dequantized. On the CPU, at 4k and 16k
    # positions: one query per head, 19 and 71 ms against 58 and 184; 128 queries, 2.3 and 9.5 s
    # against 0.22 and 1.2 (8-bit; the kernel wins at 2 queries, ties or loses from 3 on;
    # `benchmarks/kv_cache.py --speed`).
    if queries.shape[2] == 1 and not isinstance(mask, str):
        return attend_quantized(queries, keys, values, scale, mask)
    return attend_dequantized(queries, keys, values, scale, mask)


def _unfused_masked_attention() -> bool:
    """Whether MLX's attention of one query over an array mask is its general graph (a scale
    multiply, the product, a select or add for the mask, softmax, the weighted sum): on the CPU,
    and on CUDA for every head size (MLX 0.32.4, seen on an H100). Metal, with fused one-query
    kernels, keeps MLX's attention."""
    return mx.default_device() == mx.cpu or mx.cuda.is_available()


def attend_one_query(queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: mx.array) -> mx.array:
    """One query per head over float keys and values with an additive `mask`: the scaled scores
    and the mask in one GEMM (`addmm`), the softmax, the weighted sum. Three kernels, where MLX's
    general attention graph takes five."""
    grouped = rows_per_kv_head(queries, keys.shape[1])
    scores = mx.addmm(mask, grouped, keys.swapaxes(-1, -2), alpha=scale)
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ values).reshape(queries.shape)


def rows_per_kv_head(queries: mx.array, kv_heads: int) -> mx.array:
    """(B, H, L, D) queries as (B, kv_heads, H / kv_heads * L, D): each key/value head serves
    H / kv_heads consecutive query heads, which become its rows."""
    B, H, L, D = queries.shape
    return queries.reshape(B, kv_heads, H // kv_heads * L, D)


def _compute_dtype(x: mx.array):
    return mx.float32 if mx.default_device() == mx.cpu else x.dtype  # CPU kernels: float32 is several times faster


def attend_dequantized(queries: mx.array, keys: QuantizedKV, values: QuantizedKV, scale: float, mask) -> mx.array:
    """MLX's fused attention over the dequantized keys and values (a transient float copy)."""
    dtype = _compute_dtype(queries)
    out = mx.fast.scaled_dot_product_attention(queries.astype(dtype), keys.dequantize(dtype),
                                               values.dequantize(dtype), scale=scale, mask=mask)
    return out.astype(queries.dtype)


def attend_in_key_blocks(queries: mx.array, keys, values, scale: float, mask) -> mx.array:
    """Attention of a prompt chunk over many cached positions, `KEY_BLOCK` keys at a time with
    a running softmax, each block evaluated before the next (float32; float or quantized keys and
    values). MLX's CPU attention holds every query's scores at once, and the dequantized path a
    float32 copy of the whole cache: E2B with an 8-bit cache at 32k positions peaked at 1.71 GB
    of MLX memory that way, 1.47 GB this way (`benchmarks/memory.py --context 32768`)."""
    B, H, L, D = queries.shape
    _, kv_heads, positions, _ = keys.shape
    group = H // kv_heads
    rows = rows_per_kv_head(queries.astype(mx.float32) * scale, kv_heads)
    if isinstance(mask, str):  # causal, aligned to the last key
        mask = mx.arange(positions)[None] <= mx.arange(positions - L, positions)[:, None]
    # Hidden keys score a finite minimum, not -inf: a row with no visible key in a block then
    # gathers weights there, which the first visible key's larger maximum fades to zero.
    hidden = -1e30
    best = mx.full((B, kv_heads, group * L, 1), hidden, mx.float32)
    total = mx.zeros((B, kv_heads, group * L, 1), mx.float32)
    out = mx.zeros((B, kv_heads, group * L, D), mx.float32)
    for start in range(0, positions, KEY_BLOCK):
        block = slice(start, start + KEY_BLOCK)
        k, v = (_positions_f32(a, block) for a in (keys, values))
        scores = rows @ k.swapaxes(-1, -2)
        if mask is not None:
            visible = mx.broadcast_to(mask[None, :, block], (group, L, scores.shape[-1])).reshape(group * L, -1)
            scores = mx.where(visible, scores, hidden)
        new_best = mx.maximum(best, scores.max(axis=-1, keepdims=True))
        weights = mx.exp(scores - new_best)
        fade = mx.exp(best - new_best)
        total = total * fade + weights.sum(axis=-1, keepdims=True)
        out = out * fade + weights @ v
        best = new_best
        mx.eval(best, total, out)
    return (out / total).reshape(B, H, L, D).astype(queries.dtype)


def _positions_f32(keys_or_values, block: slice) -> mx.array:
    if isinstance(keys_or_values, QuantizedKV):
        return keys_or_values.positions(block).dequantize(mx.float32)
    return keys_or_values[..., block, :].astype(mx.float32)


def attend_quantized(queries: mx.array, keys: QuantizedKV, values: QuantizedKV, scale: float,
                     mask: mx.array | None = None) -> mx.array:
    """One query per head through MLX's quantized kernel, softmax in float32; `mask`, a (1, keys)
    row, hides the keys where it is False or -inf (slots of a buffer not yet written)."""
    B, H, L, D = queries.shape
    grouped = rows_per_kv_head(queries.astype(_compute_dtype(queries)), keys.shape[1])
    scores = keys.matmul(grouped, transpose=True).astype(mx.float32)
    if scale != 1.0:
        scores = scores * scale
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
    weights = mx.softmax(scores, axis=-1).astype(grouped.dtype)
    return values.matmul(weights, transpose=False).reshape(B, H, L, D).astype(queries.dtype)


def reserve(caches: list, n: int) -> None:
    """Make room in `caches` for `n` more positions, allocated at their next growth."""
    for c in caches:
        c.reserve(n)


def can_trim(caches: list, n: int) -> bool:
    return all(c.can_trim(n) for c in caches)


def trim(caches: list, n: int) -> None:
    for c in caches:
        c.trim(n)
