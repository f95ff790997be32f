"""Errors in OpenAI's shape, and the handlers that make every failure one.

Every error the HTTP API returns is JSON of the form::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

Status codes follow vLLM, types follow OpenAI's lowercase strings:

| status | type                          | code                       | when                              |
| ------ | ----------------------------- | -------------------------- | --------------------------------- |
| 400    | ``invalid_request_error``     | None or a specific code    | any invalid request (and 422s)    |
| 404    | ``not_found_error``           | ``unknown_url`` / caller's | unknown path or model             |
| 405    | ``invalid_request_error``     | ``method_not_allowed``     | wrong method (``Allow`` kept)     |
| 413    | ``invalid_request_error``     | ``request_too_large``      | body over the size limit          |
| 415    | ``invalid_request_error``     | ``unsupported_media_type`` | Content-Type is not JSON          |
| 503    | ``service_unavailable_error`` | ``overloaded``             | queue full (``Retry-After`` set)  |
| 503    | ``service_unavailable_error`` | ``stages_unavailable``     | a stage failed to load, is still  |
|        |                               |                            | starting or has no replica        |
| 500    | ``internal_server_error``     | None                       | a bug: no traceback leaves        |

405 and 415 keep OpenAI's ``invalid_request_error`` type (the client did something
wrong) and say what exactly in ``code``.
"""

from __future__ import annotations

import http
import json
from typing import Any, Mapping, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
SERVICE_UNAVAILABLE = "service_unavailable_error"
INTERNAL = "internal_server_error"

# 32 MiB holds a batch of 128 prompts of 32k token ids written as JSON; anything
# larger is a mistake or an attack, and we refuse it before buffering all of it.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024

_TYPE_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    404: NOT_FOUND,
    429: "rate_limit_error",
    503: SERVICE_UNAVAILABLE,
}
_CODE_BY_STATUS = {
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}
# Where a parameter lives is noise to a client; only the field path is useful.
_LOC_PREFIXES = ("body", "query", "path", "header", "cookie")


class APIError(Exception):
    """An error to be answered with OpenAI's error object.

    Args:
        status_code: HTTP status.
        message: A sentence for a human.
        type: OpenAI's error type string, e.g. ``invalid_request_error``.
        param: The offending request field (dotted path), if any.
        code: A machine-readable code, if any.
        headers: Extra response headers (``Retry-After``, ``Allow``).
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        """Returns the body, ``{"error": {...}}``."""
        return error_body(self.message, self.type, self.param, self.code)

    def to_response(self) -> JSONResponse:
        """Returns the error as a JSON response."""
        return error_response(
            self.status_code, self.message, self.type, self.param, self.code, self.headers
        )


class BadRequest(APIError):
    """400 ``invalid_request_error``: the request is invalid."""

    def __init__(
        self, message: str, param: Optional[str] = None, code: Optional[str] = None
    ) -> None:
        super().__init__(400, message, INVALID_REQUEST, param, code)


class NotFound(APIError):
    """404 ``not_found_error``: unknown model (use ``code="model_not_found"``) or path."""

    def __init__(
        self, message: str, param: Optional[str] = None, code: Optional[str] = None
    ) -> None:
        super().__init__(404, message, NOT_FOUND, param, code)


class Overloaded(APIError):
    """503 ``service_unavailable_error`` with code ``overloaded`` and ``Retry-After``.

    Args:
        message: What is full, e.g. "The request queue is full (256 waiting)".
        retry_after: Seconds the client should wait before retrying (at least 1).
    """

    def __init__(self, message: str, retry_after: int) -> None:
        seconds = max(1, int(retry_after))
        super().__init__(
            503, message, SERVICE_UNAVAILABLE, code="overloaded",
            headers={"Retry-After": str(seconds)},
        )
        self.retry_after = seconds


class Unavailable(APIError):
    """503 ``service_unavailable_error`` with code ``stages_unavailable`` and ``Retry-After``:
    a stage cannot serve (failed to load, starting, missing); the message names it and why."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(503, message, SERVICE_UNAVAILABLE, code="stages_unavailable",
                         headers={"Retry-After": str(max(1, int(retry_after)))})


def error_body(
    message: str, type: str, param: Optional[str] = None, code: Optional[str] = None
) -> dict[str, Any]:
    """Builds OpenAI's error object.

    Args:
        message: A sentence for a human.
        type: OpenAI's error type string.
        param: The offending field, if any.
        code: A machine-readable code, if any.

    Returns:
        ``{"error": {"message", "type", "param", "code"}}``.
    """
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type: str,
    param: Optional[str] = None,
    code: Optional[str] = None,
    headers: Optional[Mapping[str, str]] = None,
) -> JSONResponse:
    """Builds a JSON response carrying OpenAI's error object.

    Args:
        status: HTTP status.
        message: A sentence for a human.
        type: OpenAI's error type string.
        param: The offending field, if any.
        code: A machine-readable code, if any.
        headers: Extra response headers.

    Returns:
        The response.
    """
    return JSONResponse(
        error_body(message, type, param, code), status_code=status, headers=dict(headers or {})
    )


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bad_request_from_errors(errors: Sequence[Mapping[str, Any]]) -> BadRequest:
    """Turns pydantic's error list into one readable 400.

    Args:
        errors: ``ValidationError.errors()`` or ``RequestValidationError.errors()``.

    Returns:
        A BadRequest whose param is the first offending field's dotted path and whose
        message lists every problem, e.g. ``max_tokens: Input should be greater than
        or equal to 0 (got -1)``.
    """
    parts, params = [], []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in _LOC_PREFIXES:
            loc = loc[1:]
        if err.get("type") == "json_invalid":  # FastAPI puts the byte offset in loc
            loc = []
        field = ".".join(loc)
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        kind, value = err.get("type", ""), err.get("input")
        if kind not in ("missing", "value_error") and not isinstance(value, (dict, list)):
            msg += f" (got {_short_repr(value)})"
        parts.append(f"{field}: {msg}" if field and not msg.startswith(field) else msg)
        params.append(field or None)
    if not parts:
        return BadRequest("Invalid request")
    return BadRequest("; ".join(parts), param=params[0])


async def parse_json_body(
    request: Request,
    model: type[BaseModel],
    max_body_bytes: Optional[int] = DEFAULT_MAX_BODY_BYTES,
) -> BaseModel:
    """Reads, decodes and validates a JSON request body.

    Args:
        request: The incoming request.
        model: The pydantic model to validate the body against.
        max_body_bytes: Larger bodies get a 413; None for no limit.

    Returns:
        An instance of ``model``.

    Raises:
        APIError: 415 when the Content-Type is not ``application/json`` (charset, if
            given, must be UTF-8); 413 for a body over the limit; 400 for an empty
            body, invalid UTF-8, invalid JSON, a body that is not an object, or a
            body that fails validation.
    """
    _check_content_type(request.headers.get("content-type"))
    body = await _read_body(request, max_body_bytes)
    if not body.strip():
        raise BadRequest("Request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(
            f"Request body is not valid UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:
        # Non-standard constants, integers past Python's digit limit, deep nesting.
        raise BadRequest(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"Request body must be a JSON object, got {_json_kind(data)}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise bad_request_from_errors(exc.errors(include_url=False)) from None


def _check_content_type(header: Optional[str]) -> None:
    media, _, params = (header or "").partition(";")
    if media.strip().lower() != "application/json":
        got = f"'{header}'" if header else "none"
        raise APIError(
            415, f"Content-Type must be application/json (got {got})", INVALID_REQUEST,
            code=_CODE_BY_STATUS[415],
        )
    for param in params.split(";"):
        key, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if key.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            raise APIError(
                415, f"JSON must be UTF-8 (got charset={charset})", INVALID_REQUEST,
                code=_CODE_BY_STATUS[415],
            )


async def _read_body(request: Request, max_body_bytes: Optional[int]) -> bytes:
    too_large = APIError(
        413, f"Request body exceeds {max_body_bytes} bytes", INVALID_REQUEST,
        code=_CODE_BY_STATUS[413],
    )
    declared = request.headers.get("content-length", "")
    if max_body_bytes is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if max_body_bytes is not None and size > max_body_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def install_error_handlers(app: FastAPI) -> None:
    """Makes every failure of ``app`` answer with OpenAI's error object.

    APIError keeps its status; validation errors (FastAPI's 422 included) become 400
    ``invalid_request_error`` naming the field; Starlette's HTTP errors keep their
    status (404 unknown path, 405 wrong method with its ``Allow`` header); anything
    else is a 500 ``internal_server_error`` whose traceback goes to the log only.

    Args:
        app: The FastAPI application.
    """
    app.add_exception_handler(APIError, _handle_api_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(ValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    app.add_exception_handler(Exception, _handle_unexpected)


async def _handle_api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.to_response()


async def _handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors(include_url=False) if isinstance(exc, ValidationError) else exc.errors()
    return bad_request_from_errors(errors).to_response()


async def _handle_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = 400 if exc.status_code == 422 else exc.status_code
    error_type = _TYPE_BY_STATUS.get(status, INTERNAL if status >= 500 else INVALID_REQUEST)
    code = _CODE_BY_STATUS.get(status)
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
    default_phrase = _phrase(exc.status_code)
    where = f"{request.method} {request.url.path}"
    if status == 404 and message == default_phrase:
        message, code = f"Invalid URL ({where})", "unknown_url"
    elif status == 405 and message == default_phrase:
        allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
        message = f"Method not allowed ({where})" + (f"; allowed: {allowed}" if allowed else "")
    return error_response(status, message, error_type, code=code, headers=exc.headers)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises after this response is sent, so the server logs the
    # traceback; the client sees only a generic message.
    return error_response(500, "Internal server error", INTERNAL)
