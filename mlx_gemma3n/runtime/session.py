"""A conversation whose KV cache outlives each turn, so that a new turn prefills only what is new."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from ..cache import can_trim, trim
from ..submodel import plan_for
from ..processing.prompt import encode, expand_media, user_content
from .engine import Engine
from .generation import (
    DEFAULT_MAX_TOKENS, GenerationResponse, PromptTooLong, SamplingOptions, _check_request, _responses,
    chat_messages, prepare_audio, reply,
)
from .media import Attachments, Media


class ChatSession:
    """The conversation is kept as the exact token ids the model saw and produced, so that the
    cache stays valid (re-tokenizing a reply's text need not give back the same ids). One
    session is one conversation: use it from one thread at a time (sessions on other threads
    share the model safely)."""

    END_OF_TURN = "<end_of_turn>"  # closes a turn in Gemma's chat template

    def __init__(self, model, tokenizer, system: str | None = None, sampling: SamplingOptions | None = None,
                 submodel=None, kv_bits: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.sampling = sampling or SamplingOptions()
        self.plan = plan_for(model.config, submodel)
        self.kv_bits = kv_bits  # see `stream_generate`
        self.reset()

    def _new_cache(self) -> list:
        return self.model.make_cache(self.plan, kv_bits=self.kv_bits)

    def resize(self, submodel) -> None:
        """Go on at another MatFormer size (a `Submodel`, a preset's name, or None for the full
        model). The conversation is kept; its keys and values are recomputed at the new size
        with the next message (a different size computes different ones)."""
        plan = plan_for(self.model.config, submodel)
        if plan != self.plan:
            self.plan = plan
            self.cache, self.cached_tokens = self._new_cache(), []

    def reset(self) -> None:
        self.messages: list[dict] = chat_messages([], self.system)
        self.cache = self._new_cache()
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
                self.cache, common = self._new_cache(), 0
        self.cached_tokens = tokens[:common]
        return tokens[common:]

    def send(self, text: str, max_tokens: int = DEFAULT_MAX_TOKENS, images=(), audio=(),
             progress=None) -> Iterator[GenerationResponse]:
        """Add a user message (with attachments) and stream the reply. Stopping the iteration early
        (Ctrl-C) keeps the partial reply in the history."""
        attachments = Attachments.prepare(images, prepare_audio(audio))
        before = (self.media.image_rows, self.media.audio_rows)
        content = user_content(text, len(attachments.images), len(attachments.audio))
        self.messages.append({"role": "user", "content": content})
        responses = None
        try:
            prompt = self._prompt_for(content)
            _check_request(self.model, prompt, None, max_tokens)  # the context guard speaks before any work
            start = len(prompt) - len(self._tokens_to_feed(prompt))
            cache, media = self.cache, self.media

            def job():
                yield from media.add(self.model, attachments)
                yield from reply(
                    self.model, self.tokenizer, prompt[start:], max_tokens=min(max_tokens, _room(self.model, prompt)),
                    sampling=self.sampling, cache=cache, plan=self.plan,
                    input_embeddings=lambda: media.embeddings(self.model, prompt, start), media_seconds=lambda: media.seconds,
                )

            self.last_prompt, self.last_prefill = prompt, len(prompt) - start
            responses = _responses(Engine.of(self.model).submit(job), progress)
            first = next(responses)
        except BaseException as e:
            if responses is None or isinstance(e, PromptTooLong):  # nothing went through the model
                self.messages.pop()
                self.media.image_rows, self.media.audio_rows = before
            else:  # e.g. Ctrl-C while the attachments or the prompt went in
                responses.close()
                self._settle(prompt, [], [])
            raise
        reply_text, generated = [], []
        try:
            for response in itertools.chain([first], responses):
                reply_text.append(response.text)
                generated.append(response.token)
                yield response
        finally:
            responses.close()  # the engine has stopped this request before the cache is read
            self._settle(prompt, reply_text, generated)

    def _settle(self, prompt: list[int], reply_text: list[str], generated: list[int]) -> None:
        """Record the turn, and exactly which of its tokens the cache now holds."""
        if generated and generated[-1] in self.tokenizer.eos_token_ids:
            generated = generated[:-1]
        self.messages.append({"role": "assistant", "content": "".join(reply_text)})
        self.conversation = prompt + generated
        offsets = {c.offset for c in self.cache}
        if len(offsets) == 1:  # (prompt + the reply's ids, and possibly its end-of-turn id)
            self.cached_tokens = (prompt + generated + [None])[: offsets.pop()]
        else:  # interrupted halfway through the layers: the cache cannot be trusted
            self.cache, self.cached_tokens = self._new_cache(), []


def _room(model, prompt: list[int]) -> int:
    return model.config.text.max_position_embeddings - len(prompt)
