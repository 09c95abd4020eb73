"""Pure functions: names, references, store keys, kohya names, safetensors headers, format detection."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch

from lora_registry import layout
from lora_registry.errors import InvalidAdapterError
from lora_registry.formats import detect_format, plan_conversion
from lora_registry.manifest import check_metadata, check_name, parse_ref
from lora_registry.safetensors_io import read_header, write_safetensors

from registry_helpers import to_bytes, torch_save_bytes

pytest_plugins = ["registry_helpers"]


@pytest.mark.parametrize(
    "name, ok",
    [
        ("watercolor", True),
        ("a", True),
        ("0day", True),
        ("pixel-art_v2.1", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("", False),
        ("Watercolor", False),
        ("-lead", False),
        (".hidden", False),
        ("_x", False),
        ("has space", False),
        ("slash/x", False),
        ("at@1", False),
        ("ünïcode", False),
    ],
)
def test_name_rule(name, ok):
    if ok:
        assert check_name(name) == name
    else:
        with pytest.raises(InvalidAdapterError) as e:
            check_name(name)
        assert e.value.code == "invalid_name"
        assert e.value.status == 422


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("watercolor", ("watercolor", None)),
        ("watercolor@1", ("watercolor", 1)),
        ("watercolor@12", ("watercolor", 12)),
        ("a.b-c_d@300", ("a.b-c_d", 300)),
    ],
)
def test_parse_ref(ref, expected):
    assert parse_ref(ref) == expected


@pytest.mark.parametrize(
    "ref, code",
    [
        ("watercolor@", "invalid_ref"),
        ("watercolor@0", "invalid_ref"),
        ("watercolor@01", "invalid_ref"),
        ("watercolor@-1", "invalid_ref"),
        ("watercolor@v2", "invalid_ref"),
        ("watercolor@1@2", "invalid_ref"),
        ("Water@1", "invalid_name"),
        ("@1", "invalid_name"),
    ],
)
def test_parse_ref_rejects(ref, code):
    with pytest.raises(InvalidAdapterError) as e:
        parse_ref(ref)
    assert e.value.code == code


@pytest.mark.parametrize(
    "key, expected",
    [
        ("adapters/watercolor/00000003.json", ("watercolor", 3, "json")),
        ("adapters/watercolor/00000003.deleted", ("watercolor", 3, "deleted")),
        ("adapters/a.b/12345678.json", ("a.b", 12345678, "json")),
        ("adapters/watercolor/3.json", None),
        ("adapters/watercolor/00000003.json.tmp", None),
        ("adapters/Bad/00000001.json", None),
        ("blobs/abc.safetensors", None),
        ("staging/x.safetensors", None),
    ],
)
def test_parse_entry_key(key, expected):
    assert layout.parse_entry_key(key) == expected


def test_layout_keys_round_trip():
    assert layout.manifest_key("watercolor", 3) == "adapters/watercolor/00000003.json"
    assert layout.tombstone_key("watercolor", 3) == "adapters/watercolor/00000003.deleted"
    assert layout.parse_entry_key(layout.manifest_key("x", 99)) == ("x", 99, "json")
    assert layout.sha_from_blob_key(layout.blob_key("ab" * 32)) == "ab" * 32
    assert layout.sha_from_blob_key("staging/ab.safetensors") is None


@pytest.mark.parametrize(
    "description, trigger_words, tags, ok",
    [
        ("", [], [], True),
        ("a style", ["wc style", "paint"], ["art", "v1.5"], True),
        ("x" * 2001, [], [], False),
        ("", [""], [], False),
        ("", ["x" * 101], [], False),
        ("", [], ["Art"], False),
        ("", [], ["two words"], False),
        ("", [], [f"t{i}" for i in range(17)], False),
    ],
)
def test_metadata_bounds(description, trigger_words, tags, ok):
    if ok:
        check_metadata(description, trigger_words, tags)
    else:
        with pytest.raises(InvalidAdapterError) as e:
            check_metadata(description, trigger_words, tags)
        assert e.value.code == "invalid_metadata"


@pytest.mark.parametrize(
    "kohya, canonical",
    [
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        ),
        (
            "lora_unet_up_blocks_3_attentions_1_transformer_blocks_0_attn2_to_out_0",
            "unet.up_blocks.3.attentions.1.transformer_blocks.0.attn2.to_out.0",
        ),
        ("lora_unet_mid_block_attentions_0_proj_in", "unet.mid_block.attentions.0.proj_in"),
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
        ),
        ("lora_unet_conv_in", "unet.conv_in"),
        ("lora_unet_time_embedding_linear_1", "unet.time_embedding.linear_1"),
        (
            "lora_te_text_model_encoder_layers_3_self_attn_q_proj",
            "text_encoder.text_model.encoder.layers.3.self_attn.q_proj",
        ),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "text_encoder.text_model.encoder.layers.0.mlp.fc1"),
        ("lora_te_encoder_layers_0_mlp_fc2", "text_encoder.text_model.encoder.layers.0.mlp.fc2"),
        # LDM-style UNet names (issue 18): accepted on SD1.x bases too, as on SDXL.
        ("lora_unet_input_blocks_1_1_proj_in", "unet.down_blocks.0.attentions.0.proj_in"),
        ("lora_unet_input_blocks_1_0_in_layers_2", "unet.down_blocks.0.resnets.0.conv1"),
        ("lora_unet_input_blocks_2_0_op", "unet.down_blocks.0.downsamplers.0.conv"),
        (
            "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        ),
        ("lora_unet_output_blocks_1_1_conv", "unet.up_blocks.0.upsamplers.0.conv"),
        ("lora_unet_output_blocks_7_0_skip_connection", "unet.up_blocks.3.resnets.1.conv_shortcut"),
        ("lora_unet_time_embed_0", "unet.time_embedding.linear_1"),
        ("lora_unet_out_2", "unet.conv_out"),
    ],
)
def test_kohya_names_map_back_exactly(registry_tiny_spec, kohya, canonical):
    assert registry_tiny_spec.kohya_names[kohya] == canonical


@pytest.mark.parametrize(
    "kohya",
    [
        "lora_unet_input_blocks_9_1_proj_in",  # LDM-style, past the model's last input block
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",  # SDXL's second text encoder
        "lora_unet_down_blocks_9_attentions_0_proj_in",
    ],
)
def test_kohya_names_unknown(registry_tiny_spec, kohya):
    assert kohya not in registry_tiny_spec.kohya_names


def test_spec_fingerprint_is_stable_and_shape_sensitive(registry_tiny_spec):
    from lora_registry.base_model import BaseModelSpec, ModuleShape

    again = BaseModelSpec(family="sd1", modules=dict(reversed(list(registry_tiny_spec.modules.items()))))
    assert again.fingerprint == registry_tiny_spec.fingerprint
    changed = dict(registry_tiny_spec.modules)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    changed[name] = ModuleShape("linear", 32, 33)
    assert BaseModelSpec(family="sd1", modules=changed).fingerprint != registry_tiny_spec.fingerprint
    assert BaseModelSpec(family="sd2", modules=registry_tiny_spec.modules).fingerprint != registry_tiny_spec.fingerprint
    assert registry_tiny_spec.modules[name] == ModuleShape("linear", 32, 32)
    assert registry_tiny_spec.modules["unet.conv_in"] == ModuleShape("conv2d", 4, 32, (3, 3))


def _header_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "make, code",
    [
        (lambda: b"", "not_safetensors"),
        (lambda: b"abc", "not_safetensors"),
        (lambda: pickle.dumps({"a": 1}, protocol=4), "pickle_refused"),
        (lambda: pickle.dumps({"a": 1}, protocol=2), "pickle_refused"),
        (lambda: torch_save_bytes({"w": torch.zeros(2)}), "pickle_refused"),
        (lambda: struct.pack("<Q", 1 << 40) + b"{}", "not_safetensors"),
        (lambda: struct.pack("<Q", 100) + b"{}", "truncated"),
        (lambda: struct.pack("<Q", 4) + b"nope", "not_safetensors"),
        (lambda: _header_bytes([1, 2]), "not_safetensors"),
        (
            lambda: _header_bytes({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"0000"),
            "invalid_header",
        ),
        (
            lambda: _header_bytes({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"0000"),
            "invalid_header",
        ),
        (
            lambda: _header_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"0000"),
            "invalid_header",
        ),
        (lambda: _header_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"0000"), "truncated"),
        (
            lambda: _header_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"00000000"),
            "invalid_header",
        ),
        (
            lambda: _header_bytes(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                },
                b"00000000",
            ),
            "invalid_header",
        ),
        (lambda: _header_bytes({"__metadata__": {"a": 1}}), "invalid_header"),
    ],
)
def test_read_header_rejects(make, code):
    data = make()
    with pytest.raises(InvalidAdapterError) as e:
        read_header(data, len(data))
    assert e.value.code == code


def test_read_header_truncated_names_tensors_past_the_end():
    data = to_bytes({"a": torch.zeros(4), "b": torch.ones(4)})
    with pytest.raises(InvalidAdapterError) as e:
        read_header(data[:-6], len(data) - 6)
    assert e.value.code == "truncated"
    assert e.value.keys == ["b"]


def test_read_header_reads_only_the_header_from_a_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(to_bytes({"w": torch.arange(6, dtype=torch.float16).reshape(2, 3)}, {"k": "v"}))

    class CountingFile:
        def __init__(self, f):
            self.f, self.read_bytes = f, 0

        def seek(self, *a):
            return self.f.seek(*a)

        def read(self, n):
            out = self.f.read(n)
            self.read_bytes += len(out)
            return out

    with open(path, "rb") as f:
        counting = CountingFile(f)
        header = read_header(counting, path.stat().st_size)
    assert header.metadata == {"k": "v"}
    (entry,) = header.tensors.values()
    assert (entry.name, entry.dtype, entry.shape, entry.start, entry.end) == ("w", "F16", (2, 3), 0, 12)
    assert counting.read_bytes == header.data_offset  # the 12 data bytes were not read


def test_write_safetensors_is_deterministic_and_readable():
    import safetensors.torch

    tensors = {"b": torch.ones(2, 3, dtype=torch.float16), "a": torch.tensor(2.0)}
    one = write_safetensors(tensors, {"z": "1", "a": "2"})
    two = write_safetensors(dict(reversed(tensors.items())), {"a": "2", "z": "1"})
    assert one == two
    back = safetensors.torch.load(one)
    assert back["a"].shape == () and float(back["a"]) == 2.0
    assert torch.equal(back["b"], tensors["b"])
    assert read_header(one, len(one)).metadata == {"a": "2", "z": "1"}


@pytest.mark.parametrize(
    "keys, expected",
    [
        (["unet.x.lora_A.weight", "unet.x.lora_B.weight"], "diffusers"),
        (["x.lora.down.weight", "x.lora.up.weight"], "diffusers"),
        (["unet.a.attn1.processor.to_q_lora.down.weight"], "diffusers"),
        (["lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight", "lora_unet_x.alpha"], "kohya"),
        (["lora_te_x.lora_down.weight"], "kohya"),
        (["lora_unet_x.hada_w1_a", "lora_unet_x.hada_w1_b", "lora_unet_x.alpha"], "kohya"),  # LyCORIS LoHa
        (["lora_unet_x.lokr_w1", "lora_unet_x.lokr_w2"], "kohya"),  # LyCORIS LoKr
    ],
)
def test_detect_format(keys, expected):
    assert detect_format(keys) == expected


@pytest.mark.parametrize(
    "keys, code",
    [
        (["weight", "bias"], "unknown_format"),
        ([], "unknown_format"),
        (["lora_unet_x.lora_down.weight", "unet.x.lora_A.weight"], "unknown_format"),
        (["base_model.model.x.hada_w1_a", "base_model.model.x.hada_w1_b"], "unsupported_keys"),  # PEFT-keyed LoHa
        (["lora_unet_x.oft_blocks", "lora_unet_x.alpha"], "unsupported_keys"),
    ],
)
def test_detect_format_rejects(keys, code):
    with pytest.raises(InvalidAdapterError) as e:
        detect_format(keys)
    assert e.value.code == code


Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


@pytest.mark.parametrize(
    "keys, module",
    [
        ([f"unet.{Q}.to_q.lora_A.weight", f"unet.{Q}.to_q.lora_B.weight"], f"unet.{Q}.to_q"),
        ([f"{Q}.to_q.lora_A.weight", f"{Q}.to_q.lora_B.weight"], f"unet.{Q}.to_q"),
        ([f"base_model.model.{Q}.to_q.lora_A.weight", f"base_model.model.{Q}.to_q.lora_B.weight"], f"unet.{Q}.to_q"),
        ([f"unet.{Q}.to_q.lora.down.weight", f"unet.{Q}.to_q.lora.up.weight"], f"unet.{Q}.to_q"),
        (
            [f"unet.{Q}.processor.to_out_lora.down.weight", f"unet.{Q}.processor.to_out_lora.up.weight"],
            f"unet.{Q}.to_out.0",
        ),
        (
            [
                "text_encoder.encoder.layers.1.self_attn.k_proj.lora_A.weight",
                "text_encoder.encoder.layers.1.self_attn.k_proj.lora_B.weight",
            ],
            "text_encoder.text_model.encoder.layers.1.self_attn.k_proj",
        ),  # fmt: skip
        (
            [
                "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.down.weight",
                "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.up.weight",
            ],
            "text_encoder.text_model.encoder.layers.1.mlp.fc1",
        ),  # fmt: skip
        (
            [
                "text_encoder.text_model.encoder.layers.2.self_attn.to_v_lora.down.weight",
                "text_encoder.text_model.encoder.layers.2.self_attn.to_v_lora.up.weight",
            ],
            "text_encoder.text_model.encoder.layers.2.self_attn.v_proj",
        ),  # fmt: skip
    ],
)
def test_diffusers_key_styles_map_onto_modules(registry_tiny_spec, keys, module):
    plan = plan_conversion(keys, {}, registry_tiny_spec)
    assert list(plan.modules) == [module]
    assert (plan.modules[module].a_key, plan.modules[module].b_key) == (keys[0], keys[1])
