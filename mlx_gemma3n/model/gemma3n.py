"""The whole Gemma 3n: text decoder and multimodal embedders. The vision and audio towers are
given with each call that needs them (they are loaded, shared and released outside the network),
and their soft tokens are scattered into the text stream."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ModelConfig
from ..errors import CheckpointError, InputError
from ..plan import Plan
from ..submodel import plan_for
from .decode import compilable, compiled_step
from .embedder import MultimodalEmbedder
from .text import TextModel, soft_cap


class Gemma3n(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = TextModel(config.text)
        self.embed_vision = MultimodalEmbedder(config.vision, config.text.hidden_size)
        self.embed_audio = MultimodalEmbedder(config.audio, config.text.hidden_size)
        self._multimodal_rows = None  # hard vision and audio ids, embedded once (`embed_multimodal_ids`)
        self._decode_steps = {}  # plan -> its compiled decode step (`decode`)

    # A generation loop (ours; mlx-lm's in the speed benchmark) drives the model through these three.
    @property
    def layers(self):
        return self.language_model.layers

    def make_cache(self, plan: Plan | None = None, submodel=None, kv_bits: int | None = None) -> list:
        """Empty caches for the full model, or for `submodel` (a `Submodel` or a preset's name);
        the full-attention layers' keys and values `kv_bits` wide when given (8 or 4)."""
        return self.language_model.make_cache(plan or plan_for(self.config.text, submodel), kv_bits)

    def __call__(
        self,
        inputs: mx.array,
        cache=None,
        input_embeddings: mx.array | None = None,
        plan: Plan | None = None,
        outputs: str = "all",
        submodel=None,
    ) -> mx.array | None:
        """Logits for token ids `inputs` (B, L), run through `plan`, or the plan of `submodel` (a
        MatFormer `Submodel` or a preset's name, run from these weights: nothing is copied), or the
        full model: of every position, of the last alone (`outputs="last"`, (B, 1, vocabulary)),
        or none ("none": the cache filled, None returned; see `TextModel`). `input_embeddings`
        (from `embed`) replace the looked-up embeddings; the ids still supply the per-layer inputs."""
        plan = plan or plan_for(self.config.text, submodel)
        if input_embeddings is None:
            input_embeddings = self.embed(inputs)
        hidden = self.language_model(inputs, cache, input_embeddings, plan=plan, outputs=outputs)
        return None if hidden is None else self.logits(hidden)

    def logits(self, hidden: mx.array) -> mx.array:
        """The output head (the tied embedding table), soft-capped."""
        logits = self.language_model.embed_tokens.as_linear(hidden)
        cap = self.config.text.final_logit_softcapping
        return soft_cap(logits, cap) if cap else logits

    def decode(self, ids: mx.array, cache: list, plan: Plan | None = None) -> mx.array:
        """Logits for one new token per sequence, `ids` (B, 1), continuing `cache`: the same as
        calling the model, through one compiled function (`model/decode.py`) when the caches
        already hold positions (float or quantized). A plan's first call runs uncompiled, so that
        whatever a layer sets up on first use (a MatFormer width's split) happens outside a trace."""
        plan = plan or self.language_model.plan
        if not compilable(cache):
            return self(ids, cache=cache, plan=plan)
        if plan not in self._decode_steps:
            self._decode_steps[plan] = compiled_step(self, plan)
            return self(ids, cache=cache, plan=plan)
        return self.logits(self._decode_steps[plan](ids, cache))

    def embed_multimodal_ids(self) -> mx.array:
        """Every hard vision and audio id embedded by its own table: (vision + audio vocab, hidden).
        They do not depend on the input, so they are computed once, not for every token."""
        if self._multimodal_rows is None:
            vision, audio = self.config.vision, self.config.audio
            if audio.vocab_offset != vision.vocab_offset + vision.vocab_size:
                raise CheckpointError("config.json: the audio ids must follow the vision ids, as in every Gemma 3n.")
            rows = [e(ids=mx.arange(e.vocab_size)[None] + e.vocab_offset)[0] for e in (self.embed_vision, self.embed_audio)]
            self._multimodal_rows = mx.concatenate(rows)
            mx.eval(self._multimodal_rows)
        return self._multimodal_rows

    def embed(
        self,
        ids: mx.array,
        image_soft_tokens: mx.array | None = None,
        audio_soft_tokens: mx.array | None = None,
    ) -> mx.array:
        """Scaled text embeddings, with audio/vision ids embedded by their own tables and the
        soft tokens (already through `embed_image`/`embed_audio_features`) put at their placeholders."""
        x = self.language_model.embed_tokens(ids)
        first = self.embed_vision.vocab_offset  # the audio ids follow the vision ids
        rows = self.embed_multimodal_ids()
        multimodal = (ids >= first) & (ids < first + rows.shape[0])
        x = mx.where(multimodal[..., None], rows[mx.clip(ids - first, 0, rows.shape[0] - 1)].astype(x.dtype), x)
        c = self.config
        for token_id, soft, kind in (
            (c.image_token_id, image_soft_tokens, "image"),
            (c.audio_token_id, audio_soft_tokens, "audio"),
        ):
            if soft is not None:
                x = _scatter(x, ids, token_id, soft.reshape(-1, soft.shape[-1]).astype(x.dtype), kind)
        return x

    def embed_image(self, pixel_values: mx.array, tower: nn.Module, **tower_options) -> mx.array:
        """(N, H, W, 3) pixels through the vision `tower` (called with `tower_options`) ->
        (N, 256, text hidden) soft tokens."""
        tokens = tower(pixel_values, **tower_options)
        tokens = tokens * mx.array(self.config.vision.hidden_size**0.5, dtype=tokens.dtype)
        return self.embed_vision(soft_tokens=tokens)

    def embed_audio_features(self, features: mx.array, padding: mx.array, tower: nn.Module,
                             **tower_options) -> mx.array:
        """(N, T, mels) log-mel frames with their padding mask, through the audio `tower` (called
        with `tower_options`) ->
        (N, audio_soft_tokens, text hidden). Padded positions, and the slots the prompt reserved
        beyond the encoder's output, hold the embedding of the last audio id, as in the reference."""
        encodings, padded = tower(features, padding, **tower_options)
        soft = self.embed_audio(soft_tokens=encodings)
        filler = self.embed_multimodal_ids()[-1].astype(soft.dtype)
        soft = mx.where(padded[..., None], filler, soft)
        missing = self.config.audio_soft_tokens_per_image - soft.shape[1]
        if missing > 0:
            soft = mx.concatenate([soft, mx.broadcast_to(filler, (soft.shape[0], missing, soft.shape[2]))], axis=1)
        return soft


def _scatter(x: mx.array, ids: mx.array, token_id: int, rows: mx.array, kind: str) -> mx.array:
    batch, positions = np.nonzero(np.array(ids) == token_id)
    if len(positions) != rows.shape[0]:
        raise InputError(
            f"The prompt has {len(positions)} {kind} placeholder tokens but {rows.shape[0]} {kind} soft tokens "
            f"were given: build the prompt with the same {kind}s you pass in."
        )
    x[mx.array(batch), mx.array(positions)] = rows
    return x
