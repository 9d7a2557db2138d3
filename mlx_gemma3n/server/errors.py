"""Errors a request can cause, with the HTTP status and the OpenAI error fields they answer with."""

from __future__ import annotations

from ..errors import InputError


class RequestError(InputError):
    """A request the server cannot serve as sent; the message says what to change."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(message: str, *, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
