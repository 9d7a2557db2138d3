"""Choosing the next token: greedy, or sampled after temperature, top-k, top-p and min-p, in the
order transformers applies the published generation config; and the repetition penalty."""

from __future__ import annotations

from functools import lru_cache

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
        return _greedy
    draw = _top_k_draw(temperature, top_k, top_p, min_p) if top_k > 0 else _warped_draw(temperature, top_p, min_p)

    def sample(logits: mx.array, key: mx.array | None = None) -> mx.array:
        return draw(logits, mx.random.key(_global_seed()) if key is None else key)

    return sample


def _greedy(logits: mx.array, key: mx.array | None = None) -> mx.array:
    return mx.argmax(logits, axis=-1)


def _global_seed() -> int:
    """A seed drawn from MLX's global generator (compiled draws take their key as an argument)."""
    return mx.random.randint(0, 2**31 - 1).item()


@lru_cache(maxsize=64)
def _warped_draw(temperature: float, top_p: float, min_p: float):
    return mx.compile(lambda logits, key: mx.random.categorical(warp(logits, temperature, 0, top_p, min_p), key=key))


@lru_cache(maxsize=64)
def _top_k_draw(temperature: float, top_k: int, top_p: float, min_p: float):
    """The draw among the `top_k` most likely tokens only: they are found by a partition of the
    vocabulary, and only they are sorted (for top-p and min-p), as the filters need no more."""

    @mx.compile
    def draw(logits: mx.array, key: mx.array) -> mx.array:
        logits = logits.astype(mx.float32) / temperature
        k = min(top_k, logits.shape[-1])
        candidates = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
        if top_p < 1 or min_p > 0:
            candidates = mx.take_along_axis(candidates, mx.argsort(-mx.take_along_axis(logits, candidates, -1)), -1)
        values = mx.take_along_axis(logits, candidates, axis=-1)
        if top_p < 1 or min_p > 0:
            probs = mx.softmax(values, axis=-1)
            dropped = mx.zeros(values.shape, mx.bool_)
            if top_p < 1:  # the most likely tokens until their mass reaches top_p
                dropped = dropped | (mx.cumsum(probs, axis=-1) - probs >= top_p)
            if min_p > 0:  # of those, the ones at least min_p times as likely as the best
                dropped = dropped | (probs < min_p * probs[..., :1])
            values = mx.where(dropped, -mx.inf, values)
        chosen = mx.random.categorical(values, key=key)
        return mx.take_along_axis(candidates, chosen[..., None], axis=-1)[..., 0]

    return draw


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
