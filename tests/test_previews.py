"""Progress previews: the SD1.x latent->RGB linear map, its PNG data URL, the scale of x_t."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.engine.previews import SD1_LATENT_RGB_FACTORS, latents_to_rgb, preview_data_url, unit_variance
from deployments.engine.schedulers import SchedulerFactory


def decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))
    assert image.format == "PNG"
    return image


@pytest.mark.parametrize(
    "channels, rgb",
    [
        # rgb = ((z @ F + 1) / 2 * 255).round(), worked by hand from F's rows
        ([0, 0, 0, 0], [128, 128, 128]),  # 127.5 rounds to even
        ([1, 0, 0, 0], [172, 157, 169]),  # (1.3512, 1.2297, 1.3227) / 2 * 255 = 172.28, 156.79, 168.64
        ([0, 0, 0, 1], [100, 94, 36]),  # (0.7880, 0.7384, 0.2823) / 2 * 255 = 100.47, 94.15, 35.99
        ([1, 1, 0, 0], [214, 220, 199]),  # rows 1 + 2: (1.6762, 1.7271, 1.5577) / 2 * 255 = 213.72, 220.21, 198.61
        ([10, 0, 0, 0], [255, 255, 255]),  # far above 1: clamped
        ([0, 0, 0, 10], [0, 0, 0]),  # far below -1: clamped
    ],
)
def test_linear_map_matches_hand_computed_values(channels, rgb):
    latents = torch.tensor(channels, dtype=torch.float32)[:, None, None].expand(4, 2, 3)  # [c, h, w]
    out = latents_to_rgb(latents)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert (out == np.array(rgb, dtype=np.uint8)).all(), out[0, 0]


def test_every_pixel_is_mapped_on_its_own():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 5, 7, generator=g)
    out = latents_to_rgb(latents)
    y, x = 3, 6
    by_hand = ((latents[:, y, x] @ SD1_LATENT_RGB_FACTORS + 1) / 2).clamp(0, 1) * 255
    assert np.array_equal(out[y, x], by_hand.round().to(torch.uint8).numpy())


def test_preview_is_a_png_of_the_latent_size_and_a_function_of_the_latents():
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(4, 8, 12, generator=g)  # a 96x64 image's latents
    url = preview_data_url(latents)
    image = decode_data_url(url)
    assert image.size == (12, 8) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), latents_to_rgb(latents))  # PNG is lossless
    assert preview_data_url(latents.clone()) == url
    assert preview_data_url(latents + 0.5) != url


def test_wrong_channel_count_is_refused():
    with pytest.raises(ValueError, match=r"latents must be \[4, h, w\]"):
        latents_to_rgb(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"latents must be \[4, h, w\]"):
        latents_to_rgb(torch.zeros(1, 4, 8, 8))


def test_unit_variance_is_the_schedulers_own_input_scaling(tiny):
    info = tiny["info"]
    factory = SchedulerFactory(info.scheduler_class, info.scheduler_config)
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 6
    euler = factory.create("euler")
    euler.set_timesteps(6)
    assert euler.init_noise_sigma > 1  # sigma-parameterised: x_t = x_0 + sigma * noise
    expected = factory.create("euler")
    expected.set_timesteps(6)
    for index in (0, 3):
        expected._step_index = index
        assert torch.allclose(unit_variance(x_t, euler, index), expected.scale_model_input(x_t, euler.timesteps[index]))
    assert torch.equal(unit_variance(x_t, euler, 6), x_t)  # done: the last sigma is 0
    euler.set_begin_index(2)  # an img2img job that starts at the schedule's third timestep
    expected._step_index = 3
    assert torch.allclose(unit_variance(x_t, euler, 1), expected.scale_model_input(x_t, euler.timesteps[3]))
    for name in ("ddim", "default", "dpmpp_2m"):  # already variance-preserving
        s = factory.create(name)
        s.set_timesteps(6)
        assert torch.equal(unit_variance(x_t, s, 2), x_t)
