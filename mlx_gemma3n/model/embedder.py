"""Maps audio/vision tokens into the text stream: hard ids through a small table, soft tokens
(tower outputs) directly; both normed, projected to the text width and normed again."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import AudioConfig, VisionConfig
from .text import RMSNorm


class MultimodalEmbedder(nn.Module):
    def __init__(self, config: VisionConfig | AudioConfig, text_hidden_size: int):
        super().__init__()
        dims, eps = config.hidden_size, config.rms_norm_eps
        self.vocab_offset = config.vocab_offset
        self.vocab_size = config.vocab_size
        self.embedding = nn.Embedding(config.vocab_size, dims)
        self.hard_embedding_norm = RMSNorm(dims, eps)
        self.soft_embedding_norm = RMSNorm(dims, eps)
        self.embedding_projection = nn.Linear(dims, text_hidden_size, bias=False)
        self.embedding_post_projection_norm = RMSNorm(text_hidden_size, eps, with_scale=False)

    def owns(self, ids: mx.array) -> mx.array:
        return (ids >= self.vocab_offset) & (ids < self.vocab_offset + self.vocab_size)

    def __call__(self, ids: mx.array | None = None, soft_tokens: mx.array | None = None) -> mx.array:
        if soft_tokens is not None:
            x = self.soft_embedding_norm(soft_tokens)
        else:
            ids = mx.clip(ids - self.vocab_offset, 0, self.vocab_size - 1)
            x = self.hard_embedding_norm(self.embedding(ids))
        return self.embedding_post_projection_norm(self.embedding_projection(x))
