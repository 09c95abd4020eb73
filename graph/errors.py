"""One error mechanism for every endpoint, in the shape of the API a route belongs to.

Routes raise ``APIError`` (or pydantic's and Starlette's own errors); the handlers here answer them in
lorafleet's shape, ``{"error": {"code", "message", "field"}}``, except on the OpenAI Images API's routes
(``/v1/images/...``), where the same error is translated into OpenAI's shape at the edge
(``error_body``)::

    {"error": {"message": "n must be in [1, 8], got 9", "type": "invalid_request_error",
               "param": "n", "code": "invalid_value"}}

Field paths have one spelling everywhere, pydantic's type errors included: ``width``,
``loras[0].scale`` (``field_path``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}


class FieldError(APIError):
    """Bad input in one field of the canonical request (``graph/validation.py``), at its canonical path.

    ``template`` is the message with the fields it mentions left open: ``{field}`` is this field,
    ``{f[image]}`` another one; ``values`` fill in the rest, so text a client sent is never read as a
    template. Rendered with canonical names it is ``message``; an API front end renders it with its
    own names (``FieldNames.translate``)::

        FieldError(422, "invalid_value", "guidance_scale", "{field} must be in [0, {high}], got {value}",
                   high=30.0, value=99.0)
        # .message: "guidance_scale must be in [0, 30.0], got 99.0"; A1111: "cfg_scale must be ..."
    """

    def __init__(self, status: int, code: str, field: str, template: str, **values):
        self.template = template
        self.values = values
        super().__init__(status, code, template.format(field=field, f=_Names(_same), **values), field)

    def render(self, name: Callable[[str], str]) -> str:
        """The message, each field mentioned as ``name(canonical path)``."""
        return self.template.format(field=name(self.field), f=_Names(name), **self.values)


def _same(path: str) -> str:
    return path


class _Names:
    """``{f[image]}`` in a template: the field ``image`` as the front end calls it."""

    def __init__(self, name: Callable[[str], str]):
        self.name = name

    def __getitem__(self, path: str) -> str:
        return self.name(path)


def field_path(parts: Iterable[str | int]) -> str | None:
    """The one spelling of a field path: ``("loras", 0, "scale")`` -> ``"loras[0].scale"``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or None


# On every response (graph/edge.py adds them; error bodies carry them themselves, since the 500s of
# unexpected exceptions are sent from outside the middleware stack).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}


# The OpenAI Images API's routes (paths relative to the app's root): their errors take OpenAI's shape.
OPENAI_PREFIX = "/v1/images/"
# OpenAI's error ``type`` by status; every other 4xx is an ``invalid_request_error``, every 5xx a ``server_error``.
OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def openai_type(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status: ``422 -> "invalid_request_error"``, ``503 -> "server_error"``."""
    return OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def is_openai_path(path: str) -> bool:
    """``path`` (relative to the app's root, ``app_path``) is one of the OpenAI Images API's routes."""
    return path.startswith(OPENAI_PREFIX)


def app_path(scope) -> str:
    """The request's path without the app's route prefix (``root_path``): ``/sdxl/v1/x`` -> ``/v1/x``."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


def error_body(status: int, code: str, message: str, field: str | None, openai: bool = False) -> dict:
    """The error's JSON body: lorafleet's shape, or OpenAI's (``param`` is the field, ``type`` from the status)."""
    message = one_line(message)
    if openai:
        return {"error": {"message": message, "type": openai_type(status), "param": field, "code": code}}
    return {"error": {"code": code, "message": message, "field": field}}


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers=None, path: str = ""
) -> JSONResponse:
    """The one error answer; ``path`` (relative to the app's root) picks the shape: OpenAI's on ``/v1/images/``."""
    return JSONResponse(
        error_body(status, code, message, field, openai=is_openai_path(path)),
        status_code=status,
        headers={**SECURITY_HEADERS, **(headers or {})},
    )


def _answer(request: Request, status: int, code: str, message: str, field: str | None = None, headers=None):
    return error_response(status, code, message, field, headers, path=app_path(request.scope))


def _field(loc: tuple) -> str | None:
    """A pydantic error's ``loc`` without where FastAPI read it from (``body``, ``query``, ...)."""
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    return field_path(loc)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _answer(request, exc.status, exc.code, exc.message, exc.field, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return _answer(request, 400, "invalid_json", f"request body is not valid JSON: {first.get('msg')}", None)
    field = _field(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        return _answer(request, 422, "missing_field", f"{field} is required", field)
    if first.get("type") == "extra_forbidden":
        return _answer(request, 422, "unknown_field", f"unknown field {field}", field)
    if first.get("type") == "model_attributes_type":
        return _answer(request, 400, "invalid_body", "request body must be a JSON object", None)
    return _answer(request, 422, "invalid_value", f"{field or 'request body'}: {first.get('msg')}", field)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body" and exc.__cause__ is not None:
        return _unparsable_body(request, exc.__cause__)
    code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
        exc.status_code, "http_error"
    )
    return _answer(request, exc.status_code, code, str(exc.detail), None, getattr(exc, "headers", None))


def _unparsable_body(request: Request, cause: BaseException) -> JSONResponse:
    """A body FastAPI could not parse, for a reason other than a JSON syntax error: nesting deeper than the
    parser's recursion limit, bytes that are not UTF-8 (JSON), a malformed multipart form."""
    if "json" in request.headers.get("content-type", "") or not request.headers.get("content-type"):
        reason = {RecursionError: "it is nested too deeply", UnicodeDecodeError: "it is not UTF-8"}.get(
            type(cause), "it could not be parsed"
        )
        return _answer(request, 400, "invalid_json", f"request body is not valid JSON: {reason}", None)
    return _answer(request, 400, "invalid_body", "request body could not be parsed as a form", None)


async def _registry_error(request: Request, exc) -> JSONResponse:
    if exc.status >= 500:  # the store's own words name buckets, endpoints and addresses: logged only
        logger.warning("[%s] store error: %s", request_id(request), exc.message)
        message = "the server's storage (adapter registry, job records) is unavailable; retry later"
        return _answer(request, exc.status, exc.code, message, None, {"Retry-After": "5"})
    message = exc.message + (f" (keys: {', '.join(exc.keys)})" if exc.keys else "")
    return _answer(request, exc.status, exc.code, message, None)


MAX_MESSAGE_CHARS = 300
_REQUEST_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def request_id(request: Request) -> str:
    """The request's id (Serve's proxy sets ``x-request-id``), kept to a safe charset and length."""
    raw = request.headers.get("x-request-id", "")
    clean = "".join(c for c in raw[:64] if c in _REQUEST_ID_OK)
    return clean or "-"


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message clients see: one line, at most ``limit`` characters (long values are cut, not echoed)."""
    line = " ".join(message.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    rid = request_id(request)
    logger.error("internal error in request %s (%s %s)", rid, request.method, request.url.path, exc_info=exc)
    message = f"internal error (request id {rid}); the server log has the details"
    return _answer(request, 500, "internal_error", message, None)


def install(app) -> None:
    from lora_registry.errors import RegistryError

    app.add_exception_handler(Exception, _internal_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RegistryError, _registry_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
