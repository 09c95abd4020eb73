"""The native generation routes take ``multipart/form-data`` as well as JSON: files as files.

``POST /v1/generate``, ``/v1/img2img``, ``/v1/inpaint`` and ``/v1/jobs`` read a form of one text field
``request`` (the JSON body, as it would be sent alone) and file parts ``image``, ``mask`` and ``style_image``::

    curl -F 'request={"prompt": "a lighthouse", "style_scale": 0.6}' -F style_image=@reference.jpg \\
         http://127.0.0.1:8000/v1/generate

``MultipartBodies`` (an ASGI middleware inside ``edge.EdgeLimits``, so the route's body cap counts the form's
bytes) turns such a form into that JSON body, each file base64-encoded into its field, and hands it to the
route: from there on it is the JSON request, checked by the same planner (so a file that is not an image, too
large or a bomb gets the same 422 naming ``style_image``). A file part may also be a text field holding base64
or a data URL. The form itself gets one-line 422s: no ``request``, ``request`` not a JSON object, a field given
twice (in ``request`` and as a part), an unknown part.
"""

from __future__ import annotations

import base64
import json

from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .edge import BodyTooLarge, _route_path
from .errors import APIError, error_response

NATIVE_ROUTES = frozenset({"/v1/generate", "/v1/img2img", "/v1/inpaint", "/v1/jobs"})
FILE_FIELDS = ("image", "mask", "style_image")


def _invalid(message: str, field: str | None) -> APIError:
    return APIError(422, "invalid_value", message, field)


async def form_to_json(request: Request) -> bytes:
    """The form's JSON body: ``request``'s object with each file part base64-encoded into its field."""
    try:
        form = await request.form(max_files=len(FILE_FIELDS), max_fields=len(FILE_FIELDS) + 1)
    except BodyTooLarge:
        raise
    except Exception as e:  # noqa: BLE001 - starlette's parser errors: a malformed form
        detail = getattr(e, "detail", None) or str(e) or type(e).__name__
        raise _invalid(f"the multipart body does not parse: {str(detail).splitlines()[0][:200]}", None) from None
    unknown = sorted(set(form.keys()) - {"request", *FILE_FIELDS})
    if unknown:
        raise _invalid(
            f"{unknown[0]} is not a part of this form: send 'request' (the JSON body) and files "
            f"{', '.join(FILE_FIELDS)}",
            unknown[0],
        )
    for name in form.keys():
        if len(form.getlist(name)) > 1:
            raise _invalid(f"{name} is given more than once in the form", name)
    text = form.get("request")
    if text is None:
        raise _invalid('a multipart body needs a \'request\' field: the JSON body, e.g. {"prompt": "..."}', "request")
    if isinstance(text, UploadFile):
        text = (await text.read()).decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError as e:
        raise _invalid(f"request is not JSON: {e.msg} at character {e.pos}", "request") from None
    if not isinstance(body, dict):
        raise _invalid("request must be a JSON object", "request")
    for name in FILE_FIELDS:
        part = form.get(name)
        if part is None:
            continue
        if name in body:
            raise _invalid(f"{name} is given twice: in request and as a part of the form", name)
        body[name] = base64.b64encode(await part.read()).decode() if isinstance(part, UploadFile) else part
    return json.dumps(body).encode()


class MultipartBodies:
    """``multipart/form-data`` on ``NATIVE_ROUTES`` becomes the JSON body (see the module docstring)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or _route_path(scope) not in NATIVE_ROUTES:
            await self.app(scope, receive, send)
            return
        if not Headers(scope=scope).get("content-type", "").lower().startswith("multipart/form-data"):
            await self.app(scope, receive, send)
            return
        try:
            raw = await form_to_json(Request(scope, receive))
        except (APIError, BodyTooLarge) as e:
            status, code, message, field = (
                (413, "body_too_large", e.detail, None)
                if isinstance(e, BodyTooLarge)
                else (e.status, e.code, e.message, e.field)
            )
            await error_response(status, code, message, field, path=_route_path(scope))(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()  # after the body: the client's disconnect, when it comes

        await self.app({**scope, "headers": headers}, replay, send)
