"""Inputs the tests feed the model: speech-like audio."""

from __future__ import annotations

import numpy as np


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """A voiced, amplitude-modulated tone with a little noise: loud enough to count as speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    voiced = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    return (voiced + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
