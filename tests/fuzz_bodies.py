"""Hypothesis strategies for every route's request: bodies built from the routes' own schemas, each field
sometimes right, sometimes of the wrong type, out of range, or text no client should send (lone
surrogates, non-ASCII digits, control characters, huge numbers); sometimes extra fields or no object at
all. Shared by the in-process fuzz test (many examples) and the one over HTTP (few, cheap ones)."""

from __future__ import annotations

import base64
import json
import types
import typing
from dataclasses import dataclass

from hypothesis import strategies as st
from pydantic import BaseModel

from graph import a1111, schemas

from ingress_helpers import png_bytes

# Text a careless or hostile client sends: any code point (lone surrogates included: JSON can carry
# them as \ud800 escapes), digits of other scripts, separators, the syntax lorafleet itself parses.
NASTY_TEXT = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "²x64",
            "６４x６４",
            "64x64",
            "64X64",
            "x",
            "@",
            "tiny-sd:x@²",
            "tiny-sd:x@0",
            "tiny-sd:",
            "<lora:x:lots>",
            "<lora:",
            "((((",
            "\x00",
            "a\nb",
            "name@%C2%B2",
            "..",
            "../etc",
            "a" * 300,
            "\ud800",
        ]
    ),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.text(st.characters(exclude_categories=()), max_size=40),
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    NASTY_TEXT,
)
ANY_JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NASTY_TEXT, inner, max_size=3),
    max_leaves=8,
)


def _image_strategy(cheap: bool):
    b64 = _IMAGE
    small = base64.b64encode(png_bytes(8, 8)).decode()
    return st.sampled_from([b64, "data:image/png;base64," + b64, small, "data:image/gif;base64,R0lGOD", "!!!"]) | (
        NASTY_TEXT
    )


def value_strategy(annotation, name: str, cheap: bool):
    """Values for one field: of its type (wide ranges), or anything JSON can carry."""
    if cheap and name in CHEAP:
        return CHEAP[name] | JSON_SCALARS
    if name in SPECIAL:
        return st.one_of(SPECIAL[name], SPECIAL[name], _typed(annotation, name, cheap), ANY_JSON)
    if name in ("image", "mask"):
        return _image_strategy(cheap) | JSON_SCALARS
    if name == "init_images":
        return st.lists(_image_strategy(cheap), max_size=2) | JSON_SCALARS
    return _typed(annotation, name, cheap) | ANY_JSON


def _typed(annotation, name: str, cheap: bool):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(_typed(a, name, cheap) for a in args))
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(_typed(args[0], name, cheap), max_size=5)
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(min_value=-(2**40), max_value=2**40) | st.sampled_from([0, 1, 8, 64, 2**32, 2**63])
    if annotation is float:
        return st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.5, 1.0, 30.0, 1e308])
    if annotation is str:
        return NASTY_TEXT
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_bodies(annotation, cheap)
    return ANY_JSON


def model_bodies(model: type[BaseModel], cheap: bool = False, extra: bool = True):
    """Dicts shaped like ``model``: each field present or not, each value typed or not; maybe extra keys."""
    optional = {name: value_strategy(field.annotation, name, cheap) for name, field in model.model_fields.items()}
    body = st.fixed_dictionaries({}, optional=optional)
    if extra:
        body = st.tuples(body, st.dictionaries(NASTY_TEXT, ANY_JSON, max_size=2)).map(lambda t: {**t[1], **t[0]})
    return body


# Values that once gave 500s, or that a parser may misread, where a field's own strategy rarely finds them.
SIZES = ["64x64", "²x64", "64x²", "６４x６４", "64x", "x64", "0x0", "64x64x64", "-64x64", "99999999999999999999x64"]
SPECIAL = {
    "size": st.sampled_from(SIZES),
    "model": st.sampled_from(["tiny-sd", "tiny-sd:x", "tiny-sd:x@0", "tiny-sd:x@²", "tiny-sd:x@1", ":x", "tiny-sd:"]),
}

# Over HTTP the graph is real: any body that passes validation runs, so it must be cheap (two steps, 64
# pixels, one image). Invalid values still come from the other strategies.
CHEAP = {
    "steps": st.sampled_from([1, 2]),
    "width": st.just(64),
    "height": st.just(64),
    "num_images": st.just(1),
    "n": st.just(1),
    "batch_size": st.just(1),
    "n_iter": st.just(1),
    "size": st.sampled_from(SIZES),
    "strength": st.sampled_from([0.5, 1.0, 0.0, -1.0]),
    "denoising_strength": st.sampled_from([0.5, 1.0, 0.0]),
    "webhook_url": st.sampled_from(["http://127.0.0.1:1/x", "ftp://x", "https://example.invalid/h"]),
}


@dataclass(frozen=True)
class JsonRoute:
    path: str
    model: type[BaseModel]


JSON_ROUTES = [
    JsonRoute("/v1/generate", schemas.GenerateRequest),
    JsonRoute("/v1/img2img", schemas.Img2ImgRequest),
    JsonRoute("/v1/inpaint", schemas.InpaintRequest),
    JsonRoute("/v1/jobs", schemas.JobRequest),
    JsonRoute("/v1/images/generations", schemas.OpenAIImagesRequest),
    JsonRoute("/sdapi/v1/txt2img", a1111.Txt2ImgRequest),
    JsonRoute("/sdapi/v1/img2img", a1111.Img2ImgRequest),
]


_IMAGE = base64.b64encode(png_bytes(64, 64)).decode()
# A body each route accepts (cheap to run): the fuzzer changes a few of its fields, so most examples get
# past parsing into the checks, the translation and the answer, where the bugs were.
VALID = {
    "/v1/generate": {"prompt": "a boat", "steps": 2, "width": 64, "height": 64},
    "/v1/img2img": {"prompt": "a boat", "steps": 2, "image": _IMAGE},
    "/v1/inpaint": {"prompt": "a boat", "steps": 2, "image": _IMAGE, "mask": _IMAGE},
    "/v1/jobs": {"prompt": "a boat", "steps": 2, "width": 64, "height": 64},
    "/v1/images/generations": {"prompt": "a boat", "steps": 2, "size": "64x64"},
    "/sdapi/v1/txt2img": {"prompt": "a boat", "steps": 2, "width": 64, "height": 64},
    "/sdapi/v1/img2img": {"prompt": "a boat", "steps": 2, "init_images": [_IMAGE]},
}


def near_valid(route: JsonRoute, cheap: bool = False):
    """A body the route accepts with up to two fields changed and maybe an extra one: most examples get
    past parsing into the checks, the translation and the answer, where the bugs were."""
    fields = {name: value_strategy(f.annotation, name, cheap) for name, f in route.model.model_fields.items()}
    names = st.sampled_from(sorted(fields))
    one = names.flatmap(lambda n: st.fixed_dictionaries({n: fields[n]}))
    changed = st.tuples(one, one | st.just({})).map(lambda t: {**t[1], **t[0]})
    extra = st.dictionaries(NASTY_TEXT, ANY_JSON, max_size=1)
    return st.tuples(changed, extra).map(lambda t: {**VALID[route.path], **t[1], **t[0]})


def json_payloads(route: JsonRoute, cheap: bool = False):
    """Raw request bodies: mostly ``near_valid`` ones, sometimes a body drawn from the schema alone, any
    JSON, or bytes that are not JSON."""
    near = near_valid(route, cheap).map(lambda b: json.dumps(b).encode())
    shaped = model_bodies(route.model, cheap).map(lambda b: json.dumps(b).encode())
    other = ANY_JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=64)
    return st.one_of(near, near, near, shaped, other)


# Path and query parameters of the other routes, and the admin upload's form fields: as bytes on the
# wire (a lone surrogate becomes the bytes no UTF-8 decoder accepts).
def wire(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def url_part(text: str) -> str:
    from urllib.parse import quote

    quoted = quote(wire(text), safe="")
    return quoted if quoted not in ("", ".", "..") else "x"


FORM_TEXT = NASTY_TEXT.map(wire)
ADAPTER_FORMS = st.fixed_dictionaries(
    {},
    optional={
        "name": FORM_TEXT,
        "description": FORM_TEXT,
        "trigger_words": FORM_TEXT,
        "tags": FORM_TEXT,
        "adapter_config": FORM_TEXT
        | ANY_JSON.map(lambda v: json.dumps(v).encode())
        | st.just(b"[" * 5000 + b"]" * 5000),
    },
)
