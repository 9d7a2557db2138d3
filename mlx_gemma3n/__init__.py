"""Gemma 3n on MLX: `model, tokenizer = load("google/gemma-3n-E2B-it")`, then `generate`,
`stream_generate`, `describe` (images) or `transcribe` (speech), or keep a conversation with
`ChatSession`."""

from .generate import ChatSession, SamplingOptions, describe, generate, stream_generate
from .loading import load
from .transcribe import Transcript, transcribe

__all__ = [
    "load", "generate", "stream_generate", "describe", "transcribe", "Transcript", "ChatSession", "SamplingOptions",
]
__version__ = "0.1.0"
