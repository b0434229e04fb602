"""The API's one error shape, ``{"error": message, "field": field}``, and the FastAPI handlers
that turn every failure (ours, pydantic's, routing's, unexpected ones) into it."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger("ray.serve")


class ApiError(Exception):
    """A request error answered as ``{"error": message, "field": field}`` with ``status``."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


def error_response(status: int, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON answer of a failed request."""
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def field_of(loc: tuple | list) -> str:
    """The request field a pydantic error location points at ("body" for the body itself)."""
    if len(loc) > 1 and isinstance(loc[1], str):
        return loc[1]
    return str(loc[0]) if loc else "body"


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.field, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors()) or [{"loc": ("body",), "msg": "invalid request"}]
    field = field_of(tuple(errors[0].get("loc", ("body",))))
    # A union (seed or vector) fails once per branch: the deepest location is the one that
    # says what is wrong (e.g. "to.list[...].2: Input should be a finite number").
    same = [e for e in errors if field_of(tuple(e.get("loc", ("body",)))) == field]
    best = max(same, key=lambda e: len(e.get("loc", ())))
    return error_response(422, f"{field}: {best.get('msg', 'invalid value')}", field)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error in %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` in the API's JSON shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
