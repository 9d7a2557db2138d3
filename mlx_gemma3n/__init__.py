"""Gemma 3n on MLX: `model, tokenizer = load("google/gemma-3n-E2B-it")`, then `generate` or
`stream_generate`, or keep a conversation with `ChatSession`."""

from .generate import ChatSession, SamplingOptions, generate, stream_generate
from .loading import load

__all__ = ["load", "generate", "stream_generate", "ChatSession", "SamplingOptions"]
__version__ = "0.1.0"
