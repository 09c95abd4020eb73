"""Bad uploads: each refused with its status, code and first offending keys, and nothing left in the store."""

from __future__ import annotations

import pickle

import pytest
import torch

from lora_registry import DiskCache, Registry
from lora_registry.errors import AdapterTooLargeError, InvalidAdapterError

from registry_helpers import diffusers_state, random_lora, store_keys, to_bytes, torch_save_bytes

pytest_plugins = ["registry_helpers"]

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _state(spec, **kwargs):
    return diffusers_state(random_lora(spec, **kwargs))


def _nan(spec):
    state = _state(spec)
    state[f"{Q}.lora_B.weight"][0, 0] = float("nan")
    return to_bytes(state)


def _inf(spec):
    state = _state(spec)
    state[f"{Q}.lora_A.weight"][1, 2] = float("-inf")
    return to_bytes(state)


def _shape_mismatch(spec):
    state = _state(spec)
    state[f"{Q}.lora_A.weight"] = torch.zeros(4, 33)  # to_q takes 32 features
    return to_bytes(state)


def _rank_mismatch(spec):
    state = _state(spec)
    state[f"{Q}.lora_B.weight"] = torch.zeros(32, 5)  # A has rank 4
    return to_bytes(state)


def _unknown_module(spec):
    state = _state(spec)
    state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q.lora_A.weight"] = torch.zeros(4, 32)
    state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q.lora_B.weight"] = torch.zeros(32, 4)
    return to_bytes(state)


def _missing_up(spec):
    state = _state(spec)
    del state[f"{Q}.lora_B.weight"]
    return to_bytes(state)


def _int_weights(spec):
    state = _state(spec)
    state[f"{Q}.lora_A.weight"] = torch.zeros(4, 32, dtype=torch.int32)
    return to_bytes(state)


def _ldm_kohya(spec, block: str = "input_blocks_9_1"):
    """An LDM-named kohya file; ``input_blocks_9_1`` lies past tiny-sd's last input block (8 levels: 1..7)."""
    return to_bytes(
        {
            f"lora_unet_{block}_proj_in.lora_down.weight": torch.randn(4, 32, 1, 1) * 0.01,
            f"lora_unet_{block}_proj_in.lora_up.weight": torch.randn(32, 4, 1, 1) * 0.01,
        }
    )


def _bias(spec):
    state = _state(spec)
    state[f"{Q}.lora_B.bias"] = torch.zeros(32)
    return to_bytes(state)


CASES = [
    # id, make(spec) -> bytes, error class, status, code, keys
    ("truncated", lambda s: to_bytes(_state(s))[:-1000], InvalidAdapterError, 422, "truncated", None),
    ("pickle", lambda s: pickle.dumps(_state(s)), InvalidAdapterError, 422, "pickle_refused", []),
    ("torch-save", lambda s: torch_save_bytes(_state(s)), InvalidAdapterError, 422, "pickle_refused", []),
    ("garbage", lambda s: b"\x00" * 64, InvalidAdapterError, 422, "not_safetensors", []),
    ("nan", _nan, InvalidAdapterError, 422, "non_finite", [f"{Q}.lora_B.weight"]),
    ("inf", _inf, InvalidAdapterError, 422, "non_finite", [f"{Q}.lora_A.weight"]),
    ("shape", _shape_mismatch, InvalidAdapterError, 422, "shape_mismatch", [f"{Q}.lora_A.weight"]),
    ("rank-pair", _rank_mismatch, InvalidAdapterError, 422, "shape_mismatch", [f"{Q}.lora_B.weight"]),
    (
        "unknown-module",
        _unknown_module,
        InvalidAdapterError,
        422,
        "unknown_modules",
        [
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q.lora_A.weight",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q.lora_B.weight",
        ],
    ),
    ("missing-up", _missing_up, InvalidAdapterError, 422, "incomplete_pairs", [Q]),
    ("int-dtype", _int_weights, InvalidAdapterError, 422, "invalid_dtype", [f"{Q}.lora_A.weight"]),
    (
        "ldm-names-no-such-block",
        _ldm_kohya,
        InvalidAdapterError,
        422,
        "unknown_modules",
        ["lora_unet_input_blocks_9_1_proj_in.lora_down.weight", "lora_unet_input_blocks_9_1_proj_in.lora_up.weight"],
    ),
    ("lora-bias", _bias, InvalidAdapterError, 422, "unsupported_keys", [f"{Q}.lora_B.bias"]),
    ("no-lora", lambda s: to_bytes({"weight": torch.zeros(2)}), InvalidAdapterError, 422, "unknown_format", ["weight"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_upload_is_refused_and_leaves_nothing(adapter_registry, registry_tiny_spec, case):
    _, make, error, status, code, keys = case
    adapter_registry.register(to_bytes(_state(registry_tiny_spec, seed=1)), name="good")
    before = store_keys(adapter_registry.store)
    with pytest.raises(error) as e:
        adapter_registry.register(make(registry_tiny_spec), name="bad")
    assert (e.value.status, e.value.code) == (status, code)
    if keys is not None:
        assert e.value.keys == keys
    for key in e.value.keys:
        assert key in e.value.message
    assert store_keys(adapter_registry.store) == before
    assert [entry.name for entry in adapter_registry.list()[0]] == ["good"]


def test_oversized_upload_is_refused_before_reading(adapter_store, registry_tiny_spec, tmp_path, monkeypatch):
    import lora_registry.registry as registry_module

    data = to_bytes(_state(registry_tiny_spec))
    registry = Registry(
        adapter_store, base=registry_tiny_spec, cache=DiskCache(tmp_path / "c", 1 << 20), max_adapter_bytes=1000
    )
    path = tmp_path / "big.safetensors"
    path.write_bytes(data)
    opened = []
    monkeypatch.setattr(registry_module, "open", lambda *a, **k: opened.append(a), raising=False)
    with pytest.raises(AdapterTooLargeError) as e:
        registry.register(path, name="big")
    assert opened == []  # refused on stat() alone
    monkeypatch.undo()
    assert (e.value.status, e.value.code) == (413, "too_large")
    assert f"{len(data)} bytes" in e.value.message and "1000" in e.value.message
    with pytest.raises(AdapterTooLargeError):
        registry.register(data, name="big")
    assert store_keys(adapter_store) == []


def test_rank_above_the_limit(adapter_store, registry_tiny_spec, tmp_path):
    registry = Registry(adapter_store, base=registry_tiny_spec, max_rank=8)
    registry.register(to_bytes(_state(registry_tiny_spec, rank=8)), name="ok")
    before = store_keys(adapter_store)
    with pytest.raises(InvalidAdapterError) as e:
        registry.register(to_bytes(_state(registry_tiny_spec, rank=9)), name="too-high")
    assert (e.value.status, e.value.code) == (422, "rank_too_high")
    assert e.value.keys[0] == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    assert len(e.value.keys) == 5 and "max_rank=8" in e.value.message
    assert store_keys(adapter_store) == before


@pytest.mark.parametrize(
    "kwargs, code",
    [
        ({"name": "Bad Name"}, "invalid_name"),
        ({"name": "ok", "tags": ["Not OK"]}, "invalid_metadata"),
        ({"name": "ok", "description": "x" * 5000}, "invalid_metadata"),
        ({"name": "ok", "source_format": "kohya"}, "format_mismatch"),
        ({"name": "ok", "source_format": "ckpt"}, "invalid_format"),
    ],
)
def test_bad_request_fields(adapter_registry, registry_tiny_spec, kwargs, code):
    with pytest.raises(InvalidAdapterError) as e:
        adapter_registry.register(to_bytes(_state(registry_tiny_spec)), **kwargs)
    assert e.value.code == code
    assert store_keys(adapter_registry.store) == []


def test_error_payload_for_http(adapter_registry, registry_tiny_spec):
    with pytest.raises(InvalidAdapterError) as e:
        adapter_registry.register(_shape_mismatch(registry_tiny_spec), name="x")
    payload = e.value.to_dict()
    assert payload["status"] == 422 and payload["code"] == "shape_mismatch"
    assert payload["keys"] == [f"{Q}.lora_A.weight"]
    assert "[4, 33] != expected [4, 32]" in payload["message"]


def test_ldm_names_register_on_sd1_bases(adapter_registry, registry_tiny_spec):
    """kohya files with LDM UNet names (input_blocks_1_1, issue 18) register on SD1.x bases, as on SDXL: the
    module is the one the diffusers name means, so the canonical blob is the same."""
    torch.manual_seed(0)
    ldm = _ldm_kohya(registry_tiny_spec, "input_blocks_1_1")
    import safetensors.torch

    diffusers_named = {
        k.replace("input_blocks_1_1", "down_blocks_0_attentions_0"): v for k, v in safetensors.torch.load(ldm).items()
    }
    a = adapter_registry.register(ldm, name="ldm")
    b = adapter_registry.register(to_bytes(diffusers_named), name="diffusers-named")
    assert a.target_modules == ("unet.down_blocks.0.attentions.0.proj_in",)
    assert a.source_format == "kohya" and a.sha256 == b.sha256
