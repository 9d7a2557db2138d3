"""An OpenAI-compatible HTTP server over one loaded Gemma 3n: chat completions (text, images,
audio; streamed or not), audio transcriptions and translations, the model list.

    python -m mlx_gemma3n.server --model google/gemma-3n-E2B-it [--port 8080] [--api-key KEY]
"""

from .app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
