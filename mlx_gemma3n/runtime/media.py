"""Attachments: images and audio, prepared on the caller's thread (decoded, resized, log-mel
features: NumPy only), then encoded by the towers on the engine's thread into soft tokens that
take the place of their placeholders in the prompt."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..errors import InputError
from ..processing.audio import log_mel_batch
from ..processing.image import preprocess_images
from .engine import raise_if_cancelled


@dataclass
class Attachments:
    """A request's new images and audio clips, ready for the towers."""

    images: list = field(default_factory=list)  # the images as given (the prompt counts them)
    audio: list = field(default_factory=list)  # 16 kHz clips of at most 30 s
    pixels: list[np.ndarray] = field(default_factory=list)  # one (1, H, W, 3) array per image
    features: tuple[np.ndarray, np.ndarray] | None = None  # log-mel frames and their validity, all clips

    @classmethod
    def prepare(cls, images=(), audio=()) -> "Attachments":
        images, audio = list(images), list(audio)
        return cls(images, audio, [preprocess_images([image]) for image in images], log_mel_batch(audio) if audio else None)


class Media:
    """A conversation's attachments as soft tokens in the text space, one row per placeholder
    token, in the order their placeholders appear."""

    def __init__(self):
        self.image_rows: mx.array | None = None
        self.audio_rows: mx.array | None = None
        self.seconds = 0.0  # spent in the towers

    def add(self, model, attachments: Attachments, between_blocks: Callable[[], None] = raise_if_cancelled) -> Iterator:
        """Encode the attachments (on the engine's thread), one tower call at a time, each evaluated
        before the next: the peak memory is that of the largest call, not the sum. Yields a
        `Progress` before and after each call, so that other requests may run in between.
        `between_blocks` runs after each block of a tower: by default it ends a cancelled
        request there, not seconds later at the end of the tower call."""
        from .generation import Progress

        dims = model.config.text.hidden_size
        towers = model.towers

        def encode(kind: str, run) -> mx.array:
            start = time.perf_counter()
            with towers.use(kind) as tower:
                rows = run(tower).reshape(-1, dims)
                mx.eval(rows)
            self.seconds += time.perf_counter() - start
            return rows

        for i, pixels in enumerate(attachments.pixels):
            yield Progress("image", i, len(attachments.pixels))
            rows = encode("vision", lambda tower: model.embed_image(mx.array(pixels), tower, between_blocks=between_blocks))
            self.image_rows = _appended(self.image_rows, rows)
            yield Progress("image", i + 1, len(attachments.pixels))
        if attachments.features is not None:
            yield Progress("audio", 0, len(attachments.audio))
            features, valid = attachments.features
            rows = encode("audio", lambda tower: model.embed_audio_features(
                mx.array(features), mx.array(~valid), tower, between_blocks=between_blocks))
            self.audio_rows = _appended(self.audio_rows, rows)
            yield Progress("audio", len(attachments.audio), len(attachments.audio))
        if not towers.keep:
            mx.clear_cache()  # hand the released towers' memory back, not only to MLX's cache

    def embeddings(self, model, tokens: list[int], start: int) -> mx.array | None:
        """Embeddings of `tokens[start:]` with the soft tokens in place; None when it holds no attachment."""
        config, new = model.config, tokens[start:]
        picked = []
        for token_id, rows in ((config.image_token_id, self.image_rows), (config.audio_token_id, self.audio_rows)):
            count = sum(t == token_id for t in new)
            if count and (rows is None or rows.shape[0] < tokens.count(token_id)):
                raise InputError("The prompt has more attachment placeholders than attachments were given.")
            skip = sum(t == token_id for t in tokens[:start])
            picked.append(rows[skip : skip + count] if count else None)
        if all(p is None for p in picked):
            return None
        return model.embed(mx.array([new]), *picked)[0]


def _appended(held: mx.array | None, rows: mx.array) -> mx.array:
    held = rows if held is None else mx.concatenate([held, rows])
    mx.eval(held)
    return held
