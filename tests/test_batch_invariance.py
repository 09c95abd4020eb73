"""Batch-invariant CPU kernels: a row's result is bit-identical whatever batch it is in."""

import copy

import pytest
import torch

from deployments.engine.batch_invariance import make_batch_invariant
from deployments.engine.images import decode


def _rows_alone(fn, x):
    return torch.cat([fn(x[i : i + 1]) for i in range(x.shape[0])])


@pytest.mark.parametrize(
    "module, shape",
    [
        (torch.nn.Linear(128, 64), (9, 128)),
        (torch.nn.Linear(64, 64), (5, 1, 64)),
        (torch.nn.Conv2d(32, 4, 3, padding=1), (5, 32, 8, 8)),
        (torch.nn.Conv2d(4, 32, 3, padding=1, stride=2), (3, 4, 16, 16)),
        (torch.nn.Conv2d(32, 64, 1), (6, 32, 4, 4)),
        (torch.nn.GroupNorm(8, 32), (5, 32, 8, 8)),
    ],
)
@torch.inference_mode()
def test_module_rows_are_batch_invariant(module, shape):
    torch.manual_seed(0)
    module = make_batch_invariant(module)
    x = torch.randn(shape)
    assert torch.equal(module(x), _rows_alone(module, x))


@torch.inference_mode()
def test_patched_modules_compute_the_same_function(tiny):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 16, 3, padding=1)
    x = torch.randn(2, 32, 8, 8)
    expected = conv(x)
    assert (make_batch_invariant(conv)(x) - expected).abs().max().item() < 1e-5


@torch.inference_mode()
def test_unet_rows_are_batch_invariant(tiny):
    unet = make_batch_invariant(copy.deepcopy(tiny["unet"]))
    torch.manual_seed(0)
    x = torch.randn(6, 4, 8, 8)
    t = torch.tensor([999.0, 801.0, 500.0, 120.0, 20.0, 1.0])
    c = torch.randn(6, 77, 64)
    full = unet(x, t, encoder_hidden_states=c).sample
    for i in range(6):
        alone = unet(x[i : i + 1], t[i : i + 1], encoder_hidden_states=c[i : i + 1]).sample
        assert torch.equal(full[i], alone[0]), f"row {i}"


@torch.inference_mode()
def test_text_encoder_rows_are_batch_invariant(tiny):
    te = make_batch_invariant(copy.deepcopy(tiny["text_encoder"]))
    ids = tiny["tokenizer"](
        ["a cat", "", "a photograph of an astronaut"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    full = te(ids)[0]
    for i in range(3):
        assert torch.equal(full[i], te(ids[i : i + 1])[0][0])


@torch.inference_mode()
def test_per_image_vae_decode_is_batch_invariant(tiny):
    torch.manual_seed(0)
    z = torch.randn(4, 4, 8, 8)
    full = decode(tiny["vae"], z, per_image=True)
    assert torch.equal(full[2:3], decode(tiny["vae"], z[2:3], per_image=True))
