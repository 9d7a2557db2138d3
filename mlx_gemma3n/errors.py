"""One family of errors, each a sentence a person can act on.

Every error mlx_gemma3n raises on purpose is a `Gemma3nError`; the commands print it as one
line, never a traceback. The subclasses also derive from the built-in a caller would expect
(`ValueError` for bad input or files, `RuntimeError` for a live device), so code written
against those keeps working.
"""

from __future__ import annotations


class Gemma3nError(Exception):
    """Base of every error of ours."""


class InputError(Gemma3nError, ValueError):
    """Something the caller gave (a prompt, an option, an image, a recording) cannot be used."""


class InputTypeError(InputError, TypeError):
    """Something the caller gave is of a type that cannot be used."""


class CheckpointError(Gemma3nError, ValueError):
    """A checkpoint (its files, config or weights) cannot be read as Gemma 3n."""


class SourceError(Gemma3nError, RuntimeError):
    """A live source (microphone, camera, stream) failed or disappeared."""


class Cancelled(Gemma3nError):
    """The request was cancelled before it finished."""
