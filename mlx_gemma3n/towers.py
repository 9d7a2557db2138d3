"""The audio and vision towers of one loaded model: read from disk when their input first
appears, shared by every request that uses them, and released (when asked) only once no
request holds them.

    with towers.use("vision") as tower:
        rows = model.embed_image(pixels, tower)
        mx.eval(rows)
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn

from .errors import InputError

KINDS = ("audio", "vision")


def check_kinds(kinds) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    for kind in kinds:
        if kind not in KINDS:
            raise InputError(f"Unknown tower {kind!r}: Gemma 3n has a 'vision' and an 'audio' tower.")
    return kinds


class Towers:
    """`keep=False` releases a tower as soon as its last user is done: the smallest footprint,
    at the cost of reading it again for the next image or audio."""

    def __init__(self, load: Callable[[str], nn.Module] | None, keep: bool = True):
        self.load = load
        self.keep = keep
        self._lock = threading.Lock()
        self._loaded: dict[str, nn.Module] = {}
        self._users: Counter[str] = Counter()
        self._release_when_free: set[str] = set()

    def loaded(self, kind: str) -> bool:
        return kind in self._loaded

    def get(self, kind: str) -> nn.Module:
        """The tower, loaded if need be. Loading happens under the lock: a second request waits for
        the first one's read instead of reading the same weights twice."""
        check_kinds(kind)
        with self._lock:
            if kind not in self._loaded:
                if self.load is None:
                    raise InputError(f"This model has no {kind} tower to load.")
                self._loaded[kind] = self.load(kind)
            return self._loaded[kind]

    @contextlib.contextmanager
    def use(self, kind: str) -> Iterator[nn.Module]:
        tower = self.get(kind)
        with self._lock:
            self._users[kind] += 1
        try:
            yield tower
        finally:
            with self._lock:
                self._users[kind] -= 1
                if not self.keep:
                    self._release_when_free.add(kind)
                self._release_free()

    def release(self, kinds=KINDS) -> None:
        """Release the towers now, or, for one in use, as soon as its last user is done."""
        with self._lock:
            self._release_when_free.update(check_kinds(kinds))
            self._release_free()
        mx.clear_cache()

    def _release_free(self) -> None:
        for kind in list(self._release_when_free):
            if not self._users[kind]:
                self._loaded.pop(kind, None)  # its weights go once nothing pending refers to them
                self._release_when_free.discard(kind)
