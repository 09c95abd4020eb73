"""One error shape for every endpoint: ``{"error": {"code", "message", "field"}}``."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, field: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "field": field}}, status_code=status, headers=headers
    )


def _field(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return error_response(400, "invalid_json", f"request body is not valid JSON: {first.get('msg')}", None)
    field = _field(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        return error_response(422, "missing_field", f"{field} is required", field)
    if first.get("type") == "extra_forbidden":
        return error_response(422, "unknown_field", f"unknown field {field}", field)
    if first.get("type") == "model_attributes_type":
        return error_response(400, "invalid_body", "request body must be a JSON object", None)
    return error_response(422, "invalid_value", f"{field}: {first.get('msg')}", field)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), None, getattr(exc, "headers", None))


async def _registry_error(request: Request, exc) -> JSONResponse:
    message = exc.message + (f" (keys: {', '.join(exc.keys)})" if exc.keys else "")
    response = error_response(exc.status, exc.code, message, None)
    return response


def install(app) -> None:
    from lora_registry.errors import RegistryError

    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RegistryError, _registry_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
