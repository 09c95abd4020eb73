"""The OpenAI Images API (``POST /v1/images/generations``, ``POST /v1/images/edits``), translated at the edge.

Names in (``to_input``, ``edit_input``): ``n`` -> ``num_images``, ``size: "WxH"`` -> ``width`` / ``height``
(``"auto"``: the model's native size; for edits the image's), ``model: "base:adapter@version"`` ->
``model`` and ``loras[0]`` (the body's own ``loras`` follow it), ``safety_identifier`` (else ``user``)
-> the tenant; an edit's ``image`` and ``mask`` -> the native img2img / inpainting inputs (``mask_from_alpha``);
the rest are native names already. A style reference (IP-Adapter, lorafleet's extension, README "OpenAI"): an
edit's ``style_image`` (a file part, or base64 / a data URL as a text field, so the official client sends it in
``extra_body``) and ``style_scale`` (a number, or per-block scales as JSON text) -> the native fields of those names.
Names out (``FieldNames``): the reverse, so errors name the OpenAI
field, e.g. ``{"param": "n", "message": "n must be in [1, 8], got 9"}`` (the shape: ``errors.error_body``).

How the images go back is a ``Delivery``: ``output_format`` and ``output_compression`` (jpeg / webp
re-encoded here from the graph's lossless PNG), ``response_format`` (``b64_json``, or ``url``: held in
the job store for ``openai.image_url_ttl_s``, ``image_urls``), and ``stream``: Server-Sent Events in
OpenAI's format (``stream``), ``<kind>.partial_image`` for up to ``partial_images`` latent previews, then
one ``<kind>.completed`` per image. Accepted and ignored: ``quality``, ``style``, ``moderation``,
``input_fidelity`` (lorafleet's ``steps`` decide the quality); ``background: "transparent"`` is a 422.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event
from PIL import Image, ImageOps
from pydantic import ValidationError

from deployments.engine.images import encode_image
from deployments.messages import DecodedImages, Preview

from . import job_routes
from .errors import APIError, FieldError, error_body
from .image_decoding import load_image
from .schemas import LoRASpec, OpenAIEditForm, OpenAIImage, OpenAIImagesRequest, OpenAIImagesResponse
from .validation import FieldNames, GenerationInput

logger = logging.getLogger("ray.serve")

GENERATION, EDIT = "image_generation", "image_edit"  # the stream's event types: "<kind>.partial_image"
# OpenAI's event ``quality`` values; a request's other ones ("standard", "hd") are reported as "auto".
EVENT_QUALITIES = frozenset({"low", "medium", "high", "xhigh", "max", "auto"})
PING_S = 15.0  # a keep-alive comment on a stream idle this long (FastAPI's own interval)


@dataclass(frozen=True)
class Delivery:
    """How one OpenAI request's images go back (its fields checked; ``delivery`` builds it)."""

    kind: str  # GENERATION | EDIT
    output_format: str  # png | jpeg | webp: what the client gets
    output_compression: int | None  # jpeg / webp quality; None: the server's encoding
    response_format: str  # b64_json | url
    quality: str  # as asked (reported in stream events)
    stream: bool
    partial_images: int  # with stream: how many previews at most

    @property
    def reencode(self) -> bool:
        """The graph makes lossless PNG and this re-encodes it: a jpeg / webp quality was asked (webp at 100 is
        the graph's own lossless webp)."""
        if self.output_compression is None or self.output_format == "png":
            return False
        return not (self.output_format == "webp" and self.output_compression == 100)

    @property
    def graph_format(self) -> str:
        """The format the VAE stage encodes."""
        return "png" if self.reencode else self.output_format

    def preview_every_steps(self, steps: int) -> int:
        """A preview every this many steps so that at most ``partial_images`` come (0: none).

        >>> Delivery(GENERATION, "png", None, "b64_json", "auto", True, 3).preview_every_steps(10)   # 3, 6, 9
        3
        """
        if not self.stream or self.partial_images == 0:
            return 0
        return math.ceil(steps / (self.partial_images + 1))


def delivery(body: OpenAIImagesRequest | OpenAIEditForm, kind: str) -> Delivery:
    """The request's ``Delivery``; 422 for what lorafleet does not draw (``background: "transparent"``)."""
    if body.background == "transparent":
        raise APIError(
            422,
            "unsupported_value",
            'background "transparent" is not served: the models draw opaque images; use "opaque" or "auto"',
            "background",
        )
    return Delivery(
        kind=kind,
        output_format=body.output_format or "png",
        output_compression=body.output_compression,
        response_format=body.response_format or "b64_json",
        quality=body.quality if body.quality in EVENT_QUALITIES else "auto",
        stream=bool(body.stream),
        partial_images=body.partial_images or 0,
    )


# -- names in ---------------------------------------------------------------------------------------


def to_input(body: OpenAIImagesRequest, tenant: str) -> tuple[GenerationInput, FieldNames]:
    """The native request, and the OpenAI names of its fields for the errors it may get."""
    width, height = parse_size(body.size)
    base, model_loras = parse_openai_model(body.model)
    request = GenerationInput(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        model=base,
        width=width,
        height=height,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        seed=body.seed,
        num_images=body.n,
        scheduler=body.scheduler,
        output_format=delivery(body, GENERATION).graph_format,
        loras=(*model_loras, *body.loras),
        tenant=tenant,
        # IP-Adapter, where the body schema carries them (lorafleet's extension fields, as on edits)
        style_image=getattr(body, "style_image", None),
        style_scale=getattr(body, "style_scale", None),
    )
    return request, _names(len(model_loras), len(body.loras))


def edit_input(
    form: OpenAIEditForm, image: bytes, mask: bytes | None, tenant: str, limits, style: Style | None = None
) -> tuple[GenerationInput, FieldNames]:
    """An edit as the native request: img2img (``strength`` 0.75 by default), or with ``mask`` inpainting
    (1.0) of the mask's transparent part; ``style``: the edit's style reference (``read_edit``). ``limits``: the
    byte and pixel caps of uploads (the mask is read here). Blocking (decodes the mask): run it in a thread."""
    style = style or Style()
    width, height = parse_size(form.size)
    base, model_loras = parse_openai_model(form.model)
    request = GenerationInput(
        prompt=form.prompt,
        negative_prompt=form.negative_prompt,
        model=base,
        width=width,
        height=height,
        steps=form.steps,
        guidance_scale=form.guidance_scale,
        seed=form.seed,
        num_images=form.n,
        scheduler=form.scheduler,
        output_format=delivery(form, EDIT).graph_format,
        loras=tuple(model_loras),
        tenant=tenant,
        image=base64.b64encode(image).decode(),
        mask=None if mask is None else mask_from_alpha(mask, limits),
        strength=form.strength,
        style_image=style.image,
        style_scale=style.scale,
    )
    return request, _names(len(model_loras), 0)


@dataclass(frozen=True)
class Style:
    """An edit's style reference (IP-Adapter): ``image`` base64 (from a file part or a text field), ``scale`` a
    number or per-block scales (their range and blocks: the planner's ``style_inputs`` checks)."""

    image: str | None = None
    scale: float | dict | None = None


STYLE_FIELDS = ("style_image", "style_scale")


def parse_style_scale(text: str) -> float | dict:
    """A form's ``style_scale``: a number (``"0.6"``), or per-block scales as JSON (``'{"up": {"block_0": [0,1,0]}}'``).

    >>> parse_style_scale("0.6"), parse_style_scale('{"up": 1}')
    (0.6, {'up': 1})
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return value
        raise APIError(422, "invalid_value", "style_scale: per-block scales must be a JSON object", "style_scale")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not text.isascii() or not math.isfinite(value):
        raise APIError(
            422,
            "invalid_value",
            f"style_scale must be a number in [0, 2] or per-block scales as a JSON object, got {text[:40]!r}",
            "style_scale",
        )
    return value


# POST /v1/images/edits in OpenAPI: the form's fields (the route reads the form itself, ``read_edit``).
EDIT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "prompt"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP."},
                        "mask": {
                            "type": "string",
                            "format": "binary",
                            "description": "Image-sized, with alpha: fully transparent pixels mark where to edit.",
                        },
                        "style_image": {
                            "type": "string",
                            "format": "binary",
                            "description": "lorafleet's: a reference image whose style the edit takes (IP-Adapter); "
                            "a file, or base64 / a data URL as text. Models with style_image in GET /v1/models.",
                        },
                        "style_scale": {
                            "type": "string",
                            "description": "lorafleet's: how strongly style_image steers, 0 to 2 (default 1.0), or "
                            'per-block scales as JSON, e.g. {"up": {"block_0": [0.0, 1.0, 0.0]}}.',
                        },
                        **OpenAIEditForm.model_json_schema()["properties"],
                    },
                }
            }
        },
    }
}
# One image per edit: the OpenAI client sends one as ``image``, a list as ``image[]``. A style reference is not a
# second ``image[]`` (gpt-image-1 reads several images as references with no role each): it is ``style_image``.
_IMAGE_KEYS = ("image", "image[]")


async def read_edit(request: Request, max_image_bytes: int) -> tuple[OpenAIEditForm, bytes, bytes | None, Style]:
    """The edit's form: its fields (``OpenAIEditForm``: a bad one is a 422 naming it), the image's bytes, the
    mask's (None: img2img) and the style reference (``style_image``: a file part or base64 text; ``style_scale``).
    Each file at most ``max_image_bytes``; the body's cap is the edge's."""
    form = await request.form()
    try:
        fields: dict[str, str] = {}
        images, masks, styles, scales = [], [], [], []
        for key, value in form.multi_items():
            if key == "style_image":
                styles.append(value)
            elif key == "style_scale":
                if not isinstance(value, str):
                    raise APIError(422, "invalid_value", "style_scale must be text, not a file part", key)
                scales.append(value)
            elif key in (*_IMAGE_KEYS, "mask"):
                if isinstance(value, str):
                    raise APIError(422, "invalid_value", f"{key} must be a file part, not text", key.removesuffix("[]"))
                (masks if key == "mask" else images).append(value)
            elif not isinstance(value, str):
                raise APIError(422, "unknown_field", f"unknown file field {key}", key)
            else:
                fields[key] = value
        if not images:
            raise APIError(422, "missing_field", "image is required (a file part)", "image")
        for name, files in (("image", images), ("mask", masks), ("style_image", styles), ("style_scale", scales)):
            if len(files) > 1:
                hint = " (a style reference: send it as style_image)" if name == "image" else ""
                what = "value" if name == "style_scale" else "file"
                raise APIError(422, "invalid_value", f"{name}: one {what} per edit, got {len(files)}{hint}", name)
        try:
            body = OpenAIEditForm.model_validate(fields)
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False)) from e
        image = await _read_file(images[0], "image", max_image_bytes)
        mask = await _read_file(masks[0], "mask", max_image_bytes) if masks else None
        style = Style()
        if styles:
            text = styles[0]
            if not isinstance(text, str):  # a file part; text is base64 or a data URL, decoded by the planner
                text = base64.b64encode(await _read_file(text, "style_image", max_image_bytes)).decode()
            style = Style(image=text)
        if scales:
            style = Style(style.image, parse_style_scale(scales[0]))
        return body, image, mask, style
    finally:
        await form.close()


async def _read_file(upload, field: str, max_bytes: int) -> bytes:
    if upload.size is not None and upload.size > max_bytes:
        raise APIError(422, "invalid_image", f"{field} is {upload.size} bytes; the limit is {max_bytes} bytes", field)
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise APIError(422, "invalid_image", f"{field} is over {max_bytes} bytes, the limit", field)
    if not data:
        raise APIError(422, "invalid_image", f"{field} is empty", field)
    return data


def _names(model_loras: int, body_loras: int) -> FieldNames:
    names = {"num_images": "n", "width": "size", "height": "size"}
    if model_loras:  # loras[0] is the model's adapter; the body's loras[i] is loras[i + 1]
        names["loras[0]"] = "model"
        names.update({f"loras[{i + 1}]": f"loras[{i}]" for i in range(body_loras)})
    return FieldNames(names, messages={"width": _one_side_of_size, "height": _one_side_of_size})


def _one_side_of_size(error: FieldError) -> str:
    return f"size: {error.message}"  # "size: height must be a multiple of 8 in [64, 1024], got 60"


def mask_from_alpha(data: bytes, limits) -> str:
    """An OpenAI mask (fully transparent pixels, alpha 0, mark where to edit) -> lorafleet's inpainting mask
    (white = repaint, black = keep), as base64 PNG.

    The file is checked as every upload is (``load_image``: bytes, format, pixels, a full decode) before its
    alpha channel is read; a mask without one is a 422 (it could mark nothing)."""
    load_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels, field="mask")
    with Image.open(io.BytesIO(data)) as opened:
        image = ImageOps.exif_transpose(opened)  # as load_image orients the image it is compared with
        if "A" not in image.getbands() and "transparency" not in image.info:
            raise FieldError(
                422,
                "invalid_image",
                "mask",
                "{field} must have an alpha channel: its fully transparent pixels (alpha 0) mark where to edit",
            )
        alpha = np.asarray(image.convert("RGBA").getchannel("A"))  # [H, W] uint8
    repaint = np.where(alpha == 0, 255, 0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(repaint, mode="L").convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def parse_openai_model(model: str | None) -> tuple[str | None, list[LoRASpec]]:
    """``"tiny-sd:watercolor@2"`` -> (``"tiny-sd"``, [watercolor v2 at scale 1])."""
    if model is None or ":" not in model:
        return model, []
    base, _, adapter = model.partition(":")
    name, _, version = adapter.partition("@")
    if not name or (version and not (_is_ascii_number(version) and int(version) >= 1)):
        raise APIError(422, "invalid_value", f'model must look like "base:adapter[@version]", got {model!r}', "model")
    return base or None, [LoRASpec(name=name, version=int(version) if version else None)]


def _is_ascii_number(text: str) -> bool:
    """``"64"`` yes; ``"²"``, ``"６４"`` (Unicode digits ``str.isdigit`` accepts, ``int`` may not) and ``""`` no."""
    return text.isascii() and text.isdigit()


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"512x768"`` -> (512, 768); None or ``"auto"`` -> the native size (an edit: the image's)."""
    if size is None or size == "auto":
        return None, None
    w, sep, h = size.lower().partition("x")
    if not sep or not _is_ascii_number(w) or not _is_ascii_number(h):
        raise APIError(
            422, "invalid_value", f'size must look like "512x512", got {size!r} (or "auto": the native size)', "size"
        )
    return int(w), int(h)


# -- images out -------------------------------------------------------------------------------------


def encode_output(images: tuple[bytes, ...], how: Delivery) -> tuple[bytes, ...]:
    """The files the client gets: the graph's own, or its PNGs re-encoded at ``output_compression``."""
    if not how.reencode:
        return images
    return tuple(_reencode(png, how.output_format, how.output_compression) for png in images)


def _reencode(png: bytes, output_format: str, quality: int) -> bytes:
    with Image.open(io.BytesIO(png)) as image:
        pixels = np.asarray(image.convert("RGB"))
    if output_format == "jpeg":
        return encode_image(pixels, "jpeg", quality=quality)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="WEBP", quality=quality)  # lossy below 100
    return buf.getvalue()


def to_response(
    images: tuple[bytes, ...], how: Delivery, size: str, urls: list[str] | None = None
) -> OpenAIImagesResponse:
    """OpenAI's ``ImagesResponse``: each image as ``b64_json``, or as ``url`` (``urls``)."""
    if urls is None:
        data = [OpenAIImage(b64_json=base64.b64encode(d).decode()) for d in images]
    else:
        data = [OpenAIImage(url=url) for url in urls]
    return OpenAIImagesResponse(
        created=int(time.time()), data=data, background="opaque", output_format=how.output_format, size=size
    )


def image_urls(base_url: str, file_id: str, count: int, output_format: str, expires: int) -> list[str]:
    """Where the held images are served (``GET /v1/images/files/{id}/{k}.{format}?expires=``): ``base_url``
    is the app's own (its route prefix included); ``file_id`` the job store's unguessable id (128 random
    bits); ``expires`` (Unix time) only words the 404 of a URL past it, the store decides."""
    root = base_url.rstrip("/")
    return [f"{root}/v1/images/files/{quote(file_id)}/{k}.{output_format}?expires={expires}" for k in range(count)]


def expired(expires: int | None, now: float) -> APIError | None:
    """The 404 of a URL past its ``expires`` time, else None."""
    if expires is None or now < expires:
        return None
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
    return APIError(
        404,
        "image_expired",
        f"this image URL expired at {when}; image URLs serve their image for openai.image_url_ttl_s seconds",
        None,
    )


def not_found() -> APIError:
    return APIError(404, "image_not_found", "no image at this URL: unknown, expired or removed", None)


async def file_response(jobs, file_id: str, name: str, expires: int | None, now: float | None = None) -> Response:
    """``GET /v1/images/files/{file_id}/{k}.{format}``: image ``k`` held in the Jobs store, while it lasts."""
    late = expired(expires, time.time() if now is None else now)
    if late is not None:
        raise late
    index, dot, ext = name.partition(".")
    if not (index.isascii() and index.isdigit() and dot and ext in ("png", "jpeg", "webp")):
        raise not_found()
    data = await job_routes.image(jobs, file_id, int(index))
    if data is None:
        raise not_found()
    return Response(data, media_type=sniff_mime(data), headers={"Cache-Control": "private, no-transform"})


def sniff_mime(data: bytes) -> str:
    """The MIME type of an image file the graph made (PNG, JPEG or WebP), from its first bytes."""
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def partial_image(preview: Preview, width: int, height: int, output_format: str) -> str:
    """A latent preview (PNG data URL at 1/8 size) as a partial image: ``width`` x ``height`` (nearest
    neighbour: a preview's blocks stay blocks) in ``output_format``, base64."""
    png = base64.b64decode(preview.image.removeprefix("data:image/png;base64,"))
    with Image.open(io.BytesIO(png)) as image:
        pixels = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.NEAREST))
    return base64.b64encode(encode_image(pixels, output_format)).decode()


def partial_event(how: Delivery, b64: str, index: int, size: str, created_at: int) -> dict:
    """OpenAI's ``ImageGenPartialImageEvent`` (``ImageEditPartialImageEvent`` for edits)."""
    return {
        "type": f"{how.kind}.partial_image",
        "b64_json": b64,
        "background": "opaque",
        "created_at": created_at,
        "output_format": how.output_format,
        "partial_image_index": index,
        "quality": how.quality,
        "size": size,
    }


def completed_event(how: Delivery, b64: str, size: str, created_at: int) -> dict:
    """OpenAI's ``ImageGenCompletedEvent`` (``ImageEditCompletedEvent``): usage is zero (no tokens here)."""
    usage = {
        "input_tokens": 0,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
        "output_tokens": 0,
        "total_tokens": 0,
    }
    return {
        "type": f"{how.kind}.completed",
        "b64_json": b64,
        "background": "opaque",
        "created_at": created_at,
        "output_format": how.output_format,
        "quality": how.quality,
        "size": size,
        "usage": usage,
    }


def _frame(event: str, data: dict) -> bytes:
    return format_sse_event(event=event, data_str=json.dumps(data, separators=(",", ":")))


_END = object()


async def stream(
    run: Callable[[Callable[[object], None]], Awaitable[DecodedImages]],
    how: Delivery,
    width: int,
    height: int,
    ping_s: float = PING_S,
) -> AsyncIterator[bytes]:
    """The Server-Sent Events of a streamed request, framed by FastAPI's ``format_sse_event``.

    ``run(on_event)`` runs the plan, calling ``on_event`` with the Denoiser's progress events; each
    ``Preview`` (at most ``partial_images``) becomes a ``<kind>.partial_image`` event, then each image a
    ``<kind>.completed`` one. An error after the stream began is an ``error`` event in OpenAI's error shape
    (the openai client raises it). A keep-alive comment every ``ping_s`` while nothing comes. Closing the
    stream (the client left) cancels the run."""
    size = f"{width}x{height}"
    events: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(run(events.put_nowait))
    task.add_done_callback(lambda _: events.put_nowait(_END))
    try:
        sent = 0
        while True:
            try:
                item = await asyncio.wait_for(events.get(), timeout=ping_s)
            except asyncio.TimeoutError:
                yield KEEPALIVE_COMMENT
                continue
            if item is _END:
                break
            if isinstance(item, Preview) and sent < how.partial_images:
                b64 = await asyncio.to_thread(partial_image, item, width, height, how.output_format)
                yield _frame(f"{how.kind}.partial_image", partial_event(how, b64, sent, size, int(time.time())))
                sent += 1
        try:
            result = task.result()
        except APIError as e:
            yield _frame("error", error_body(e.status, e.code, e.message, e.field, openai=True))
            return
        except Exception as e:  # the detail goes to the log; the client gets the 500's words
            logger.error("streamed OpenAI request failed", exc_info=e)
            message = "internal error; the server log has the details"
            yield _frame("error", error_body(500, "internal_error", message, None, openai=True))
            return
        for data in await asyncio.to_thread(encode_output, result.images, how):
            b64 = base64.b64encode(data).decode()
            yield _frame(f"{how.kind}.completed", completed_event(how, b64, size, int(time.time())))
    finally:
        task.cancel()
