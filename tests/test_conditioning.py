"""Image inputs: safe decoding, the size rule, diffusers-exact preprocessing, VAE encode, the generator convention."""

from __future__ import annotations

import base64
import io
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from deployments.engine.conditioning import (
    ConditioningInput,
    ImageInputError,
    check_mask_size,
    check_strength,
    decode_base64,
    encode_conditioning,
    latent_mask,
    load_image,
    overlay_unmasked,
    preprocess_image,
    preprocess_mask,
    resolve_size,
)
from deployments.engine.images import encode

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
    with pytest.raises(ImageInputError, match=message) as err:
        load_image(data, max_bytes=MB, max_pixels=10_000, field="mask")
    assert err.value.field == "mask"


def test_byte_cap_is_checked_before_anything_else():
    data = file_bytes(picture(), "PNG")
    with pytest.raises(ImageInputError, match=f"is {len(data)} bytes; the limit is 100 bytes"):
        load_image(data, max_bytes=100, max_pixels=10_000)


@pytest.fixture()
def no_full_decode(monkeypatch):
    """Fails the test if any image's pixels get decoded."""

    def load(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_pixel_cap_from_the_header_before_decoding(no_full_decode):
    with pytest.raises(ImageInputError, match=r"is 64x48 = 3072 pixels; the limit is 3000 pixels"):
        load_image(file_bytes(picture(), "PNG"), max_bytes=MB, max_pixels=3000)


@pytest.mark.parametrize("side", [4000, 20000])
def test_decompression_bomb_is_refused_before_decoding(no_full_decode, side):
    # A ~100-byte file whose header claims side x side pixels (20000^2 also trips PIL's own guard).
    bomb = with_ihdr_size(file_bytes(Image.new("RGB", (8, 8)), "PNG"), side, side)
    assert len(bomb) < 200
    with pytest.raises(ImageInputError, match="the limit is 4194304 pixels") as err:
        load_image(bomb, max_bytes=MB, max_pixels=4_194_304)
    assert err.value.field == "image"


def test_image_input_error_survives_pickling():
    err = pickle.loads(pickle.dumps(ImageInputError("mask", "mask size 8x8 does not match image size 16x16")))
    assert (err.field, err.message) == ("mask", "mask size 8x8 does not match image size 16x16")
    assert str(err) == "mask: mask size 8x8 does not match image size 16x16"


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
    with pytest.raises(ImageInputError, match=message) as err:
        decode_base64(value, field="mask", max_bytes=200)
    assert err.value.field == "mask"


# -- size, mask, strength ---------------------------------------------------------


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
    "image_size, width, height, field, message",
    [
        ((60, 512), None, None, "image", r"image is 60x512: its width rounded down to a multiple of 8 is 56, outside"),
        ((4000, 512), None, None, "image", r"is 4000, outside \[64, 1024\]; give width and height to resize it"),
        ((512, 512), 100, None, "width", r"must be a multiple of 8 in \[64, 1024\], got 100"),
        ((512, 512), None, 2048, "height", r"must be a multiple of 8 in \[64, 1024\], got 2048"),
    ],
)
def test_size_rule_errors(image_size, width, height, field, message):
    with pytest.raises(ImageInputError, match=message) as err:
        resolve_size(image_size, width, height, min_side=64, max_side=1024)
    assert err.value.field == field


def test_mask_must_match_the_image_size():
    check_mask_size(picture(64, 48), picture(64, 48, "L"))
    with pytest.raises(ImageInputError, match="^mask: mask size 48x64 does not match image size 64x48$"):
        check_mask_size(picture(64, 48), picture(48, 64))


@pytest.mark.parametrize("strength", [0, 0.0, -0.5, 1.0001, 2, float("nan"), "0.5", None])
def test_strength_outside_the_interval_is_refused(strength):
    with pytest.raises(ImageInputError, match=r"^strength: must be in the interval \(0, 1\]") as err:
        check_strength(strength)
    assert err.value.field == "strength"


def test_strength_must_leave_a_step():
    check_strength(1.0, 1)
    check_strength(0.2, 5)  # int(5 * 0.2) = 1 step
    with pytest.raises(ImageInputError, match="strength 0.1 with 5 steps runs no step; need strength >= 1/steps = 0.2"):
        check_strength(0.1, 5)


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


def test_latent_mask_is_nearest_downsampling():
    mask = torch.zeros(1, 1, 16, 24)
    mask[..., :8, 8:] = 1
    small = latent_mask(mask, 8)
    assert small.shape == (1, 1, 2, 3)
    assert small[0, 0].tolist() == [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]


def test_overlay_keeps_unmasked_pixels_exactly():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    mask = torch.zeros(1, 1, 16, 24)
    mask[..., 4:12, 6:18] = 1
    out = overlay_unmasked(original, generated, mask)
    keep = mask[0, 0].numpy() == 0
    assert np.array_equal(out[keep], original[keep])
    assert np.array_equal(out[~keep], generated[~keep])
    assert out.dtype == np.uint8


# -- VAE encode and the generator convention ---------------------------------------


@torch.inference_mode()
def test_encode_equals_diffusers_retrieve_latents(tiny):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    vae = tiny["vae"]
    images = [preprocess_image(picture(64, 48), 64, 48), preprocess_image(picture(64, 48).rotate(180), 64, 48)]
    generators = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    ours = encode(vae, torch.cat(images), generators, per_image=True)
    for i, seed in enumerate((5, 6)):
        # What the img2img pipeline computes from the same PIL image (its own layout, its own generator).
        ref = vae.config.scaling_factor * retrieve_latents(vae.encode(images[i]), torch.Generator().manual_seed(seed))
        assert torch.equal(ours[i : i + 1], ref)
    assert ours.shape == (2, 4, 6, 8)
    alone = encode(vae, images[1], [torch.Generator().manual_seed(6)], per_image=True)
    assert torch.equal(alone, ours[1:])  # per-image encoding is batch invariant


def _draws(seed: int, kinds: list[str], shape=(1, 4, 8, 8)) -> torch.Tensor:
    """The generator state after diffusers' draws: each is one randn of the latent shape."""
    g = torch.Generator().manual_seed(seed)
    for _ in kinds:
        torch.randn(shape, generator=g)
    return g.get_state()


@pytest.mark.parametrize(
    "mode, channels, strength, draws",
    [
        ("img2img", 4, 0.5, ["image", "noise"]),
        ("img2img", 4, 1.0, ["image", "noise"]),  # img2img always starts from the image
        ("inpaint", 4, 1.0, ["image", "noise", "masked image"]),
        ("inpaint", 4, 0.6, ["image", "noise", "masked image"]),
        ("inpaint", 9, 1.0, ["noise", "masked image"]),  # pure noise: the image is not encoded
        ("inpaint", 9, 0.6, ["image", "noise", "masked image"]),
        ("img2img", 9, 0.6, ["image", "noise", "masked image"]),  # an all-white mask
    ],
)
def test_generator_convention(tiny, mode, channels, strength, draws):
    image = preprocess_image(picture(64, 64), 64, 64)
    mask = preprocess_mask(picture(64, 64, "L"), 64, 64) if mode == "inpaint" else None
    ((c0, c1),) = encode_conditioning(
        tiny["vae"],
        [ConditioningInput(image, [7, 8], strength, mask)],
        unet_in_channels=channels,
        noise_dtype=torch.float32,
        per_image=True,
    )
    for c, seed in ((c0, 7), (c1, 8)):
        assert torch.equal(c.generator_state, _draws(seed, draws))
        g = torch.Generator().manual_seed(seed)
        if draws[0] == "image":
            torch.randn(1, 4, 8, 8, generator=g)
        assert torch.equal(c.noise, torch.randn(1, 4, 8, 8, generator=g))
        assert (c.image_latents is not None) == ("image" in draws)
        assert (c.masked_image_latents is not None) == (channels == 9)
        assert c.inpaint == (mode == "inpaint" or channels == 9)
    if channels == 9 and mode == "img2img":
        assert torch.equal(c0.mask, torch.ones(1, 1, 8, 8))


def test_bad_strength_fails_before_the_vae(tiny, monkeypatch):
    vae = tiny["vae"]
    monkeypatch.setattr(vae, "encode", lambda *a, **k: pytest.fail("the VAE ran"))
    image = preprocess_image(picture(64, 64), 64, 64)
    with pytest.raises(ImageInputError, match=r"strength: must be in the interval \(0, 1\], got 1.5"):
        encode_conditioning(vae, [ConditioningInput(image, [1], 1.5)], unet_in_channels=4, noise_dtype=torch.float32)
