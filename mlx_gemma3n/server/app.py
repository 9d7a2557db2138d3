"""The Starlette application: OpenAI's chat completions, audio transcriptions and translations,
and model list, over one loaded model."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import SamplingOptions, transcribe
from ..errors import InputError
from ..processing.audio import as_samples
from ..runtime.generation import PromptTooLong
from . import shapes
from .errors import RequestError, error_body
from .media import MediaPolicy, decode_conversation
from .middleware import AccessLog, BodyLimit, RequireKey
from .parsing import ChatRequest, parse_chat, parse_json
from .prompt_cache import PromptCache
from .replies import Piece, chat_reply
from .worker import ModelWorker

log = logging.getLogger("mlx_gemma3n.server")

TRANSCRIPTION_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
# Whisper's clients send ISO 639-1 codes; Gemma's instruction names the language.
LANGUAGES = {
    "ar": "Arabic", "de": "German", "en": "English", "es": "Spanish", "fr": "French", "hi": "Hindi",
    "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "pl": "Polish",
    "pt": "Portuguese", "ru": "Russian", "sv": "Swedish", "th": "Thai", "tr": "Turkish", "uk": "Ukrainian",
    "vi": "Vietnamese", "zh": "Chinese",
}


@dataclass
class ServerSettings:
    model_id: str
    api_key: str | None = None
    max_tokens: int = 2048  # per reply: the cap, and the default when a request names none
    max_tokens_per_clip: int = 256  # transcription: per 30 s clip, as transcribe() takes it
    max_body_bytes: int = 50 << 20
    media: MediaPolicy = field(default_factory=MediaPolicy)
    prompt_cache_entries: int = 8
    prompt_cache_bytes: int = 512 << 20
    submodel: str | None = None  # the MatFormer size a request gets unless its `model` names another
    sizes: tuple[str, ...] = ()  # the MatFormer presets this model can run (an E4B: all of them)


def model_ids(settings: ServerSettings) -> list[str]:
    """The ids /v1/models lists: the served model, then "<model>:<preset>" for each MatFormer size."""
    return [settings.model_id] + [f"{settings.model_id}:{size}" for size in settings.sizes]


def requested_size(settings: ServerSettings, model: str | None) -> str | None:
    """The size a request's `model` field names ("<model>:<preset>", or the preset alone), else the default."""
    asked = (model or "").rpartition(":")[2].lower()
    for size in settings.sizes:
        if size.lower() == asked:
            return size
    if model and ":" in model:
        raise RequestError(f"The model '{model}' is not served here: GET /v1/models lists what is.",
                           status=404, param="model", code="model_not_found")
    return settings.submodel


class EventStream(StreamingResponse):
    """A stream of server-sent events whose body is closed however the response ends, so that a
    client going away stops its generation."""

    def __init__(self, events):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def create_app(model, tokenizer, settings: ServerSettings) -> Starlette:
    worker = ModelWorker()
    # One prompt cache per size: the keys and values of one size are no use to another.
    prompt_caches = {size: PromptCache(settings.prompt_cache_entries, settings.prompt_cache_bytes)
                     for size in {settings.submodel, *settings.sizes}}
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": settings.model_id, "waiting": worker.waiting})

    async def list_models(request: Request):
        return JSONResponse({"object": "list", "data": [shapes.model_card(i, created) for i in model_ids(settings)]})

    async def get_model(request: Request):
        name = request.path_params["name"]
        if name not in model_ids(settings):
            raise RequestError(f"The model '{name}' is not served here: GET /v1/models lists what is.",
                               status=404, param="model", code="model_not_found")
        return JSONResponse(shapes.model_card(name, created))

    async def chat_completions(request: Request):
        body = parse_json(await request.body())
        chat = parse_chat(body, max_tokens_cap=settings.max_tokens)
        size = requested_size(settings, body.get("model"))
        conversation = await run_in_threadpool(decode_conversation, chat.messages, settings.media)
        pieces = worker.stream(lambda: chat_reply(model, tokenizer, prompt_caches[size], conversation, chat, size))
        reply_id = shapes.completion_id()
        if not chat.stream:
            reply = await _unless_client_leaves(request, _whole_reply(pieces))
            if reply is None:
                return Response(status_code=499)  # nobody is there to read it
            text, last = reply
            _summarise(request, last)
            return JSONResponse(shapes.completion(reply_id, settings.model_id, text, last.finish_reason, _usage(last)))
        try:
            first = await anext(pieces)  # errors before the first token answer as errors, not as a stream
        except StopAsyncIteration:
            first = Piece("", "stop")
        return EventStream(_events(request, chat, reply_id, first, pieces))

    async def _events(request: Request, chat: ChatRequest, reply_id: str, piece: Piece, pieces):
        model_id = settings.model_id
        try:
            yield shapes.chunk(reply_id, model_id, {"role": "assistant", "content": ""})
            while True:
                if piece.text:
                    yield shapes.chunk(reply_id, model_id, {"content": piece.text})
                if piece.finish_reason:
                    break
                piece = await anext(pieces)
            yield shapes.chunk(reply_id, model_id, {}, piece.finish_reason)
            if chat.include_usage:
                yield shapes.chunk(reply_id, model_id, {}, usage=_usage(piece), with_choice=False)
            yield shapes.DONE
            _summarise(request, piece)
        finally:
            await pieces.aclose()

    async def audio(request: Request, task: str):
        form = await request.form(max_part_size=settings.max_body_bytes)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError("'file' is required: send the recording as a multipart file field.", param="file")
        response_format = form.get("response_format") or "json"
        if response_format not in TRANSCRIPTION_FORMATS:
            raise RequestError(f"'response_format' must be one of {', '.join(TRANSCRIPTION_FORMATS)}.",
                               param="response_format")
        try:
            temperature = float(form.get("temperature") or 0.0)
        except ValueError:
            raise RequestError("'temperature' must be a number.", param="temperature") from None
        if not 0.0 <= temperature <= 2.0:
            raise RequestError("'temperature' must be at least 0 and at most 2.", param="temperature")
        language = form.get("language") or None
        language = LANGUAGES.get(language.lower(), language) if language else None
        prompt = form.get("prompt") or None
        if prompt is not None and not isinstance(prompt, str):
            raise RequestError("'prompt' must be text.", param="prompt")
        size = requested_size(settings, form.get("model") if isinstance(form.get("model"), str) else None)
        samples = await run_in_threadpool(as_samples, await upload.read())
        sampling = SamplingOptions(temperature=temperature) if temperature else SamplingOptions(temperature=0.0)
        result = await worker.call(lambda: transcribe(
            model, tokenizer, samples, language=language, prompt=prompt, sampling=sampling,
            max_tokens_per_clip=settings.max_tokens_per_clip,
            translate_to="English" if task == "translate" else None, submodel=size,
        ))
        request.state.summary = f"{result.duration:.1f} s of audio in {len(result.segments)} clips"
        if response_format == "json":
            return JSONResponse({"text": result.text})
        if response_format == "verbose_json":
            return JSONResponse(shapes.verbose_json(result, task))
        text = {"text": result.text, "srt": result.to_srt(), "vtt": shapes.to_vtt(result)}[response_format]
        return PlainTextResponse(text)

    async def transcriptions(request: Request):
        return await audio(request, "transcribe")

    async def translations(request: Request):
        return await audio(request, "translate")

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", list_models),
            Route("/v1/models/{name:path}", get_model),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
            Route("/v1/audio/translations", translations, methods=["POST"]),
        ],
        middleware=[
            Middleware(AccessLog),
            Middleware(RequireKey, api_key=settings.api_key),
            Middleware(BodyLimit, max_bytes=settings.max_body_bytes),
        ],
        exception_handlers={
            HTTPException: _http_error, RequestError: _request_error, InputError: _input_error,
            ValueError: _input_error, Exception: _server_error,
        },
        lifespan=lifespan,
    )
    app.state.worker, app.state.prompt_caches, app.state.settings = worker, prompt_caches, settings
    return app


async def _whole_reply(pieces) -> tuple[str, Piece]:
    """The reply's text and its last piece (which says why it ended)."""
    texts, last = [], Piece("", "stop")
    async for last in pieces:
        texts.append(last.text)
    return "".join(texts), last


async def _unless_client_leaves(request: Request, work):
    """What `work` returns, or None if the client disconnects first: `work` is then cancelled,
    and with it the generation it awaits (a streamed reply notices a departure when it next
    writes; a whole reply writes nothing until the end, so the connection is watched)."""
    async def departure():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(departure())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()


def _usage(piece: Piece) -> dict:
    return shapes.usage(piece.prompt_tokens, piece.completion_tokens, piece.cached_tokens)


def _summarise(request: Request, piece: Piece) -> None:
    request.state.summary = (f"prompt {piece.prompt_tokens} tokens ({piece.cached_tokens} cached), "
                             f"reply {piece.completion_tokens} tokens, {piece.finish_reason}")


async def _http_error(request: Request, e: HTTPException):
    return JSONResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)


async def _request_error(request: Request, e: RequestError):
    return JSONResponse(error_body(str(e), param=e.param, code=e.code), status_code=e.status)


async def _input_error(request: Request, e: ValueError):
    code = "context_length_exceeded" if isinstance(e, PromptTooLong) else None
    return JSONResponse(error_body(str(e), param="messages" if code else None, code=code), status_code=400)


async def _server_error(request: Request, e: Exception):
    log.exception("request failed", exc_info=e)
    return JSONResponse(error_body("The server failed on this request; its log says why.", kind="server_error"),
                        status_code=500)
