"""The VAE stage for SDXL (#17, point 4): latent scaling, force_upcast, and tiling equal to diffusers'.

- Tiled decode and encode above ``vae.tile_above_px`` equal diffusers' ``AutoencoderKL`` with
  ``enable_tiling()`` exactly (its ``tiled_decode``/``_tiled_encode``), for the SD1.x and SDXL tiny
  VAEs (``sample_size`` 256, so a 512 px image is tiled); below the threshold nothing tiles.
- ``encode_conditioning`` (img2img) through a ``TilingVAE`` equals ``StableDiffusionXLImg2ImgPipeline``'s
  ``prepare_latents`` with ``pipe.vae.enable_tiling()``.
- The scaling reads the VAE's config (SDXL's 0.13025; ``latents_mean``/``latents_std`` where set).
- A float16 server keeps a ``force_upcast`` VAE in float32 and casts the latents to it.

Every reference VAE is loaded afresh: ``enable_tiling()`` on the session fixtures would leak into
other tests.
"""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from deployments.config import VAEConfig
from deployments.engine import models
from deployments.engine.conditioning import ConditioningInput, encode_conditioning
from deployments.engine.images import (
    TilingVAE,
    decode,
    encode,
    latent_dist,
    scale_latents,
    tiling_view,
    unscale_latents,
)
from graph.image_decoding import preprocess_image

CPU = torch.device("cpu")
MODELS = ["tiny_dir", "tiny_sdxl_dir"]  # SD1.x (0.18215) and SDXL (0.13025, force_upcast) tiny VAEs


def load(directory, dtype=torch.float32):
    return models.load_vae(directory, CPU, dtype)


def picture(size: int, seed: int = 0) -> torch.Tensor:
    """A smooth picture with texture, ``[1, 3, size, size]`` in [-1, 1] as the ingress makes it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    rgb = np.stack([xx, yy, (xx + yy) // 2], -1) * (255 / size) + rng.integers(0, 32, (size, size, 3))
    return preprocess_image(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)), size, size)


def latents_for(size_px: int, n: int = 1, seed: int = 0) -> torch.Tensor:
    """Denoiser-like latents ``[n, 4, size/8, size/8]``: unit variance, as the denoiser's output."""
    return torch.randn(n, 4, size_px // 8, size_px // 8, generator=torch.Generator().manual_seed(seed))


def reference_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """``StableDiffusionPipeline``'s decode and postprocess with this ``vae`` (tiling as it is set)."""
    with torch.inference_mode():
        x = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.fixture(params=MODELS)
def model_dir(request):
    return request.getfixturevalue(request.param)


# -- tiling equals diffusers' enable_tiling --------------------------------------------------------


def test_tiling_view_shares_the_weights_and_leaves_the_vae_untouched(tiny_dir):
    # Pins what TilingVAE relies on in diffusers: use_tiling is a plain attribute read per call.
    vae = load(tiny_dir)
    view = tiling_view(vae)
    assert vae.use_tiling is False and view.use_tiling is True
    assert view.decoder is vae.decoder and view.encoder is vae.encoder
    assert [p.data_ptr() for p in view.parameters()] == [p.data_ptr() for p in vae.parameters()]
    assert (view.tile_sample_min_size, view.tile_latent_min_size, view.tile_overlap_factor) == (256, 32, 0.25)
    z = latents_for(320)  # 2 x 2 tiles
    with torch.inference_mode():
        tiled, plain = view.decode(z).sample, vae.decode(z).sample
    assert (tiled - plain).abs().max().item() > 1e-3  # the view really tiles, the VAE really does not


@pytest.mark.parametrize("per_image", [False, True])
def test_tiled_decode_equals_diffusers_enable_tiling(model_dir, per_image):
    vae = TilingVAE(load(model_dir), "auto")
    assert vae.tile_above_px == vae.tile_px == 256 and vae.tiles(512, 512)
    ref = load(model_dir)
    ref.enable_tiling()
    latents = latents_for(512, n=2)
    images = decode(vae, latents, per_image=per_image)
    # one image per call rounds as a batch of one (CPU convolutions round by batch size)
    expected = (
        torch.cat([reference_decode(ref, z[None]) for z in latents]) if per_image else reference_decode(ref, latents)
    )
    assert images.shape == (2, 3, 512, 512)
    assert (images - expected).abs().max().item() <= 1e-5


def test_tiled_decode_of_a_wide_image(tiny_sdxl_dir):
    # Only one side above the tile: diffusers tiles when either side is larger.
    vae = TilingVAE(load(tiny_sdxl_dir), "auto")
    ref = load(tiny_sdxl_dir)
    ref.enable_tiling()
    latents = torch.randn(1, 4, 16, 48, generator=torch.Generator().manual_seed(3))  # 128 x 384 px
    assert vae.tiles(128, 384)
    assert (decode(vae, latents) - reference_decode(ref, latents)).abs().max().item() <= 1e-5


def test_tiled_encode_equals_diffusers_enable_tiling(model_dir):
    vae = TilingVAE(load(model_dir), "auto")
    ref = load(model_dir)
    ref.enable_tiling()
    images = torch.cat([picture(512, 1), picture(512, 2)]).contiguous(memory_format=torch.channels_last)
    dist = latent_dist(vae, images, per_image=True)
    with torch.inference_mode():
        expected = torch.cat([ref.encode(images[i : i + 1]).latent_dist.parameters for i in range(2)])
        untiled = load(model_dir).encode(images).latent_dist.parameters
    assert dist.parameters.shape == (2, 8, 64, 64)
    assert (dist.parameters - expected).abs().max().item() <= 1e-5
    assert (dist.parameters - untiled).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "tile_above_px, height, width, tiles",
    [
        ("auto", 256, 256, False),  # one tile: diffusers does not tile it either
        ("auto", 264, 256, True),  # one side past the tile
        ("auto", 512, 512, True),
        (512, 512, 512, False),  # above the tile, not above the threshold: untiled, where diffusers tiles
        (512, 520, 64, True),
        (128, 256, 256, False),  # below the tile size: acts as the tile size
        (128, 264, 256, True),
        (None, 2048, 2048, False),
        (0, 2048, 2048, False),
    ],
)
def test_when_an_image_is_tiled(tiny_dir, tile_above_px, height, width, tiles):
    assert TilingVAE(load(tiny_dir), tile_above_px).tiles(height, width) is tiles


@pytest.mark.parametrize("tile_above_px, size", [("auto", 256), (320, 320), (None, 320), (0, 320)])
def test_below_the_threshold_nothing_tiles(tiny_sdxl_dir, tile_above_px, size):
    vae = TilingVAE(load(tiny_sdxl_dir), tile_above_px)
    latents = latents_for(size, seed=5)
    assert torch.equal(decode(vae, latents), reference_decode(load(tiny_sdxl_dir), latents))
    images = picture(size, 4)
    with torch.inference_mode():
        expected = load(tiny_sdxl_dir).encode(images).latent_dist.parameters
    assert torch.equal(latent_dist(vae, images).parameters, expected)


def test_tiling_does_not_touch_the_shared_vae_across_threads(tiny_dir):
    # A tiled and an untiled decode at once on one VAE (the deployment decodes and encodes in
    # threads): each gets its own answer, and the shared module is never switched to tiling.
    base = load(tiny_dir)
    tiled, plain = TilingVAE(base, "auto"), TilingVAE(base, None)
    latents = latents_for(320, seed=2)
    want = {"tiled": decode(tiled, latents), "plain": decode(plain, latents)}
    got: dict[str, list[torch.Tensor]] = {"tiled": [], "plain": []}
    start = threading.Barrier(2)

    def work(name, vae):
        start.wait()
        for _ in range(3):
            got[name].append(decode(vae, latents))

    threads = [threading.Thread(target=work, args=a) for a in (("tiled", tiled), ("plain", plain))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert base.use_tiling is False
    assert (want["tiled"] - want["plain"]).abs().max().item() > 1e-3
    for name in want:
        assert len(got[name]) == 3 and all(torch.equal(x, want[name]) for x in got[name])


# -- img2img conditioning through diffusers' SDXL img2img pipeline ------------------------------------


def test_img2img_conditioning_equals_sdxl_img2img_pipeline_with_tiling(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_sdxl_dir), local_files_only=True)
    pipe.vae.enable_tiling()
    pipe.scheduler.set_timesteps(10)
    t = pipe.scheduler.timesteps[4:5]
    image = picture(512, 7)
    seed = 11

    vae = TilingVAE(load(tiny_sdxl_dir), "auto")
    ((cond,),) = encode_conditioning(
        vae, [ConditioningInput(image, [seed], 0.6)], unet_in_channels=4, noise_dtype=torch.float32, per_image=True
    )
    with torch.inference_mode():
        kw = dict(batch_size=1, num_images_per_prompt=1, dtype=torch.float32, device=CPU)
        init = pipe.prepare_latents(image, t, generator=torch.Generator().manual_seed(seed), add_noise=False, **kw)
        x_t = pipe.prepare_latents(image, t, generator=torch.Generator().manual_seed(seed), **kw)
    assert cond.image_latents.shape == init.shape == (1, 4, 64, 64)
    assert (cond.image_latents - init).abs().max().item() <= 1e-5
    assert (pipe.scheduler.add_noise(cond.image_latents, cond.noise, t) - x_t).abs().max().item() <= 1e-5

    ((untiled,),) = encode_conditioning(
        TilingVAE(load(tiny_sdxl_dir), None),
        [ConditioningInput(image, [seed], 0.6)],
        unet_in_channels=4,
        noise_dtype=torch.float32,
    )
    assert (untiled.image_latents - init).abs().max().item() > 1e-3  # it was the tiled encode that matched


# -- scaling ----------------------------------------------------------------------------------------


def test_scaling_factor_comes_from_the_vae_config(tiny, tiny_sdxl):
    assert tiny["vae"].config.scaling_factor == 0.18215 and tiny_sdxl["vae"].config.scaling_factor == 0.13025
    vae = tiny_sdxl["vae"]
    latents = latents_for(64, seed=1)
    with torch.inference_mode():
        expected = (vae.decode(latents / 0.13025).sample / 2 + 0.5).clamp(0, 1)
        wrong = (vae.decode(latents / 0.18215).sample / 2 + 0.5).clamp(0, 1)
    assert torch.equal(decode(vae, latents), expected)
    assert (expected - wrong).abs().max().item() > 1e-3
    image = picture(64, 3)
    (z,) = encode(vae, image, [torch.Generator().manual_seed(4)])
    with torch.inference_mode():
        sample = vae.encode(image).latent_dist.sample(torch.Generator().manual_seed(4))
    assert torch.equal(z[None], 0.13025 * sample)


@pytest.fixture(scope="module")
def normalized_vae_dir(tiny_sdxl_dir, tmp_path_factory):
    """The tiny SDXL model with a Playground-v2.5-style VAE config: latents_mean / latents_std."""
    d = tmp_path_factory.mktemp("normalized")
    shutil.copytree(tiny_sdxl_dir / "vae", d / "vae")
    config = json.loads((d / "vae" / "config.json").read_text())
    config.update(latents_mean=[0.5, -0.25, 0.1, 0.0], latents_std=[2.0, 0.5, 1.0, 4.0], scaling_factor=0.5)
    (d / "vae" / "config.json").write_text(json.dumps(config))
    return d


def test_latents_mean_and_std_as_diffusers_sdxl_pipelines(normalized_vae_dir):
    vae = load(normalized_vae_dir)
    mean = torch.tensor([0.5, -0.25, 0.1, 0.0]).view(1, 4, 1, 1)
    std = torch.tensor([2.0, 0.5, 1.0, 4.0]).view(1, 4, 1, 1)
    latents = latents_for(64, seed=6)
    # StableDiffusionXLPipeline.__call__'s decode
    with torch.inference_mode():
        expected = (vae.decode(latents * std / 0.5 + mean).sample / 2 + 0.5).clamp(0, 1)
    assert torch.equal(decode(vae, latents), expected)
    # StableDiffusionXLImg2ImgPipeline.prepare_latents
    image = picture(64, 8)
    (z,) = encode(vae, image, [torch.Generator().manual_seed(9)])
    with torch.inference_mode():
        sample = vae.encode(image).latent_dist.sample(torch.Generator().manual_seed(9))
    assert torch.allclose(z[None], (sample - mean) * 0.5 / std, rtol=0, atol=1e-6)
    assert torch.allclose(unscale_latents(scale_latents(sample, vae.config), vae.config), sample, atol=1e-6)


# -- force_upcast on a float16 server ------------------------------------------------------------------


def test_force_upcast_vae_stays_float32_and_takes_float16_latents(tiny_sdxl_dir):
    vae = TilingVAE(load(tiny_sdxl_dir, torch.float16), "auto")
    assert vae.config.force_upcast and vae.dtype == torch.float32
    latents = latents_for(64, seed=4).half()  # the denoiser's float16 output
    images = decode(vae, latents)
    assert images.dtype == torch.float32
    assert torch.equal(images, decode(load(tiny_sdxl_dir), latents.float()))
    (z,) = encode(vae, picture(64, 5).half(), [torch.Generator().manual_seed(1)])
    assert z.dtype == torch.float32


def test_vae_without_force_upcast_runs_in_float16(tiny_sdxl_dir, tmp_path):
    # e.g. madebyollin/sdxl-vae-fp16-fix: force_upcast false, the VAE runs in the server's float16.
    shutil.copytree(tiny_sdxl_dir / "vae", tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    vae = TilingVAE(load(tmp_path, torch.float16), "auto")
    assert vae.dtype == torch.float16
    latents = latents_for(64, seed=4)
    images = decode(vae, latents)  # float32 latents are cast to the VAE's float16
    assert images.dtype == torch.float32
    assert (images - decode(load(tiny_sdxl_dir), latents)).abs().max().item() <= 2e-2


# -- configuration --------------------------------------------------------------------------------------


def test_config_default_and_values():
    assert VAEConfig().tile_above_px == "auto"
    assert [VAEConfig(tile_above_px=v).tile_above_px for v in (1024, 0, None)] == [1024, 0, None]


@pytest.mark.parametrize("value", [-1, "big", True, 512.5, "1024"])
def test_config_errors_name_the_field(value):
    with pytest.raises(ValidationError) as e:
        VAEConfig(tile_above_px=value)
    assert e.value.errors()[0]["loc"] == ("tile_above_px",)
    assert "tile_above_px" in str(e.value)


def test_app_config_error_names_the_path():
    from graph.config import AppConfig

    with pytest.raises(ValidationError) as e:
        AppConfig(vae={"tile_above_px": -8})
    assert e.value.errors()[0]["loc"] == ("vae", "tile_above_px")
