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


class _Buffers:
    """Keys and values held in buffers of positions, written in place."""

    def __init__(self):
        self.keys = self.values = None

    def _reallocate(self, capacity: int, start: int, stop: int, like: tuple[mx.array, mx.array]) -> None:
        """New buffers of `capacity` positions, beginning with positions [start, stop) of the old."""

        def fresh(old, new):
            B, H, _, D = new.shape
            buffer = mx.zeros((B, H, capacity, D), new.dtype)
            if old is not None and stop > start:
                buffer[..., : stop - start, :] = old[..., start:stop, :]
            return buffer

        self.keys, self.values = fresh(self.keys, like[0]), fresh(self.values, like[1])

    def _write(self, at: int, keys: mx.array, values: mx.array) -> int:
        end = at + keys.shape[2]
        self.keys[..., at:end, :] = keys
        self.values[..., at:end, :] = values
        return end

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


class KVCache(_Buffers):
    """Every position of a full-attention layer."""

    step = 256  # positions the buffers grow by

    def __init__(self):
        super().__init__()
        self.offset = 0  # positions seen (and held)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None or self.offset + keys.shape[2] > self.keys.shape[2]:
            capacity = -(-(self.offset + keys.shape[2]) // self.step) * self.step
            self._reallocate(capacity, 0, self.offset, (keys, values))
        self.offset = self._write(self.offset, keys, values)
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def mask(self, n: int):
        return attention_mask(n)

    def can_trim(self, n: int) -> bool:
        return n <= self.offset

    def trim(self, n: int) -> None:
        self.offset -= n


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

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        visible = self._visible(n)
        if self.keys is None or self.held + n > self.keys.shape[2]:
            past = visible - n
            # Grown a step at a time while the window fills, then the window and one step.
            capacity = min(-(-(past + n) // self.step) * self.step, self.window - 1 + max(n, self.step))
            self._reallocate(capacity, self.held - past, self.held, (keys, values))
            self.held = past
        self.held = self._write(self.held, keys, values)
        self.offset += n
        return self.keys[..., self.held - visible : self.held, :], self.values[..., self.held - visible : self.held, :]

    def mask(self, n: int):
        return attention_mask(n, self._visible(n) - n, self.window)

    def can_trim(self, n: int) -> bool:
        """Trimming must leave every position the next query may see."""
        return n <= self.offset and self.held - n >= min(self.offset - n, self.window - 1)

    def trim(self, n: int) -> None:
        self.held -= n
        self.offset -= n


def can_trim(caches: list, n: int) -> bool:
    return all(c.can_trim(n) for c in caches)


def trim(caches: list, n: int) -> None:
    for c in caches:
        c.trim(n)
