"""The whole Gemma 3n: text decoder, multimodal embedders, and (when their input appears)
the vision and audio towers whose soft tokens are scattered into the text stream."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ModelConfig
from .embedder import MultimodalEmbedder
from .text import TextModel, soft_cap


class Gemma3n(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = TextModel(config.text)
        self.embed_vision = MultimodalEmbedder(config.vision, config.text.hidden_size)
        self.embed_audio = MultimodalEmbedder(config.audio, config.text.hidden_size)
        # The towers are built and loaded when their input first appears: `load_tower(kind)` is
        # given by whoever reads the weights (this module reads no files). With `keep_towers`
        # off, a tower is dropped again after each use: the smallest footprint, at the cost of
        # reading it again for the next image or audio.
        self.load_tower = None
        self.keep_towers = True

    def tower(self, kind: str) -> nn.Module:
        """The "vision" or "audio" tower, loaded on first use."""
        name = f"{kind}_tower"
        if name not in self:
            if self.load_tower is None:
                raise RuntimeError(f"The {kind} tower is not loaded and this model has no way to load it.")
            setattr(self, name, self.load_tower(kind))
        return self[name]

    def unload_tower(self, kind: str) -> None:
        self.pop(f"{kind}_tower", None)

    def _run_tower(self, kind: str, *inputs):
        outputs = self.tower(kind)(*inputs)
        if not self.keep_towers:
            self.unload_tower(kind)  # its weights go once the pending outputs are evaluated
        return outputs

    # A generation loop (ours; mlx-lm's in the speed benchmark) drives the model through these three.
    @property
    def layers(self):
        return self.language_model.layers

    def make_cache(self) -> list:
        return self.language_model.make_cache()

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: mx.array | None = None) -> mx.array:
        """Logits for token ids `inputs` (B, L). `input_embeddings` (from `embed`) replace the
        looked-up embeddings; the ids still supply the per-layer inputs."""
        if input_embeddings is None:
            input_embeddings = self.embed(inputs)
        hidden = self.language_model(inputs, cache, input_embeddings)
        logits = self.language_model.embed_tokens.as_linear(hidden)
        cap = self.config.text.final_logit_softcapping
        return soft_cap(logits, cap) if cap else logits

    def embed(
        self,
        ids: mx.array,
        image_soft_tokens: mx.array | None = None,
        audio_soft_tokens: mx.array | None = None,
    ) -> mx.array:
        """Scaled text embeddings, with audio/vision ids embedded by their own tables and the
        soft tokens (already through `embed_image`/`embed_audio_features`) put at their placeholders."""
        x = self.language_model.embed_tokens(ids)
        for embedder in (self.embed_vision, self.embed_audio):
            x = mx.where(embedder.owns(ids)[..., None], embedder(ids=ids).astype(x.dtype), x)
        c = self.config
        for token_id, soft, kind in (
            (c.image_token_id, image_soft_tokens, "image"),
            (c.audio_token_id, audio_soft_tokens, "audio"),
        ):
            if soft is not None:
                x = _scatter(x, ids, token_id, soft.reshape(-1, soft.shape[-1]).astype(x.dtype), kind)
        return x

    def embed_image(self, pixel_values: mx.array) -> mx.array:
        """(N, H, W, 3) pixels -> (N, 256, text hidden) soft tokens in the text space."""
        tokens = self._run_tower("vision", pixel_values)
        tokens = tokens * mx.array(self.config.vision.hidden_size**0.5, dtype=tokens.dtype)
        return self.embed_vision(soft_tokens=tokens)

    def embed_audio_features(self, features: mx.array, padding: mx.array) -> mx.array:
        """(N, T, mels) log-mel frames with their padding mask -> (N, audio_soft_tokens, text hidden).
        Padded positions, and the slots the prompt reserved beyond the encoder's output, hold the
        embedding of the last audio id, as in the reference."""
        encodings, padded = self._run_tower("audio", features, padding)
        soft = self.embed_audio(soft_tokens=encodings)
        filler = self.embed_audio(ids=mx.array([[self.config.text.vocab_size - 1]])).astype(soft.dtype)
        soft = mx.where(padded[..., None], filler, soft)
        missing = self.config.audio_soft_tokens_per_image - soft.shape[1]
        if missing > 0:
            soft = mx.concatenate([soft, mx.broadcast_to(filler, (soft.shape[0], missing, soft.shape[2]))], axis=1)
        return soft


def _scatter(x: mx.array, ids: mx.array, token_id: int, rows: mx.array, kind: str) -> mx.array:
    batch, positions = np.nonzero(np.array(ids) == token_id)
    if len(positions) != rows.shape[0]:
        raise ValueError(
            f"The prompt has {len(positions)} {kind} placeholder tokens but {rows.shape[0]} {kind} soft tokens "
            f"were given: build the prompt with the same {kind}s you pass in."
        )
    x[mx.array(batch), mx.array(positions)] = rows
    return x
