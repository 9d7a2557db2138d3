"""Generation: prompts through the chat template, chunked prefill and cached decoding, streamed
text, stop on every EOS id, and a context guard. Every reply is a job of the model's `Engine`:
the model runs on the engine's thread, and any number of threads may ask at once."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx

from ..cache import reserve
from ..errors import InputError
from ..heap import release_freed_memory
from ..plan import Plan
from ..processing.audio import MAX_SAMPLES, as_samples
from ..processing.prompt import encode, expand_media, user_content
from ..sampling import make_sampler, repetition_penalty
from ..submodel import plan_for
from .engine import Engine
from .media import Attachments, Media

# The published generation config's sampling.
DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P = 1.0, 64, 0.95
# Reply length unless told otherwise: the library's functions, ChatSession and the commands alike.
DEFAULT_MAX_TOKENS = 512

# Prompt tokens per forward pass, by back-end. A GPU holds a whole layer's temporaries at once,
# so this sets the memory a prompt adds over the weights; a step's fixed cost (its kernels, one
# evaluation per layer) sets the speed. H200, E2B 4-bit, a 2048-token prompt
# (`benchmarks/step_profile.py`): 2.6k tokens/s at 128 a step (peak 1.50 GB), 6.9k at 512 (1.63
# GB), 11.7k at 2048 (2.11 GB). The 2-core CPU gains little past 128 tokens a step and holds
# more: a 512-token E2B prompt took 34.5 s at 128 (1.49 GB), 32.3 s at 256 (1.52), 31.3 s at 512 (1.60).
PREFILL_STEP_SIZE = {"cpu": 128, "gpu": 512}


def default_prefill_step() -> int:
    """Prompt tokens per forward pass on the default device (`PREFILL_STEP_SIZE`)."""
    return PREFILL_STEP_SIZE["cpu" if mx.default_device() == mx.cpu else "gpu"]


class PromptTooLong(InputError):
    """The prompt does not fit in the model's context."""


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise InputError(f"{name} is {value!r}; it must be a finite number.")
        for name in ("top_k", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise InputError(f"{name} is {value!r}; it must be a whole number.")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty is {self.repetition_penalty}; it must be positive (1 changes nothing).")
        self.sampler()  # checks the ranges

    def sampler(self):
        return make_sampler(self.temperature, self.top_k, self.top_p, self.min_p)

    def logits_processors(self) -> list:
        return [repetition_penalty(self.repetition_penalty)] if self.repetition_penalty else []

    def key(self) -> mx.array:
        """This request's own random key: the same seed gives the same draws, whatever runs beside it."""
        return mx.random.key(self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)


@dataclass
class GenerationResponse:
    """One step of a streamed reply: the text it completed and the token it chose."""

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB (10^9 bytes) of MLX memory at most in use so far
    finish_reason: str | None = None  # "stop" (an end-of-sequence id) or "length" on the last response
    media_seconds: float = 0.0  # time the towers took to encode this request's images and audio


@dataclass(frozen=True)
class Progress:
    """Work before the first token: `stage` "image", "audio" or "prompt", `done` of `total` units."""

    stage: str
    done: int
    total: int


def chat_messages(prompt: str | list[dict], system: str | None = None, images=(), audio=()) -> list[dict]:
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": user_content(prompt, len(images), len(audio))}]
    else:
        messages = list(prompt)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def prepare_audio(clips) -> list:
    """Clips as 16 kHz mono arrays of at most 30 s each (the reference encodes 30 s per clip):
    longer recordings become several clips, never a cut one. A clip is a path, bytes, an
    (array, sample_rate) pair, or an array already at 16 kHz."""
    out = []
    for samples in map(as_samples, clips):
        out += [samples[i : i + MAX_SAMPLES] for i in range(0, max(len(samples), 1), MAX_SAMPLES)]
    return out


def _context_guard(model, n_prompt: int, n_cached: int, max_tokens: int) -> int:
    """Check the prompt fits; return how many tokens may still be generated."""
    context = model.config.text.max_position_embeddings
    used = n_cached + n_prompt
    if used >= context:
        held = f" (with {n_cached} already in this conversation)" if n_cached else ""
        raise PromptTooLong(f"The prompt is {used} tokens{held} but the model's context is {context}: shorten it.")
    return min(max_tokens, context - used)


def _steps(model, prompt_tokens, cache, sampling: SamplingOptions, max_tokens, prefill_step_size, input_embeddings,
           plan: Plan | None) -> Iterator[Progress | int]:
    """Progress of the prompt's chunks, then the reply's ids one at a time. The prompt goes through
    the model `prefill_step_size` tokens at a time, filling the cache; the KV-shared upper layers
    run only for its last token, whose logits give the first reply token. Each next token is
    computed (by the model's compiled decode step) while the caller handles the one before."""
    prefill_step_size = prefill_step_size or default_prefill_step()
    prompt = mx.array(prompt_tokens)
    seen = prompt  # what the logits processors look back on
    total, done = len(prompt_tokens), 0
    sampler, processors, key = sampling.sampler(), sampling.logits_processors(), sampling.key()

    def forward(ids: mx.array, embeddings: mx.array | None, **kw) -> mx.array:
        extra = {} if embeddings is None else {"input_embeddings": embeddings[None]}
        return model(ids[None], cache=cache, plan=plan, **extra, **kw)

    def choose(logits: mx.array) -> mx.array:
        nonlocal key
        for process in processors:
            logits = process(seen, logits)
        key, draw = mx.random.split(key)
        return sampler(logits, draw)

    reserve(cache, total + max_tokens)  # one allocation for the prompt and reply, not one per step
    try:
        while total - done > prefill_step_size:  # every chunk but the last only fills the cache
            chunk = slice(done, done + prefill_step_size)
            forward(prompt[chunk], None if input_embeddings is None else input_embeddings[chunk], outputs="none")
            mx.eval([c.state for c in cache])
            if mx.default_device() == mx.cpu:
                # The chunk's temporaries go back to the system (MLX's cache and glibc's free heap
                # pages), not kept resident for the next. A GPU keeps them for reuse: freeing them
                # cost more than the chunk's work (H200, 512-token steps, a 512-token prompt: 109 ms
                # with the cache cleared, 79 without; the same peak).
                release_freed_memory()
            done += prefill_step_size
            yield Progress("prompt", done, total)
        rest = None if input_embeddings is None else input_embeddings[done:]
        token = choose(forward(prompt[done:], rest, outputs="last")[:, -1, :])
        yield token.item()  # at once: building the next step would delay the first token, not the second
        for n in range(max_tokens):
            # The step that computes the next token writes this one's keys and values; after the
            # last token too, so that they wait in the cache for the next turn.
            if processors:
                seen = mx.concatenate([seen, token])
            following = choose(model.decode(token[None], cache, plan)[:, -1, :])
            mx.async_eval(following)
            if n:  # the caller takes this token while the device computes the next
                yield token.item()
            token = following
    finally:
        # Whatever happens, nothing of this request is left half-computed in the cache: a later
        # turn may run on another thread.
        mx.eval([c.state for c in cache])
        if mx.default_device() == mx.cpu:
            # Replies of other lengths free buffers of other sizes, which glibc would keep resident
            # (E2B, 8 replies of different lengths: 62 MB more resident without this, none with it).
            release_freed_memory()


def reply(
    model,
    tokenizer,
    prompt_tokens: list[int],
    cache: list,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sampling: SamplingOptions | None = None,
    input_embeddings: mx.array | Callable[[], mx.array | None] | None = None,
    prefill_step_size: int | None = None,
    plan: Plan | None = None,
    media_seconds: Callable[[], float] = lambda: 0.0,
) -> Iterator[Progress | GenerationResponse]:
    """A reply as an engine job: `Progress` while the prompt goes in, then one
    `GenerationResponse` per token; the last says why it stopped (its text is what the
    detokenizer held back, its token may be an end-of-sequence id). The tokens continue `cache`
    (made for `plan`). `input_embeddings` may be a function, called here, on the engine's thread."""
    sampling = sampling or SamplingOptions()
    if callable(input_embeddings):
        input_embeddings = input_embeddings()
    detokenizer = tokenizer.detokenizer
    n_prompt, start = len(prompt_tokens), time.perf_counter()
    prompt_tps = 0.0
    steps = _steps(model, prompt_tokens, cache, sampling, max_tokens, prefill_step_size, input_embeddings, plan)
    n = 0
    for step in steps:
        if isinstance(step, Progress):
            yield step
            continue
        token, n = step, n + 1
        if n == 1:
            prompt_tps = n_prompt / (time.perf_counter() - start)
            start = time.perf_counter()
        stop = token in tokenizer.eos_token_ids
        last = stop or n == max_tokens
        if not stop:
            detokenizer.add_token(token)
        if last:
            detokenizer.finalize()
        yield GenerationResponse(
            detokenizer.last_segment, token, n_prompt, prompt_tps, n, n / (time.perf_counter() - start),
            mx.get_peak_memory() / 1e9, ("stop" if stop else "length") if last else None, media_seconds(),
        )
        if last:
            steps.close()
            return


def _check_request(model, prompt_tokens, cache, max_tokens) -> int:
    if not prompt_tokens:
        raise InputError("The prompt is empty: give at least one token.")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InputError(f"max_tokens is {max_tokens!r}; it must be a whole number of at least 1.")
    return _context_guard(model, len(prompt_tokens), cache[0].offset if cache else 0, max_tokens)


def _responses(request, progress: Callable[[Progress], None] | None) -> Iterator[GenerationResponse]:
    """A request's responses on the caller's thread; leaving early cancels it."""
    try:
        for item in request:
            if isinstance(item, Progress):
                if progress is not None:
                    progress(item)
            else:
                yield item
    finally:
        request.cancel()


def stream_tokens(
    model,
    tokenizer,
    prompt_tokens: list[int],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sampling: SamplingOptions | None = None,
    prompt_cache: list | None = None,
    input_embeddings: mx.array | None = None,
    prefill_step_size: int | None = None,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
    submodel=None,
    kv_bits: int | None = None,
) -> Iterator[GenerationResponse]:
    """Stream the reply to ready-made prompt token ids, one `GenerationResponse` per token. The
    tokens continue `prompt_cache` when it is given (it is filled in place; made for the same
    `submodel`); otherwise a new cache is made, its full-attention keys and values `kv_bits` wide
    when given (see `stream_generate`). The prompt goes through the model `prefill_step_size`
    tokens at a time (by default the back-end's: `PREFILL_STEP_SIZE`)."""
    plan = plan_for(model.config, submodel)
    if prompt_cache is None:
        prompt_cache = model.make_cache(plan, kv_bits=kv_bits)  # refused here, not on the engine, if wrong
    max_tokens = _check_request(model, prompt_tokens, prompt_cache, max_tokens)
    if input_embeddings is not None:
        mx.eval(input_embeddings)  # MLX runs a graph on the thread that built it: here, not on the engine's
    request = Engine.of(model).submit(lambda: reply(
        model, tokenizer, prompt_tokens, prompt_cache, max_tokens=max_tokens, sampling=sampling,
        input_embeddings=input_embeddings, prefill_step_size=prefill_step_size, plan=plan,
    ))
    progress = None
    if prompt_progress_callback is not None:
        prompt_progress_callback(0, len(prompt_tokens))
        progress = lambda p: p.stage == "prompt" and prompt_progress_callback(p.done, p.total)  # noqa: E731
    yield from _responses(request, progress)


def prompt_tokens(model, tokenizer, prompt: str | list[dict], *, images=(), audio=(), system=None, raw=False) -> list[int]:
    """The token ids of a prompt (a user message, or a list of chat messages) with its attachments' placeholders."""
    if raw:
        if not isinstance(prompt, str):
            raise InputError("raw=True takes the prompt as one string.")
        return tokenizer.encode(expand_media(prompt, tokenizer, model.config))
    return encode(tokenizer, model.config, chat_messages(prompt, system, images, audio))


def stream_generate(
    model,
    tokenizer,
    prompt: str | list[dict],
    *,
    images=(),
    audio=(),
    max_tokens: int = DEFAULT_MAX_TOKENS,
    system: str | None = None,
    raw: bool = False,
    sampling: SamplingOptions | None = None,
    submodel=None,
    kv_bits: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    **options,
) -> Iterator[GenerationResponse]:
    """Stream the reply to `prompt` (a user message, or a list of chat messages), with `images`
    (paths, URLs, bytes, PIL images, arrays) and `audio` (see `prepare_audio`) attached.
    `raw=True` sends the text as it is, without the chat template. `submodel` (a MatFormer
    `Submodel` or a preset's name, e.g. "E2B") runs that size of the loaded model. `kv_bits` (8 or
    4) keeps the keys and values of the full-attention layers, the ones that grow with the context,
    quantized: 8 bits nearly halves the cache of a long context for a small loss. Extra keyword
    arguments are `SamplingOptions` fields. `progress` is called with a `Progress` as the
    attachments and the prompt go through the model."""
    sampling = sampling or SamplingOptions(**options)
    plan = plan_for(model.config, submodel)
    attachments = Attachments.prepare(images, prepare_audio(audio))
    tokens = prompt_tokens(model, tokenizer, prompt, images=attachments.images, audio=attachments.audio,
                           system=system, raw=raw)
    max_tokens = _check_request(model, tokens, None, max_tokens)
    cache = model.make_cache(plan, kv_bits=kv_bits)

    def job():
        media = Media()
        yield from media.add(model, attachments)
        yield from reply(model, tokenizer, tokens, cache, max_tokens=max_tokens, sampling=sampling, plan=plan,
                         input_embeddings=lambda: media.embeddings(model, tokens, 0),
                         media_seconds=lambda: media.seconds)

    yield from _responses(Engine.of(model).submit(job), progress)


def generate(model, tokenizer, prompt: str | list[dict], **kwargs) -> str:
    """The whole reply to `prompt` as one string (see `stream_generate`)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


def describe(model, tokenizer, image, prompt: str = "Describe this image.", **kwargs) -> str:
    """What the model says about one image (or a list of images, e.g. video frames)."""
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    return generate(model, tokenizer, prompt, images=images, **kwargs).strip()
