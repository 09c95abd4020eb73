"""Image conditioning in the engine, from tensors: VAE encode, the generator convention, strength, overlay.

(Decoding and preprocessing uploads is the ingress's: tests/test_image_decoding.py.)
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from deployments.engine.conditioning import (
    ConditioningInput,
    ImageInputError,
    check_strength,
    encode_conditioning,
    latent_mask,
    overlay_unmasked,
)
from deployments.engine.images import encode


def image_tensor(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A preprocessed image: ``[1, 3, height, width]`` in [-1, 1], channels-last as diffusers makes it."""
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return x.contiguous(memory_format=torch.channels_last)


def mask_tensor(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A preprocessed mask: ``[1, 1, height, width]`` in {0, 1}, 1 = repaint."""
    return (torch.rand(1, 1, height, width, generator=torch.Generator().manual_seed(seed)) >= 0.5).float()


def test_image_input_error_survives_pickling():
    err = pickle.loads(pickle.dumps(ImageInputError("mask", "mask must be [1, 1, 8, 8], got [1, 1, 4, 4]")))
    assert (err.field, err.message) == ("mask", "mask must be [1, 1, 8, 8], got [1, 1, 4, 4]")
    assert str(err) == "mask: mask must be [1, 1, 8, 8], got [1, 1, 4, 4]"


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
    images = [image_tensor(48, 64, seed=1), image_tensor(48, 64, seed=2)]
    generators = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    ours = encode(vae, torch.cat(images), generators, per_image=True)
    for i, seed in enumerate((5, 6)):
        # What the img2img pipeline computes from the same image tensor (its own generator).
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
    image = image_tensor(64, 64)
    mask = mask_tensor(64, 64) if mode == "inpaint" else None
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
    image = image_tensor(64, 64)
    with pytest.raises(ImageInputError, match=r"strength: must be in the interval \(0, 1\], got 1.5"):
        encode_conditioning(vae, [ConditioningInput(image, [1], 1.5)], unet_in_channels=4, noise_dtype=torch.float32)
