"""Numerics at registration: an adapter whose weights fp16 cannot hold, or whose update dwarfs any base
weight, is refused with a 422 naming the layer and the limit (issue 16, D6: such adapters registered
fine and every image they touched came back black). Real safetensors files, written by diffusers/peft."""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch

from lora_registry.canonical import LoraWeights
from lora_registry.errors import InvalidAdapterError
from lora_registry.validation import FP16_MAX, WeightLimits, delta_rms

from lora_helpers import UNET_ATTN, make_peft_lora_file, peft_to_kohya_file
from registry_helpers import fresh_registry

pytest_plugins = ["registry_helpers"]

LAYER_KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
LAYER = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def lora_file(tiny, tmp_path_factory):
    return make_peft_lora_file(
        tiny, tmp_path_factory.mktemp("numerics"), seed=3, rank=4, alpha=4, unet_targets=UNET_ATTN
    )


def scaled(path, tmp_path, factor: float, key: str = LAYER_KEY):
    """The same file with one tensor multiplied by ``factor`` (in float32: finite, even at 1e38)."""
    state = safetensors.torch.load_file(str(path))
    assert key in state, sorted(state)[:4]
    state[key] = state[key].float() * factor
    out = tmp_path / f"scaled-{factor:g}.safetensors"
    safetensors.torch.save_file(state, str(out), metadata=safetensors.safe_open(str(path), "pt").metadata())
    return out


def test_a_sound_adapter_registers(registry_tiny_spec, lora_file, tmp_path):
    registry = fresh_registry(registry_tiny_spec, tmp_path)
    assert registry.register(lora_file, name="sound").ref == "sound@1"


def test_weights_beyond_fp16_are_refused_naming_the_layer(registry_tiny_spec, lora_file, tmp_path):
    registry = fresh_registry(registry_tiny_spec, tmp_path)
    with pytest.raises(InvalidAdapterError) as e:
        registry.register(scaled(lora_file, tmp_path, 1e38), name="black")
    err = e.value
    assert (err.status, err.code, err.keys) == (422, "weight_out_of_range", [LAYER])
    assert err.message.startswith(f"weights beyond the serving range in 1 tensors: {LAYER}.B (max |w| = ")
    assert err.message.endswith("the limit is 65504 (registry.max_abs_weight: float16's range)")
    assert registry.versions("black") == []  # nothing stored


def test_an_absurd_update_is_refused_naming_the_layer(registry_tiny_spec, lora_file, tmp_path):
    registry = fresh_registry(registry_tiny_spec, tmp_path)
    loud = scaled(lora_file, tmp_path, 1e3)  # every weight still far inside fp16's range
    state = safetensors.torch.load_file(str(loud))
    assert float(state[LAYER_KEY].abs().max()) < FP16_MAX
    with pytest.raises(InvalidAdapterError) as e:
        registry.register(loud, name="loud")
    err = e.value
    assert (err.status, err.code, err.keys) == (422, "delta_too_large", [LAYER])
    assert f"{LAYER} (RMS " in err.message and err.message.endswith("an RMS of 1 (registry.max_delta_rms)")
    assert registry.versions("loud") == []


def test_kohya_files_are_held_to_the_same_rule(registry_tiny_spec, lora_file, tmp_path):
    kohya = peft_to_kohya_file(scaled(lora_file, tmp_path, 1e38), tmp_path / "kohya.safetensors", alpha=4)
    with pytest.raises(InvalidAdapterError) as e:
        fresh_registry(registry_tiny_spec, tmp_path).register(kohya, name="black-kohya")
    assert (e.value.code, e.value.keys) == ("weight_out_of_range", [LAYER])


def test_the_limits_are_configurable(registry_tiny_spec, lora_file, tmp_path):
    """A registry served in fp32 alone may take weights fp16 cannot hold; a stricter one refuses more."""
    from lora_registry.config import RegistryConfig, open_registry

    config = RegistryConfig(
        uri=str(tmp_path / "fp32"), cache_dir=str(tmp_path / "cache"), max_abs_weight=3.4e38, max_delta_rms=1e40
    )
    assert (
        open_registry(config, base=registry_tiny_spec).register(scaled(lora_file, tmp_path, 1e30), name="x").version
        == 1
    )
    strict = RegistryConfig(uri=str(tmp_path / "strict"), cache_dir=str(tmp_path / "cache"), max_delta_rms=1e-6)
    with pytest.raises(InvalidAdapterError) as e:
        open_registry(strict, base=registry_tiny_spec).register(lora_file, name="sound")
    assert e.value.code == "delta_too_large" and "an RMS of 1e-06 (registry.max_delta_rms)" in e.value.message


@pytest.mark.parametrize("shape_a, shape_b", [((3, 10), (7, 3)), ((4, 5, 3, 3), (6, 4, 1, 1))])
def test_delta_rms_is_the_rms_of_the_update(shape_a, shape_b):
    g = torch.Generator().manual_seed(0)
    w = LoraWeights(A=torch.randn(shape_a, generator=g), B=torch.randn(shape_b, generator=g), alpha=6.0)
    rank = shape_a[0]
    delta = (6.0 / rank) * w.B.double().reshape(shape_b[0], rank) @ w.A.double().reshape(rank, -1)
    assert math.isclose(delta_rms(w), float(delta.pow(2).mean().sqrt()), rel_tol=1e-12)


def test_weight_limits_must_be_positive():
    with pytest.raises(ValueError, match="must be > 0"):
        WeightLimits(max_abs_weight=0)


def test_the_upload_route_answers_a_one_line_422(lora_file, tmp_path, cache_dir):
    from ingress_helpers import ADMIN, app_config, make_ingress

    mp = pytest.MonkeyPatch()
    try:
        client, _ = make_ingress(app_config(tmp_path, cache_dir), mp)
        with open(scaled(lora_file, tmp_path, 1e38), "rb") as f:
            r = client.post(
                "/v1/adapters", headers=ADMIN, files={"file": ("black.safetensors", f)}, data={"name": "black"}
            )
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "weight_out_of_range" and LAYER in error["message"] and "65504" in error["message"]
    finally:
        mp.undo()
