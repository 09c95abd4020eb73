"""Uploads at the edge (graph/image_decoding.py): safe decoding, mask inversion, the size rule, and
tensors bit-identical to diffusers' preprocessing. Every refusal is a ``FieldError`` at the canonical field."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from graph.errors import FieldError
from graph.image_decoding import (
    check_mask_size,
    decode_base64,
    load_image,
    preprocess_image,
    preprocess_mask,
    resolve_size,
)

MB = 1 << 20


def picture(width: int = 64, height: int = 48, mode: str = "RGB") -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1), (xx * yy) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8)).convert(mode)


def file_bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (valid CRC) over the original tiny pixel data."""
    assert png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + png[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return png[:16] + ihdr + crc + png[33:]


# -- decoding -------------------------------------------------------------------


@pytest.mark.parametrize("fmt, kw", [("PNG", {}), ("JPEG", {"quality": 95}), ("WEBP", {"lossless": True})])
def test_accepted_formats_decode_to_rgb(fmt, kw):
    image = load_image(file_bytes(picture(), fmt, **kw), max_bytes=MB, max_pixels=10_000)
    assert image.mode == "RGB" and image.size == (64, 48)
    if fmt != "JPEG":  # lossless formats round-trip exactly
        assert np.array_equal(np.array(image), np.array(picture()))


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_other_modes_become_rgb(mode):
    image = load_image(file_bytes(picture(mode=mode), "PNG"), max_bytes=MB, max_pixels=10_000)
    assert image.mode == "RGB" and image.size == (64, 48)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"hello, not an image", "is not a PNG, JPEG or WebP image"),
        (file_bytes(picture(), "GIF"), "is not a PNG, JPEG or WebP image"),
        (file_bytes(picture(), "BMP"), "is not a PNG, JPEG or WebP image"),
        (half(file_bytes(picture(), "PNG")), "could not be decoded: truncated or corrupt PNG"),
        (half(file_bytes(picture(), "JPEG")), "could not be decoded: truncated or corrupt JPEG"),
    ],
)
def test_bad_files_are_refused(data, message):
    with pytest.raises(FieldError, match=f"^mask {message}") as err:
        load_image(data, max_bytes=MB, max_pixels=10_000, field="mask")
    assert (err.value.status, err.value.code, err.value.field) == (422, "invalid_image", "mask")
    assert err.value.render(lambda path: {"mask": "mask_image"}.get(path, path)).startswith("mask_image ")


def test_byte_cap_is_checked_before_anything_else():
    data = file_bytes(picture(), "PNG")
    with pytest.raises(FieldError, match=f"is {len(data)} bytes; the limit is 100 bytes"):
        load_image(data, max_bytes=100, max_pixels=10_000)


@pytest.fixture()
def no_full_decode(monkeypatch):
    """Fails the test if any image's pixels get decoded."""

    def load(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_pixel_cap_from_the_header_before_decoding(no_full_decode):
    with pytest.raises(FieldError, match=r"is 64x48 = 3072 pixels; the limit is 3000 pixels"):
        load_image(file_bytes(picture(), "PNG"), max_bytes=MB, max_pixels=3000)


@pytest.mark.parametrize("side", [4000, 20000])
def test_decompression_bomb_is_refused_before_decoding(no_full_decode, side):
    # A ~100-byte file whose header claims side x side pixels (20000^2 also trips PIL's own guard).
    bomb = with_ihdr_size(file_bytes(Image.new("RGB", (8, 8)), "PNG"), side, side)
    assert len(bomb) < 200
    with pytest.raises(FieldError, match="the limit is 4194304 pixels") as err:
        load_image(bomb, max_bytes=MB, max_pixels=4_194_304)
    assert err.value.field == "image"


def test_base64_and_data_urls():
    png = file_bytes(picture(), "PNG")
    b64 = base64.b64encode(png).decode()
    assert decode_base64(b64, field="image", max_bytes=MB) == png
    assert decode_base64(f"data:image/png;base64,{b64}", field="image", max_bytes=MB) == png
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME-style line breaks
    assert decode_base64(wrapped, field="image", max_bytes=MB) == png


@pytest.mark.parametrize(
    "value, message",
    [
        ("", "must be a non-empty base64 string or data URL"),
        ("not base64 at all!", "is not valid base64"),
        ("data:image/png,abcd", "a data URL must look like data:image/png;base64,<data>"),
        ("data:image/gif;base64,R0lGODlh", "data URL type 'image/gif' is not one of"),
        ("QUJD" * 100, "is 300 bytes; the limit is 200 bytes"),
    ],
)
def test_bad_base64_is_refused(value, message):
    with pytest.raises(FieldError, match=message) as err:
        decode_base64(value, field="mask", max_bytes=200)
    assert err.value.field == "mask"


# -- mask inversion (A1111's inpainting_mask_invert) ------------------------------


def mask_array() -> np.ndarray:
    mask = np.zeros((16, 8), np.uint8)
    mask[:8] = 255  # top half: repaint
    mask[8:, :2] = 100  # a grey stripe
    return mask


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_invert_flips_white_and_black_once_decoded(mode):
    data = file_bytes(Image.fromarray(mask_array()).convert(mode), "PNG")
    inverted = load_image(data, max_bytes=MB, max_pixels=10_000, field="mask", invert=True)
    assert inverted.mode == "RGB" and inverted.size == (8, 16)
    np.testing.assert_array_equal(np.asarray(inverted), np.repeat((255 - mask_array())[..., None], 3, -1))
    plain = load_image(data, max_bytes=MB, max_pixels=10_000, field="mask")
    np.testing.assert_array_equal(np.asarray(plain)[..., 0], mask_array())


def test_inverting_in_the_decoding_gives_the_tensors_a_re_encoded_inverted_png_gave():
    # What graph/a1111.py did before: decode, invert the grayscale, re-encode as PNG, decode again.
    colour = picture(64, 48)
    data = file_bytes(colour, "PNG")
    buf = io.BytesIO()
    ImageOps.invert(Image.open(io.BytesIO(data)).convert("L")).save(buf, format="PNG")
    before = load_image(buf.getvalue(), max_bytes=MB, max_pixels=10_000)
    now = load_image(data, max_bytes=MB, max_pixels=10_000, invert=True)
    for width, height in ((64, 48), (32, 24), (128, 96)):
        assert torch.equal(preprocess_mask(now, width, height), preprocess_mask(before, width, height))


# -- size, mask ----------------------------------------------------------------


@pytest.mark.parametrize(
    "image_size, width, height, expected",
    [
        ((512, 512), None, None, (512, 512)),
        ((517, 300), None, None, (512, 296)),  # rounded down, as diffusers
        ((517, 300), 256, 128, (256, 128)),  # given: resized to it
        ((517, 300), 256, None, (256, 296)),
    ],
)
def test_size_rule(image_size, width, height, expected):
    assert resolve_size(image_size, width, height, min_side=64, max_side=1024) == expected


@pytest.mark.parametrize(
    "image_size, width, height, field, code, message",
    [
        (
            (60, 512),
            None,
            None,
            "image",
            "invalid_image",
            r"^image is 60x512: its width rounded down to a multiple of 8 is 56, outside",
        ),
        (
            (4000, 512),
            None,
            None,
            "image",
            "invalid_image",
            r"is 4000, outside \[64, 1024\]; give width and height to resize it$",
        ),
        ((512, 512), 100, None, "width", "invalid_value", r"^width must be a multiple of 8 in \[64, 1024\], got 100$"),
        (
            (512, 512),
            None,
            2048,
            "height",
            "invalid_value",
            r"^height must be a multiple of 8 in \[64, 1024\], got 2048",
        ),
    ],
)
def test_size_rule_errors(image_size, width, height, field, code, message):
    with pytest.raises(FieldError, match=message) as err:
        resolve_size(image_size, width, height, min_side=64, max_side=1024)
    assert (err.value.status, err.value.code, err.value.field) == (422, code, field)


def test_mask_must_match_the_image_size():
    check_mask_size(picture(64, 48), picture(64, 48, "L"))
    with pytest.raises(FieldError, match="^mask size 48x64 does not match image size 64x48$") as err:
        check_mask_size(picture(64, 48), picture(48, 64))
    assert (err.value.status, err.value.code, err.value.field) == (422, "invalid_image", "mask")


# -- preprocessing equals diffusers' ----------------------------------------------


@pytest.fixture(scope="module")
def processors():
    from diffusers.image_processor import VaeImageProcessor

    image = VaeImageProcessor(vae_scale_factor=8)
    mask = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    return image, mask


@pytest.mark.parametrize("size, target", [((64, 48), None), ((70, 45), None), ((64, 48), (128, 96))])
def test_preprocess_is_bit_identical_to_diffusers(processors, size, target):
    image_proc, mask_proc = processors
    img = picture(*size)
    mask = Image.fromarray((np.arange(size[0] * size[1]).reshape(size[1], size[0]) % 7 * 40).astype(np.uint8))
    mask = mask.convert("RGB")
    width, height = target or resolve_size(size, None, None, min_side=8, max_side=1024)
    ours = preprocess_image(img, width, height)
    ref = image_proc.preprocess(img, height=target and height, width=target and width)
    assert ours.shape == (1, 3, height, width) and ours.stride() == ref.stride()
    assert torch.equal(ours, ref)
    ours_mask = preprocess_mask(mask, width, height)
    ref_mask = mask_proc.preprocess(mask, height=height, width=width)
    assert torch.equal(ours_mask, ref_mask)
    assert set(ours_mask.unique().tolist()) == {0.0, 1.0}
