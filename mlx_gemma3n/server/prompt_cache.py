"""KV caches of recent conversations, shared across requests: a chat client resends the whole
history each turn, and the cache of the conversation it continues already holds all but the new
turn. An entry is taken out while a request extends it, so two requests never share one."""

from __future__ import annotations

import threading
from collections import OrderedDict

import mlx.core as mx
import numpy as np

from ..cache import can_trim, trim


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class PromptCache:
    """An LRU of (token ids, KV cache holding exactly those ids), bounded in entries and in bytes."""

    def __init__(self, max_entries: int = 8, max_bytes: int = 512 << 20):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[tuple[int, ...], list] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(_nbytes(cache) for cache in self._entries.values())

    def take(self, tokens: list[int]) -> tuple[list | None, int]:
        """The cache sharing the longest prefix with `tokens`, trimmed to that prefix (at least one
        token is left to feed, so that the model gives logits), and how many ids it holds; (None, 0)
        when none helps."""
        with self._lock:
            best, held = None, 0
            for key in self._entries:
                n = min(common_prefix(key, tokens), len(tokens) - 1)
                if n > held:
                    best, held = key, n
            if best is None:
                return None, 0
            cache = self._entries.pop(best)
        extra = len(best) - held
        if extra and not can_trim(cache, extra):
            return None, 0  # a sliding window that moved past the prefix cannot be rewound
        trim(cache, extra)
        return cache, held

    def put(self, tokens: list[int], cache: list) -> None:
        """Keep `cache`, which holds the first `offset` of `tokens`; a cache left half-updated
        (its layers at different offsets) is dropped."""
        offsets = {c.offset for c in cache}
        if len(offsets) != 1 or not (held := offsets.pop()) or held > len(tokens) or self.max_entries <= 0:
            return
        mx.eval([c.state for c in cache])
        key = tuple(tokens[:held])
        with self._lock:
            for old in [k for k in self._entries if common_prefix(k, key) == len(k)]:
                del self._entries[old]  # this conversation continues it
            self._entries[key] = cache
            while self._entries and (len(self._entries) > self.max_entries or
                                     sum(map(_nbytes, self._entries.values())) > self.max_bytes):
                self._entries.popitem(last=False)


def _nbytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)
