"""Gemma 3n on MLX: `model, tokenizer = load("google/gemma-3n-E2B-it")`, then `generate`,
`stream_generate`, `describe` (images) or `transcribe` (speech), or keep a conversation with
`ChatSession`. Any number of threads may call these at once: each model's `Engine` runs the
model on one thread of its own and serves the requests in turn."""

import sys
import types

from .errors import CheckpointError, Gemma3nError, InputError, SourceError
from .live import LiveDescriber, LiveTranscriber
from .loading import load, preload_towers, unload_towers
from .plan import Plan
from .runtime.engine import Engine
from .runtime.generation import GenerationResponse, SamplingOptions, describe, generate, stream_generate
from .runtime.session import ChatSession
from .submodel import Submodel
from .transcription import Transcript, transcribe

__all__ = [
    "load", "preload_towers", "unload_towers", "generate", "stream_generate", "describe", "transcribe", "Transcript",
    "ChatSession", "SamplingOptions", "GenerationResponse", "LiveTranscriber", "LiveDescriber", "Engine", "Plan",
    "Submodel", "Gemma3nError", "InputError", "CheckpointError", "SourceError",
]
__version__ = "0.1.0"


class _Package(types.ModuleType):
    """`mlx_gemma3n.generate` and `mlx_gemma3n.transcribe` are the functions, also after a program
    imports the command modules of the same names (which would otherwise replace them here)."""

    def __setattr__(self, name, value):
        if name in ("generate", "transcribe", "chat") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
