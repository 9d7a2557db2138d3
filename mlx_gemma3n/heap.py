"""Freed memory handed back to the system, so that the process's resident size is what it uses."""

from __future__ import annotations

import ctypes
import sys

import mlx.core as mx


def release_freed_memory() -> None:
    """Empty MLX's cache of freed buffers and return glibc's free heap pages (`malloc_trim`).
    glibc keeps freed blocks resident until then: after reading a 33 MB tokenizer.json about
    180 MiB, after loading and merging E2B's 4-bit weights about 90 MB. Where there is no
    malloc_trim (macOS, whose allocator returns large blocks by itself) only MLX's cache is emptied."""
    mx.clear_cache()
    if not sys.platform.startswith("linux"):
        return
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # a C library without it
        return
    malloc_trim(0)


def keep_no_freed_buffers() -> None:
    """On the CPU back-end, MLX keeps no cache of freed buffers: they go back to the C library as
    they are freed, where later buffers of any size can reuse them, instead of waiting in MLX's
    cache for one of their own size until the next `release_freed_memory`. E2B 4-bit (compact), a
    384-token prompt in 128-token chunks: a peak RSS of 1.47 GB instead of 1.51, the prompt 14%
    slower (29.1 s against 25.5, medians of 3; `benchmarks/memory.py`). A GPU keeps its cache:
    there, freeing costs more than it saves. A program that prefers the speed can set MLX's cache
    limit back after loading (`mx.set_cache_limit`)."""
    if mx.default_device() == mx.cpu:
        mx.set_cache_limit(0)
