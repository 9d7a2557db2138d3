"""KV caches: full-attention layers keep every position, sliding-window layers only the
window, KV-shared layers none (they attend over their source layer's keys and values).

Both caches take a chunk of new keys/values (B, heads, L, dims), write it in place into a
buffer that grows by whole steps, and return every key the chunk's queries may see. `mask(L)`,
asked before the update, gives the matching attention mask: None, "causal" (aligned to the
last key, as MLX's attention takes it) or a boolean (L, keys) array.
"""

from __future__ import annotations

import mlx.core as mx


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


def _grown(buffer: mx.array | None, keep: mx.array | None, like: mx.array, capacity: int) -> mx.array:
    """A buffer of `capacity` positions shaped like `like`, starting with the positions `keep`."""
    B, H, _, D = like.shape
    fresh = mx.zeros((B, H, capacity, D), like.dtype)
    if keep is not None and keep.shape[2]:
        fresh[..., : keep.shape[2], :] = keep
    return fresh


class KVCache:
    """Every position of a full-attention layer."""

    step = 256  # positions the buffers grow by

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0  # positions seen (and held)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        end = self.offset + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            capacity = -(-end // self.step) * self.step
            self.keys = _grown(self.keys, self._held(self.keys), keys, capacity)
            self.values = _grown(self.values, self._held(self.values), values, capacity)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def _held(self, buffer):
        return None if buffer is None else buffer[..., : self.offset, :]

    def mask(self, n: int):
        return attention_mask(n)

    def can_trim(self, n: int) -> bool:
        return n <= self.offset

    def trim(self, n: int) -> None:
        self.offset -= n

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


class SlidingWindowCache:
    """The last `window - 1` positions of a sliding-window layer: with the chunk's own, all a
    query at window distance may see. The held positions sit at the front of the buffer and new
    ones are written after them; when the buffer is full, the positions still needed move to the
    front of a new one (once the window is full, a copy of it every `step` tokens)."""

    step = 64

    def __init__(self, window: int):
        self.window = window
        self.keys = self.values = None
        self.offset = 0  # positions seen
        self.held = 0  # of which the buffer holds the last `held`

    def _visible(self, n: int) -> int:
        """Keys a chunk of `n` new positions attends over: the past it may see, then its own."""
        return min(self.held, self.window - 1) + n

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        visible = self._visible(n)
        if self.keys is None or self.held + n > self.keys.shape[2]:
            past = visible - n
            # Grown a step at a time while the window fills, then the window and one step.
            capacity = min(-(-(past + n) // self.step) * self.step, self.window - 1 + max(n, self.step))
            start = self.held - past
            self.keys = _grown(self.keys, None if self.keys is None else self.keys[..., start : self.held, :], keys, capacity)
            self.values = _grown(self.values, None if self.values is None else self.values[..., start : self.held, :], values, capacity)
            self.held = past
        end = self.held + n
        self.keys[..., self.held : end, :] = keys
        self.values[..., self.held : end, :] = values
        self.held, self.offset = end, self.offset + n
        return self.keys[..., end - visible : end, :], self.values[..., end - visible : end, :]

    def mask(self, n: int):
        return attention_mask(n, self._visible(n) - n, self.window)

    def can_trim(self, n: int) -> bool:
        """Trimming must leave every position the next query may see."""
        return n <= self.offset and self.held - n >= min(self.offset - n, self.window - 1)

    def trim(self, n: int) -> None:
        self.held -= n
        self.offset -= n

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


def can_trim(caches: list, n: int) -> bool:
    return all(c.can_trim(n) for c in caches)


def trim(caches: list, n: int) -> None:
    for c in caches:
        c.trim(n)
