"""OpenAI's error body for every refusal: ``{"error": {"message", "type", "param", "code"}}``.

FastAPI's own refusals (a body that is not JSON, a field of the wrong type) are turned into this
shape with HTTP 400, never its default 422; an unexpected exception becomes a 500 with a one-line
message (logged with its traceback on the server's stderr, never sent to the client)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mixport.errors import INVALID_REQUEST as INVALID
from mixport.errors import ApiError

__all__ = ["INVALID", "ApiError", "bad_request", "body_of", "error_body", "install_handlers", "response"]

log = logging.getLogger("mixport.serve")



def body_of(exc: ApiError) -> dict[str, Any]:
    """OpenAI's error body for ``exc`` (a response's, or a stream's last event)."""
    return error_body(exc.message, exc.kind, exc.param, exc.code)


def response(exc: ApiError) -> JSONResponse:
    """``exc`` as the HTTP answer: its status, OpenAI's error body, its headers (Retry-After)."""
    return JSONResponse(body_of(exc), status_code=exc.status, headers=exc.headers)


def error_body(message: str, kind: str = INVALID, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first pydantic error as one line, and the field it names (``messages.0.role``)."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    if param is None and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return "the request body must be a JSON object", None
    return (f"{param}: {msg}" if param else msg), param


def install_handlers(app: FastAPI) -> None:
    """Every error the app answers has OpenAI's body: ours, FastAPI's validation, Starlette's 404/405."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return response(bad_request(message, param))

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return response(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return response(ApiError(500, f"internal server error: {type(exc).__name__}", kind="server_error"))
