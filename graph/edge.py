"""What the ingress decides before a route reads the body: size caps, the admin token, security headers.

Two ASGI middlewares around the FastAPI app (``graph/ingress.py`` installs them):

- ``EdgeLimits``: each request's body cap comes from its route (``EdgePolicy.body_limit``). A declared
  ``Content-Length`` over the cap is a 413 before a byte is read; a body without one (chunked) is counted
  as it streams in and refused with a 413 as soon as it passes the cap, so nothing reads, buffers or
  parses more than the cap. ``POST /v1/adapters`` checks the admin token from the headers first: a
  request without a valid one gets its 401/403 and the upload is never read.
- ``SecurityHeaders``: ``X-Content-Type-Options``, ``X-Frame-Options``, ``Referrer-Policy`` and a
  Content-Security-Policy on every response: the page's allows only this origin, the API's allows
  nothing. (Error bodies carry them too: ``errors.error_response``, for the 500s answered outside
  the middleware stack.)

>>> from graph.config import LimitsConfig
>>> policy = EdgePolicy(limits=LimitsConfig(), upload_bytes=513 << 20, admin_check=lambda headers: None)
>>> policy.body_limit("POST", "/v1/img2img")
(48000000, 'limits.max_image_body_bytes')
>>> policy.body_limit("POST", "/v1/generate")   # with style_images=True (a model has ip_adapter): the image cap
(1048576, 'limits.max_body_bytes')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import SECURITY_HEADERS, APIError, error_response

# Routes whose bodies carry base64 images (and masks): they get limits.max_image_body_bytes.
IMAGE_ROUTES = frozenset({"/v1/img2img", "/v1/inpaint", "/v1/jobs", "/sdapi/v1/img2img", "/v1/images/edits"})
UPLOAD_ROUTE = "/v1/adapters"
# Text-to-image routes that carry a style image (IP-Adapter, issue 22) where a served model has one: they get
# limits.max_image_body_bytes then (EdgePolicy.style_images), else limits.max_body_bytes.
STYLE_ROUTES = frozenset({"/v1/generate", "/sdapi/v1/txt2img", "/v1/images/generations"})
BODY_ROUTES = IMAGE_ROUTES | STYLE_ROUTES | {UPLOAD_ROUTE}

# The page (graph/static): its own scripts, styles and images only; images from data:/blob: URLs are the
# gallery's and the inpainting canvas'. Nothing inline, no framing, no plugins, no other origin.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# FastAPI's /docs and /redoc load Swagger UI / ReDoc from a CDN with inline scripts: no CSP there.
_NO_CSP_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})


class BodyTooLarge(HTTPException):
    """Raised from the counted ``receive`` once a body passes its cap: FastAPI's ``HTTPException``, which its
    body parsing lets through (any other exception there becomes a 400); answered 413 by ``errors``."""

    def __init__(self, method: str, route: str, limit: int, setting: str):
        self.limit = limit
        self.setting = setting
        super().__init__(413, f"request body is larger than {limit} bytes, the limit for {method} {route} ({setting})")


@dataclass(frozen=True)
class EdgePolicy:
    """One replica's edge rules, from its config (``Ingress.__init__``)."""

    limits: object  # graph.config.LimitsConfig
    upload_bytes: int  # AppConfig.upload_limit_bytes()
    admin_check: Callable[[Headers], APIError | None]  # None: the headers carry a valid admin token
    record_body: Callable[[str, int], None] = field(default=lambda route, nbytes: None)  # bytes read
    count_refusal: Callable[[str, int], None] = field(default=lambda route, status: None)  # refused unread
    style_images: bool = False  # a served model takes style_image: STYLE_ROUTES carry an image too

    def body_limit(self, method: str, route: str) -> tuple[int, str]:
        """The cap on ``method route``'s body, in bytes, and the setting that sets it."""
        if route == UPLOAD_ROUTE and method == "POST":
            return self.upload_bytes, "limits.max_upload_bytes"
        if route in IMAGE_ROUTES or (self.style_images and route in STYLE_ROUTES):
            return self.limits.max_image_body_bytes, "limits.max_image_body_bytes"
        return self.limits.max_body_bytes, "limits.max_body_bytes"

    def needs_admin_before_body(self, method: str, route: str) -> bool:
        return method == "POST" and route == UPLOAD_ROUTE


class EdgeLimits:
    """Body caps and the admin token, before the route reads the body (see the module docstring).

    ``policy()`` gives the replica's ``EdgePolicy`` (``None`` before the replica is built: no checks).
    Its refusals are counted through ``EdgePolicy.count_refusal`` (it sits outside the request metric).
    """

    def __init__(self, app: ASGIApp, *, policy: Callable[[], EdgePolicy | None]):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (policy := self.policy()) is None:
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        path = _route_path(scope)
        route = path if path in BODY_ROUTES else "unmatched"  # every route with a body has a fixed path
        headers = Headers(scope=scope)
        limit, setting = policy.body_limit(method, route)

        async def refuse(problem: APIError) -> None:
            policy.count_refusal(route, problem.status)
            response = error_response(problem.status, problem.code, problem.message, None, problem.headers, path)
            await response(scope, receive, send)

        if policy.needs_admin_before_body(method, route) and (problem := policy.admin_check(headers)):
            await refuse(problem)
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
            await refuse(APIError(413, "body_too_large", BodyTooLarge(method, route, limit, setting).detail))
            return

        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(method, route, limit, setting)
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            policy.record_body(route, received)


class SecurityHeaders:
    """The security headers on every response the app sends (those it already has are kept)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = security_headers(_route_path(scope))

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                added = [
                    (k.lower().encode(), v.encode()) for k, v in extra.items() if k.lower().encode() not in present
                ]
                message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        await self.app(scope, receive, with_headers)


def security_headers(path: str) -> dict[str, str]:
    """The headers for a response to ``path`` (relative to the app's root)."""
    headers = dict(SECURITY_HEADERS)  # the API's: nosniff, DENY, no-referrer, CSP default-src 'none'
    if path == "/" or path.startswith("/static/"):
        headers["Content-Security-Policy"] = PAGE_CSP
    elif path in _NO_CSP_PATHS:
        del headers["Content-Security-Policy"]
    return headers


def _route_path(scope: Scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path
