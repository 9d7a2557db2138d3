"""Generation: prompts through the chat template, chunked prefill and cached decoding, streamed
text, stop on every EOS id, a context guard, and chat sessions that keep their KV cache between
turns.

    python -m mlx_gemma3n.generate --model google/gemma-3n-E2B-it --prompt "Write a haiku"
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
import numpy as np

from .errors import InputError
from .cache import can_trim, trim
from .processing.audio import MAX_SAMPLES, as_samples, log_mel_batch
from .processing.image import preprocess_images
from .processing.prompt import encode, expand_media, user_content
from .sampling import make_sampler, repetition_penalty

# The published generation config's sampling.
DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P = 1.0, 64, 0.95

# Prompt tokens per forward pass. A GPU holds a whole layer's temporaries at once, so this sets
# the memory a prompt adds over the weights: on an H100, E2B 4-bit, 512-token prompt, 197 MB at
# 512 tokens a step, 108 at 256, 57-66 at 128, 44 at 64, for 4850, 3750-4150, 2570 and 1400
# prompt tokens/s. At 128, 512 + 128 tokens peak at 1.42 GB for E2B 4-bit and 2.46 GB for E4B
# 4-bit at group size 128.
PREFILL_STEP_SIZE = 128


class PromptTooLong(InputError):
    """The prompt does not fit in the model's context."""


@dataclass
class SamplingOptions:
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None

    def sampler(self):
        return make_sampler(self.temperature, self.top_k, self.top_p, self.min_p)

    def logits_processors(self) -> list:
        return [repetition_penalty(self.repetition_penalty)] if self.repetition_penalty else []


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


def chat_messages(prompt: str | list[dict], system: str | None = None, images=(), audio=()) -> list[dict]:
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": user_content(prompt, len(images), len(audio))}]
    else:
        messages = list(prompt)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


@dataclass
class Media:
    """A conversation's attachments as soft tokens in the text space, one row per placeholder token,
    in the order their placeholders appear."""

    image_rows: mx.array | None = None
    audio_rows: mx.array | None = None

    def add(self, model, images=(), audio=()) -> None:
        # One tower call at a time, each evaluated before the next: the peak memory is that of
        # the largest call, not the sum (a 768x768 image's activations are the biggest).
        dims = model.config.text.hidden_size
        for image in images:
            rows = model.embed_image(mx.array(preprocess_images([image]))).reshape(-1, dims)
            mx.eval(rows)
            self.image_rows = rows if self.image_rows is None else mx.concatenate([self.image_rows, rows])
        if audio:
            features, valid = log_mel_batch(audio)
            rows = model.embed_audio_features(mx.array(features), mx.array(~valid)).reshape(-1, dims)
            mx.eval(rows)
            self.audio_rows = rows if self.audio_rows is None else mx.concatenate([self.audio_rows, rows])
        mx.eval(self.image_rows, self.audio_rows)
        if not model.keep_towers:
            mx.clear_cache()  # hand the released towers' memory back, not only to MLX's cache

    def embeddings(self, model, tokens: list[int], start: int) -> mx.array | None:
        """Embeddings of `tokens[start:]` with the soft tokens in place; None when it holds no attachment."""
        config, new = model.config, tokens[start:]
        picked = []
        for token_id, rows in ((config.image_token_id, self.image_rows), (config.audio_token_id, self.audio_rows)):
            count = sum(t == token_id for t in new)
            if count and (rows is None or rows.shape[0] < tokens.count(token_id)):
                raise ValueError("The prompt has more attachment placeholders than attachments were given.")
            skip = sum(t == token_id for t in tokens[:start])
            picked.append(rows[skip : skip + count] if count else None)
        if all(p is None for p in picked):
            return None
        return model.embed(mx.array([new]), *picked)[0]


def prepare_audio(clips) -> list[np.ndarray]:
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
        raise PromptTooLong(
            f"The prompt is {used} tokens (with {n_cached} already in this conversation) but the model's context "
            f"is {context}: shorten it, or /reset the conversation."
        )
    return min(max_tokens, context - used)


def generate_tokens(
    model,
    prompt_tokens: list[int],
    cache: list,
    sampler,
    logits_processors=(),
    max_tokens: int = 256,
    prefill_step_size: int = PREFILL_STEP_SIZE,
    input_embeddings: mx.array | None = None,
    prompt_progress_callback=None,
) -> Iterator[int]:
    """The ids of the reply, one at a time. All but the prompt's last token go through the model
    `prefill_step_size` at a time, filling the cache; each next token is computed while the
    caller handles the one before."""
    prompt = mx.array(prompt_tokens)
    seen = prompt  # what the logits processors look back on
    total, done = len(prompt_tokens), 0

    def forward(ids: mx.array, embeddings: mx.array | None) -> mx.array:
        extra = {} if embeddings is None else {"input_embeddings": embeddings[None]}
        return model(ids[None], cache=cache, **extra)

    def choose(ids: mx.array, embeddings: mx.array | None = None) -> mx.array:
        logits = forward(ids, embeddings)[:, -1, :]
        for process in logits_processors:
            logits = process(seen, logits)
        return sampler(logits)

    progress = prompt_progress_callback or (lambda done, total: None)
    progress(0, total)
    while total - done > 1:
        n = min(prefill_step_size, total - done - 1)
        forward(prompt[done : done + n], None if input_embeddings is None else input_embeddings[done : done + n])
        mx.eval([c.state for c in cache])
        mx.clear_cache()  # the chunk's temporaries, so that they are not kept for the next
        done += n
        progress(done, total)
    rest = None if input_embeddings is None else input_embeddings[done:]
    token = choose(prompt[done:], rest)
    mx.eval(token)
    progress(total, total)
    for _ in range(max_tokens):
        # Also after the last token: its keys and values then wait in the cache for the next turn.
        if logits_processors:
            seen = mx.concatenate([seen, token])
        following = choose(token)
        mx.async_eval(following)
        yield token.item()
        token = following


def stream_tokens(
    model,
    tokenizer,
    prompt_tokens: list[int],
    *,
    max_tokens: int = 256,
    sampling: SamplingOptions | None = None,
    prompt_cache: list | None = None,
    input_embeddings: mx.array | None = None,
    prefill_step_size: int = PREFILL_STEP_SIZE,
    prompt_progress_callback=None,
) -> Iterator[GenerationResponse]:
    """Stream the reply to ready-made prompt token ids, one `GenerationResponse` per token; the
    last says why it stopped (its text is what the detokenizer held back, its token may be an
    end-of-sequence id)."""
    if not prompt_tokens:
        raise ValueError("The prompt is empty: give at least one token.")
    sampling = sampling or SamplingOptions()
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    max_tokens = _context_guard(model, len(prompt_tokens), cache[0].offset if cache else 0, max_tokens)
    if max_tokens <= 0:
        raise ValueError("max_tokens must be at least 1.")
    detokenizer = tokenizer.detokenizer
    stats = dict(prompt_tokens=len(prompt_tokens), prompt_tps=0.0)
    start = time.perf_counter()
    tokens = generate_tokens(model, prompt_tokens, cache, sampling.sampler(), sampling.logits_processors(), max_tokens,
                             prefill_step_size, input_embeddings, prompt_progress_callback)
    for n, token in enumerate(tokens, start=1):
        if n == 1:
            stats["prompt_tps"] = len(prompt_tokens) / (time.perf_counter() - start)
            start = time.perf_counter()
        stop = token in tokenizer.eos_token_ids
        last = stop or n == max_tokens
        if not stop:
            detokenizer.add_token(token)
        if last:
            detokenizer.finalize()
        yield GenerationResponse(
            detokenizer.last_segment, token, generation_tokens=n, generation_tps=n / (time.perf_counter() - start),
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=("stop" if stop else "length") if last else None,
            **stats,
        )
        if last:
            return


def stream_generate(
    model,
    tokenizer,
    prompt: str | list[dict],
    *,
    images=(),
    audio=(),
    max_tokens: int = 256,
    system: str | None = None,
    raw: bool = False,
    sampling: SamplingOptions | None = None,
    **options,
) -> Iterator[GenerationResponse]:
    """Stream the reply to `prompt` (a user message, or a list of chat messages), with `images`
    (paths, URLs, bytes, PIL images, arrays) and `audio` (see `prepare_audio`) attached.
    `raw=True` sends the text as it is, without the chat template. Extra keyword arguments
    are `SamplingOptions` fields."""
    sampling = sampling or SamplingOptions(**options)
    audio = prepare_audio(audio)
    if raw:
        if not isinstance(prompt, str):
            raise ValueError("raw=True takes the prompt as one string.")
        tokens = tokenizer.encode(expand_media(prompt, tokenizer, model.config))
    else:
        tokens = encode(tokenizer, model.config, chat_messages(prompt, system, images, audio))
    media = Media()
    media.add(model, images, audio)
    yield from stream_tokens(
        model, tokenizer, tokens, max_tokens=max_tokens, sampling=sampling,
        input_embeddings=media.embeddings(model, tokens, 0),
    )


def generate(model, tokenizer, prompt: str | list[dict], **kwargs) -> str:
    """The whole reply to `prompt` as one string (see `stream_generate`)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


def describe(model, tokenizer, image, prompt: str = "Describe this image.", **kwargs) -> str:
    """What the model says about one image (or a list of images, e.g. video frames)."""
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    return generate(model, tokenizer, prompt, images=images, **kwargs).strip()


class ChatSession:
    """A conversation whose KV cache outlives each turn: a new turn prefills only what is new.

    The conversation is kept as the exact token ids the model saw and produced, so that the
    cache stays valid (re-tokenizing a reply's text need not give back the same ids)."""

    END_OF_TURN = "<end_of_turn>"  # closes a turn in Gemma's chat template

    def __init__(self, model, tokenizer, system: str | None = None, sampling: SamplingOptions | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.sampling = sampling or SamplingOptions()
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = chat_messages([], self.system)
        self.cache = self.model.make_cache()
        self.conversation: list[int] = []  # prompt and reply ids of every turn so far
        self.media = Media()  # soft tokens of every attachment so far
        self.cached_tokens: list[int] = []  # exactly the ids whose keys/values the cache holds
        self.last_prompt: list[int] = []
        self.last_prefill = 0

    def _prompt_for(self, content) -> list[int]:
        config = self.model.config
        if not self.conversation:  # first turn: the whole template, system prompt folded in
            return encode(self.tokenizer, config, self.messages)
        turn = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        turn = expand_media(turn.removeprefix(self.tokenizer.bos_token or ""), self.tokenizer, config)
        return self.conversation + self.tokenizer.encode(f"{self.END_OF_TURN}\n{turn}", add_special_tokens=False)

    def _tokens_to_feed(self, tokens: list[int]) -> list[int]:
        """The part of `tokens` the cache lacks, trimming (or dropping) a cache that went further."""
        common = 0
        for a, b in zip(self.cached_tokens, tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # always feed at least one token to get logits
        extra = len(self.cached_tokens) - common
        if extra:
            if can_trim(self.cache, extra):
                trim(self.cache, extra)
            else:  # a sliding window that has moved on cannot be rewound: start over
                self.cache, common = self.model.make_cache(), 0
        self.cached_tokens = tokens[:common]
        return tokens[common:]

    def send(self, text: str, max_tokens: int = 512, images=(), audio=()) -> Iterator[GenerationResponse]:
        """Add a user message (with attachments) and stream the reply. Stopping the iteration early
        (Ctrl-C) keeps the partial reply in the history."""
        audio = prepare_audio(audio)
        before = (self.media.image_rows, self.media.audio_rows)
        content = user_content(text, len(images), len(audio))
        self.messages.append({"role": "user", "content": content})
        responses = None
        try:
            self.media.add(self.model, images, audio)
            prompt = self._prompt_for(content)
            start = len(prompt) - len(self._tokens_to_feed(prompt))
            responses = stream_tokens(
                self.model, self.tokenizer, prompt[start:], max_tokens=max_tokens, sampling=self.sampling,
                prompt_cache=self.cache, input_embeddings=self.media.embeddings(self.model, prompt, start),
            )
            self.last_prompt, self.last_prefill = prompt, len(prompt) - start
            first = next(responses)  # the context guard speaks before anything is computed
        except BaseException as e:
            if responses is None or isinstance(e, PromptTooLong):  # nothing went through the model
                self.messages.pop()
                self.media.image_rows, self.media.audio_rows = before
            else:  # e.g. Ctrl-C during the prefill
                self._settle(prompt, [], [])
            raise
        reply, generated = [], []
        try:
            for response in itertools.chain([first], responses):
                reply.append(response.text)
                generated.append(response.token)
                yield response
        finally:
            self._settle(prompt, reply, generated)

    def _settle(self, prompt: list[int], reply: list[str], generated: list[int]) -> None:
        """Record the turn, and exactly which of its tokens the cache now holds."""
        if generated and generated[-1] in self.tokenizer.eos_token_ids:
            generated = generated[:-1]
        self.messages.append({"role": "assistant", "content": "".join(reply)})
        self.conversation = prompt + generated
        offsets = {c.offset for c in self.cache}
        if len(offsets) == 1:  # (prompt + the reply's ids, and possibly its end-of-turn id)
            self.cached_tokens = (prompt + generated + [None])[: offsets.pop()]
        else:  # interrupted halfway through the layers: the cache cannot be trusted
            self.cache, self.cached_tokens = self.model.make_cache(), []


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory or Hugging Face repo id")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temp", type=float, default=DEFAULT_TEMPERATURE, help="0 for greedy")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--release-towers", action="store_true",
                        help="free the image/audio towers after each use (least memory; the next attachment reads them again)")


def sampling_from_args(args) -> SamplingOptions:
    return SamplingOptions(args.temp, args.top_k, args.top_p, args.min_p, args.repetition_penalty, args.seed)


def load_from_args(args):
    from .loading import load

    return load(args.model, dtype=getattr(mx, args.dtype), keep_towers=not args.release_towers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_gemma3n.generate", description="Generate a reply from Gemma 3n.")
    add_sampling_args(parser)
    parser.add_argument("--prompt", required=True, help="the user message ('-' reads standard input)")
    parser.add_argument("--image", action="append", default=[], help="attach an image (path or URL); repeatable")
    parser.add_argument("--audio", action="append", default=[], help="attach an audio file; repeatable")
    parser.add_argument("--raw", action="store_true", help="send the prompt without the chat template")
    parser.add_argument("--verbose", action="store_true", help="print prompt and generation speed")
    args = parser.parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        model, tokenizer = load_from_args(args)
        last = None
        for last in stream_generate(
            model, tokenizer, prompt, images=args.image, audio=args.audio, max_tokens=args.max_tokens,
            system=args.system, raw=args.raw, sampling=sampling_from_args(args),
        ):
            print(last.text, end="", flush=True)
        print()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.verbose and last is not None:
        print(
            f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s\n"
            f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s\n"
            f"peak memory: {last.peak_memory:.2f} GB",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
