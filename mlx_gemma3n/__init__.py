"""Gemma 3n on MLX: `model, tokenizer = load("google/gemma-3n-E2B-it")`, then `generate`,
`stream_generate`, `describe` (images) or `transcribe` (speech), or keep a conversation with
`ChatSession`."""

from .generate import ChatSession, SamplingOptions, describe, generate, stream_generate
from .live import LiveDescriber, LiveTranscriber
from .loading import load, preload_towers, unload_towers
from .transcribe import Transcript, transcribe

__all__ = [
    "load", "preload_towers", "unload_towers", "generate", "stream_generate", "describe", "transcribe", "Transcript",
    "ChatSession", "SamplingOptions", "LiveTranscriber", "LiveDescriber",
]
__version__ = "0.1.0"
