"""Choosing the next token: greedy, or sampled after temperature, top-k, top-p and min-p, in the
order transformers applies the published generation config; and the repetition penalty."""

from __future__ import annotations

import mlx.core as mx

from .errors import InputError

REPETITION_CONTEXT = 20  # how many recent tokens the repetition penalty looks at


def _drop(logits: mx.array, order: mx.array, dropped: mx.array) -> mx.array:
    """`logits` with -inf where `dropped` (given in the order `order` sorts them) is true."""
    in_sorted = mx.where(dropped, -mx.inf, mx.take_along_axis(logits, order, axis=-1))
    return mx.put_along_axis(logits, order, in_sorted, axis=-1)


def _check(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or not 0 <= min_p <= 1:
        raise InputError("Sampling needs temperature >= 0, top_k >= 0, 0 < top_p <= 1 and 0 <= min_p <= 1.")


def warp(logits: mx.array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> mx.array:
    """Logits (B, vocab) divided by the temperature, -inf for the tokens the filters leave out."""
    _check(temperature, top_k, top_p, min_p)
    logits = logits.astype(mx.float32) / temperature
    order = mx.argsort(-logits, axis=-1)  # most likely first
    dropped = mx.arange(logits.shape[-1]) >= (top_k if 0 < top_k else logits.shape[-1])
    dropped = mx.broadcast_to(dropped, logits.shape)
    if top_p < 1 or min_p > 0:
        probs = mx.softmax(mx.take_along_axis(_drop(logits, order, dropped), order, axis=-1), axis=-1)
        if top_p < 1:  # the most likely tokens until their mass reaches top_p
            dropped = dropped | (mx.cumsum(probs, axis=-1) - probs >= top_p)
        if min_p > 0:  # of those, the ones at least min_p times as likely as the best
            dropped = dropped | (probs < min_p * probs[..., :1])
    return _drop(logits, order, dropped)


def make_sampler(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """A function from logits (B, vocab) and a random key (a request's own, from `mx.random.key`;
    None draws from MLX's global generator) to token ids (B,): greedy at temperature 0."""
    _check(temperature, top_k, top_p, min_p)
    if temperature == 0:
        return lambda logits, key=None: mx.argmax(logits, axis=-1)
    return lambda logits, key=None: mx.random.categorical(warp(logits, temperature, top_k, top_p, min_p), key=key)


def repetition_penalty(penalty: float, context: int = REPETITION_CONTEXT):
    """A logits processor (tokens so far, logits) -> logits that makes the last `context` tokens
    less likely: positive logits divided by `penalty`, negative ones multiplied."""
    if penalty <= 0:
        raise InputError("The repetition penalty must be positive (1 changes nothing).")

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        recent = tokens[-context:]
        if recent.size == 0:
            return logits
        seen = logits[:, recent]
        logits[:, recent] = mx.where(seen > 0, seen / penalty, seen * penalty)
        return logits

    return process
