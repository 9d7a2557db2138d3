"""Chat completion requests: the JSON body checked field by field and turned into what the library
takes. Fields we do not know are ignored (clients send many); fields we know must have their
documented type, and options we cannot honour are refused rather than silently dropped."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .. import SamplingOptions
from .errors import RequestError

ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system
MAX_STOP_SEQUENCES = 4


@dataclass
class ChatRequest:
    messages: list[dict]  # OpenAI messages, checked; attachments still encoded
    max_tokens: int
    sampling: SamplingOptions
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"The request body is not valid JSON ({e}): send a JSON object.") from None
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    return body


def _typed(body: dict, name: str, kinds: tuple, what: str):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise RequestError(f"'{name}' must be {what}, not {json.dumps(value)[:40]}.", param=name)
    return value


def _number(body: dict, name: str, low: float, high: float, *, open_low: bool = False):
    value = _typed(body, name, (int, float), "a number")
    if value is not None and not (low < value <= high if open_low else low <= value <= high):
        bounds = f"{'above' if open_low else 'at least'} {low} and at most {high}"
        raise RequestError(f"'{name}' must be {bounds}, not {value}.", param=name)
    return value


def _refuse_unsupported(body: dict) -> None:
    if (_typed(body, "n", (int,), "an integer") or 1) != 1:
        raise RequestError("Only one choice per request is supported: leave 'n' out or set it to 1.", param="n")
    if _typed(body, "logprobs", (bool,), "true or false"):
        raise RequestError("Log probabilities are not supported: leave 'logprobs' out.", param="logprobs")
    if _typed(body, "tools", (list,), "a list"):
        raise RequestError("Tool calling is not supported: leave 'tools' out.", param="tools")
    response_format = _typed(body, "response_format", (dict,), "an object")
    if response_format and response_format.get("type", "text") != "text":
        raise RequestError("Only text replies are supported: leave 'response_format' out.", param="response_format")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2.0, 2.0):
            raise RequestError(f"'{name}' is not supported: leave it out or use 'repetition_penalty'.", param=name)


def _messages(body: dict) -> list[dict]:
    messages = _typed(body, "messages", (list,), "a list of messages")
    if not messages:
        raise RequestError("'messages' is required: send at least one message.", param="messages")
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(f"{param} must be an object whose role is one of {', '.join(ROLES)}.", param=param)
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
            raise RequestError(f"{param}.content must be a string or a list of content parts.", param=f"{param}.content")
        for j, part in enumerate(content):
            kind = part.get("type")
            if kind not in ("text", "image_url", "input_audio"):
                raise RequestError(f"{param}.content[{j}] has type {kind!r}: send text, image_url or input_audio parts.",
                                   param=f"{param}.content[{j}].type")
            if kind == "text" and not isinstance(part.get("text"), str):
                raise RequestError(f"{param}.content[{j}].text must be a string.", param=f"{param}.content[{j}].text")
    return messages


def _sampling(body: dict, defaults: SamplingOptions) -> SamplingOptions:
    top_k = _typed(body, "top_k", (int,), "an integer")
    if top_k is not None and top_k < -1:
        raise RequestError("'top_k' must be -1 or 0 (no limit) or a positive number of tokens.", param="top_k")
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, open_low=True)
    min_p = _number(body, "min_p", 0.0, 1.0)
    penalty = _number(body, "repetition_penalty", 0.0, 100.0, open_low=True)
    seed = _typed(body, "seed", (int,), "an integer")
    return SamplingOptions(
        temperature=defaults.temperature if temperature is None else temperature,
        top_k=defaults.top_k if top_k is None else max(top_k, 0),
        top_p=defaults.top_p if top_p is None else top_p,
        min_p=defaults.min_p if min_p is None else min_p,
        repetition_penalty=defaults.repetition_penalty if penalty is None else penalty,
        seed=seed,
    )


def _stop(body: dict) -> list[str]:
    stop = _typed(body, "stop", (str, list), "a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else stop or []
    if len(stop) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"'stop' must be at most {MAX_STOP_SEQUENCES} non-empty strings.", param="stop")
    return stop


def parse_chat(body: dict, *, max_tokens_cap: int, defaults: SamplingOptions | None = None) -> ChatRequest:
    """The request's fields checked, with the server's defaults where the request leaves one out."""
    _typed(body, "model", (str,), "a string")
    _refuse_unsupported(body)
    messages = _messages(body)
    max_tokens = _typed(body, "max_completion_tokens", (int,), "an integer")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = _typed(body, "max_tokens", (int,), "an integer"), "max_tokens"
    if max_tokens is not None and not 1 <= max_tokens <= max_tokens_cap:
        raise RequestError(f"'{name}' must be between 1 and {max_tokens_cap}, this server's limit.", param=name)
    options = _typed(body, "stream_options", (dict,), "an object") or {}
    include_usage = _typed(options, "include_usage", (bool,), "true or false")
    return ChatRequest(
        messages=messages,
        max_tokens=max_tokens or max_tokens_cap,
        sampling=_sampling(body, defaults or SamplingOptions()),
        stop=_stop(body),
        stream=bool(_typed(body, "stream", (bool,), "true or false")),
        include_usage=bool(include_usage),
    )
