"""ASGI middleware of the server: the API key, the body size cap, one log line per request."""

from __future__ import annotations

import hmac
import json
import logging
import time

from .errors import RequestError, error_body

log = logging.getLogger("mlx_gemma3n.server")


async def _send_error(send, status: int, message: str, code: str | None = None) -> None:
    body = json.dumps(error_body(message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RequireKey:
    """Every /v1 request must carry `Authorization: Bearer KEY`; /health stays open for probes."""

    def __init__(self, app, api_key: str | None):
        self.app, self.expected = app, f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if self.expected is None or scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            return await _send_error(send, 401, "The API key is missing or wrong: send it as 'Authorization: Bearer KEY'.",
                                     "invalid_api_key")
        return await self.app(scope, receive, send)


class BodyTooLarge(RequestError):
    pass


class BodyLimit:
    """Refuses a body over `max_bytes`: at once when Content-Length says so, else as it arrives."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> BodyTooLarge:
        return BodyTooLarge(f"The request body is larger than this server's limit of {self.max_bytes} bytes: "
                            "send less, or start the server with a larger --max-body-mb.", status=413)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, 413, str(self._error()))
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._error()
            return message

        return await self.app(scope, limited, send)


class AccessLog:
    """One line per request once its response is complete: status, time, and what the handler
    noted in `request.state.summary` (tokens, cache hits)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began, status = time.perf_counter(), [0]

        async def noting(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting)
        finally:
            summary = scope.get("state", {}).get("summary", "")
            log.info("%s %s %s %d %.2fs%s", scope["client"][0] if scope.get("client") else "-", scope["method"],
                     scope["path"], status[0], time.perf_counter() - began, f" {summary}" if summary else "")
