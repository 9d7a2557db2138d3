"""Replies as the library makes them: text-only conversations continue the longest cached prefix
(see `prompt_cache`), conversations with attachments go through `stream_generate`; stop strings
cut the text where the client asked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .. import stream_generate
from ..runtime.generation import stream_tokens
from ..processing.prompt import encode
from .media import Conversation
from .parsing import ChatRequest
from .prompt_cache import PromptCache


@dataclass
class Piece:
    """Text to send, and on the last piece why the reply ended and the token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0  # the whole prompt
    cached_tokens: int = 0  # of which the prompt cache already held
    completion_tokens: int = 0


class StopText:
    """Cuts a streamed reply at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = max(len(s) - 1 for s in self.stops)
        cut = max(len(self.pending) - keep, 0)
        # Hold back only what could still begin a stop string.
        while cut < len(self.pending) and not any(s.startswith(self.pending[cut:]) for s in self.stops):
            cut += 1
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def chat_reply(model, tokenizer, prompt_cache: PromptCache, conversation: Conversation,
               request: ChatRequest, submodel: str | None = None) -> Iterator[Piece]:
    """The reply's pieces (blocking: run it off the event loop)."""
    if conversation.images or conversation.audio:
        responses = stream_generate(model, tokenizer, conversation.messages, images=conversation.images,
                                    audio=conversation.audio, max_tokens=request.max_tokens, sampling=request.sampling,
                                    submodel=submodel)
        yield from _pieces(responses, request.stop, cached=0)
        return
    tokens = encode(tokenizer, model.config, conversation.messages)
    cache, held = prompt_cache.take(tokens)
    if cache is None:
        cache = model.make_cache(submodel=submodel)
    generated: list[int] = []
    try:
        responses = stream_tokens(model, tokenizer, tokens[held:], max_tokens=request.max_tokens,
                                  sampling=request.sampling, prompt_cache=cache, submodel=submodel)
        yield from _pieces(_recording(responses, generated), request.stop, cached=held)
    finally:
        prompt_cache.put(tokens + generated, cache)


def _recording(responses, generated: list[int]):
    for response in responses:
        generated.append(response.token)
        yield response


def _pieces(responses, stops: list[str], cached: int) -> Iterator[Piece]:
    stop = StopText(stops)
    last = None
    try:
        for last in responses:
            text = stop.feed(last.text)
            if stop.stopped or last.finish_reason:
                break
            if text:
                yield Piece(text)
    finally:
        responses.close()
    if last is None:
        return
    reason = "stop" if stop.stopped else last.finish_reason
    tail = text if stop.stopped else text + stop.flush()
    yield Piece(tail, reason or "stop", prompt_tokens=cached + last.prompt_tokens, cached_tokens=cached,
                completion_tokens=last.generation_tokens)
