"""Error responses of the API: one JSON shape, ``{"error": {"code", "message", "details"}}``, for every
failure -- our own refusals, FastAPI's validation errors, unknown routes -- plus the request body limit.

A client therefore handles one document type; ``details`` carries what a program needs (the workflow
``Problem`` list, gate numbers, the limit that was exceeded).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forgeline.errors import ForgelineError

log = logging.getLogger("forgeline.api")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="Stable machine-readable code, e.g. `invalid_workflow`, `forbidden`.")
    message: str = Field(description="What is wrong and how to fix it.")
    details: Any = Field(default=None, description="Structured context (problems, gate results, limits).")


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail = Field(description="The error.")


class ApiError(ForgelineError):
    """Raised by routes; rendered as an :class:`ErrorBody` with ``status``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, details=details))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


# Every documented error status uses the same body; routes add their own ones via `responses=`.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or unknown bearer token."},
    403: {"model": ErrorBody, "description": "The token lacks the scope this route needs."},
    404: {"model": ErrorBody, "description": "No such run, stage, model or submission."},
    413: {"model": ErrorBody, "description": "Request body over the limit."},
    422: {"model": ErrorBody, "description": "Invalid request."},
}

_STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def forgeline_status(exc: ForgelineError) -> tuple[int, str, Any]:
    """(HTTP status, code, details) for a platform error, by its place in the tree."""
    from forgeline.artifacts import PathEscapeError, UriError
    from forgeline.runtime import NotCancellableHere, RunNotFound
    from forgeline.runtime.context import GateFailed, OperatorError
    from forgeline.spec import WorkflowError

    if isinstance(exc, WorkflowError):
        from forgeline.api._submit import problem_json

        return 422, "invalid_workflow", [problem_json(p) for p in exc.problems]
    if isinstance(exc, RunNotFound):
        return 404, "not_found", None
    if isinstance(exc, NotCancellableHere):
        return 409, "not_cancellable_here", None
    if isinstance(exc, UriError | PathEscapeError):
        return 422, "invalid_uri", None
    if isinstance(exc, GateFailed):
        return 409, "gate_failed", exc.metrics
    if isinstance(exc, OperatorError):
        return 422, "operator_error", None
    return 400, "bad_request", None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        text = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
        return error_response(422, "invalid_request", f"invalid request: {text}", problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return error_response(exc.status_code, code, str(exc.detail), None, dict(exc.headers or {}))

    @app.exception_handler(ForgelineError)
    async def _forgeline(request: Request, exc: ForgelineError) -> JSONResponse:
        # A platform error no route turned into an ApiError: its message is written for the user.
        if isinstance(exc, ApiError):
            return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
        status, code, details = forgeline_status(exc)
        return error_response(status, code, str(exc), details)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server log, never to the client.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", f"internal error ({type(exc).__name__}); see the server log")


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413: by Content-Length up front, and by counting
    while streaming (a chunked body has no length to check first)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    await self._refuse(send)
                    return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = ErrorBody(
            error=ErrorDetail(
                code="body_too_large",
                message=f"request body over {self.limit} bytes; send a smaller workflow",
                details={"limit_bytes": self.limit},
            )
        )
        data = json.dumps(body.model_dump(mode="json")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": data})


class _TooLarge(StarletteHTTPException):
    """An HTTPException, so that whichever layer catches it first still answers 413."""

    def __init__(self) -> None:
        super().__init__(413, "request body over the limit; send a smaller body")
