"""The registry on an SDXL base (issue 17): the spec with two text encoders, kohya files in LDM and diffusers
UNet naming with lora_te1_/lora_te2_, diffusers/PEFT files with text_encoder_2., canonical text_encoder_2
modules, and adapters made for another model family refused with one clear ``base_mismatch`` error."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from lora_registry import InvalidAdapterError, base_model_spec_from_dir, prepare_adapter
from lora_registry.base_model import get_module
from lora_registry.families import REFERENCE_MODELS, reference_spec

from lora_helpers import (
    LOCON_TARGETS,
    SDXL_TEXT_TARGETS,
    kohya_module_to_diffusers,
    kohya_sdxl_state,
    kohya_to_diffusers_state_dict,
)
from registry_helpers import diffusers_state, kohya_state, random_lora, to_bytes

pytest_plugins = ["registry_helpers"]

TINY_SD_FINGERPRINT = "fb17ad1bbd96316ab29817c85d019872"  # what manifests registered before issue 17 hold
TE2_Q = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def sdxl_spec(tiny_sdxl_dir):
    return base_model_spec_from_dir(tiny_sdxl_dir)


@pytest.fixture(scope="module")
def sdxl_unet_config(tiny_sdxl_dir) -> dict:
    return json.loads((tiny_sdxl_dir / "unet" / "config.json").read_text())


def _reference_unet_config(family: str) -> dict:
    (ref,) = [r for r in REFERENCE_MODELS if r.family == family]
    return dict(ref.unet)


def _full_unet_config(config: dict) -> dict:
    """A config as diffusers reads it (defaults filled in), for its SGM mapping's ``layers_per_block``."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return dict(UNet2DConditionModel.from_config(config).config)


# -- the spec ----------------------------------------------------------------------------------------------------


def test_tiny_sd_spec_is_unchanged(registry_tiny_spec):
    assert registry_tiny_spec.family == "sd1"
    assert registry_tiny_spec.fingerprint == TINY_SD_FINGERPRINT
    assert not any(name.startswith("text_encoder_2.") for name in registry_tiny_spec.modules)


def test_sdxl_spec_has_both_text_encoders(sdxl_spec, tiny_sdxl):
    assert sdxl_spec.family == "sdxl" and sdxl_spec.label == "SDXL (tiny-sdxl)"
    te2 = {n: s for n, s in sdxl_spec.modules.items() if n.startswith("text_encoder_2.")}
    assert te2[TE2_Q].in_features == 96 and te2["text_encoder_2.text_projection"].out_features == 96
    assert "text_encoder.text_model.encoder.layers.2.mlp.fc2" in sdxl_spec.modules
    assert sdxl_spec.modules["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"].in_features == 160
    # Every canonical name resolves on the live models (transformers 5 flattens CLIPTextModel, not the other).
    models = {"unet": tiny_sdxl["unet"], "text_encoder": tiny_sdxl["text_encoder"]}
    models["text_encoder_2"] = tiny_sdxl["text_encoder_2"]
    for name, shape in sdxl_spec.modules.items():
        component, _, path = name.partition(".")
        assert get_module(models[component], path).weight.shape == shape.weight_shape, name


def test_spec_from_loaded_models_equals_spec_from_dir(sdxl_spec, tiny_sdxl):
    from lora_registry import base_model_spec

    live = base_model_spec(
        tiny_sdxl["unet"], tiny_sdxl["text_encoder"], text_encoder_2=tiny_sdxl["text_encoder_2"], name="tiny-sdxl"
    )
    assert (live.family, live.fingerprint) == ("sdxl", sdxl_spec.fingerprint)


# -- LDM names ---------------------------------------------------------------------------------------------------

LDM_CASES = {
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.resnets.1.conv2": "input_blocks.2.0.out_layers.3",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.2.attentions.1.transformer_blocks.1.ff.net.2": "input_blocks.8.1.transformer_blocks.1.ff.net.2",
    "mid_block.resnets.0.time_emb_proj": "middle_block.0.emb_layers.1",
    "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
    "mid_block.resnets.1.conv1": "middle_block.2.in_layers.2",
    "up_blocks.0.attentions.0.proj_out": "output_blocks.0.1.proj_out",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


@pytest.mark.parametrize("path, ldm", sorted(LDM_CASES.items()))
def test_ldm_names_tiny_sdxl(sdxl_spec, path, ldm):
    assert sdxl_spec.ldm_unet_names[path] == ldm
    assert sdxl_spec.kohya_names["lora_unet_" + ldm.replace(".", "_")] == "unet." + path
    assert sdxl_spec.kohya_names["lora_unet_" + path.replace(".", "_")] == "unet." + path


@pytest.mark.parametrize("spec_name", ["tiny-sdxl", "sdxl", "sd1", "tiny-sd"])
def test_ldm_names_are_a_bijection_over_every_unet_module(spec_name, sdxl_spec, registry_tiny_spec):
    spec = {"tiny-sdxl": sdxl_spec, "tiny-sd": registry_tiny_spec}.get(spec_name) or reference_spec(spec_name)
    unet = {n.removeprefix("unet.") for n in spec.modules if n.startswith("unet.")}
    names = spec.ldm_unet_names
    assert set(names) == unet
    assert len(set(names.values())) == len(names)
    if spec.family == "sdxl":
        for path, ldm in names.items():
            assert spec.kohya_names["lora_unet_" + ldm.replace(".", "_")] == "unet." + path


def test_sd1_ldm_numbering(registry_tiny_spec):
    """SD1.5's LDM blocks: input_blocks 1..11, middle_block 0..2, output_blocks 0..11, upsamplers after a resnet
    in the attention-less level (output_blocks.2.1.conv) and after an attention elsewhere (.5.2.conv)."""
    names = reference_spec("sd1").ldm_unet_names
    blocks = {tuple(v.split(".")[:2]) for v in names.values()}
    assert {int(i) for b, i in blocks if b == "input_blocks"} == set(range(12))
    assert {int(i) for b, i in blocks if b == "middle_block"} == {0, 1, 2}
    assert {int(i) for b, i in blocks if b == "output_blocks"} == set(range(12))
    assert names["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"
    assert names["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert names["down_blocks.0.attentions.1.proj_in"] == "input_blocks.2.1.proj_in"
    assert names["down_blocks.3.resnets.1.conv2"] == "input_blocks.11.0.out_layers.3"
    # tiny-sd (one resnet per level): the same rules, other numbers.
    tiny = registry_tiny_spec.ldm_unet_names
    assert tiny["down_blocks.0.downsamplers.0.conv"] == "input_blocks.2.0.op"
    assert tiny["up_blocks.0.upsamplers.0.conv"] == "output_blocks.1.1.conv"


def test_ldm_kohya_names_on_sd1_too(registry_tiny_spec):
    """LDM UNet names map on SD1 bases as on SDXL (issue 18: LyCORIS and A1111 extractions write them); SDXL's
    second text encoder stays unknown there."""
    assert (
        registry_tiny_spec.kohya_names["lora_unet_input_blocks_1_1_proj_in"]
        == "unet.down_blocks.0.attentions.0.proj_in"
    )
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" not in registry_tiny_spec.kohya_names


@pytest.mark.parametrize("spec_name", ["tiny-sdxl", "sdxl", "sd1"])
def test_ldm_names_agree_with_diffusers_conversion(spec_name, sdxl_spec, sdxl_unet_config):
    """Every module's LDM kohya name converts, by diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` and
    ``_convert_non_diffusers_lora_to_diffusers``, to the module the registry maps it to. On SD1 diffusers
    numbers the upsampler of an attention-less up level as an attention (it assumes SDXL's layout); that one
    module is the known difference."""
    spec = sdxl_spec if spec_name == "tiny-sdxl" else reference_spec(spec_name)
    config = _full_unet_config(sdxl_unet_config if spec_name == "tiny-sdxl" else _reference_unet_config(spec_name))
    differ = {}
    for path, ldm in spec.ldm_unet_names.items():
        theirs = kohya_module_to_diffusers("lora_unet_" + ldm.replace(".", "_"), config)
        if theirs != "unet." + path:
            differ[path] = theirs
    expected = {"up_blocks.0.upsamplers.0.conv": "unet.up_blocks.0.attentions.2.conv"} if spec_name == "sd1" else {}
    assert differ == expected


# -- kohya and diffusers files on SDXL ---------------------------------------------------------------------------


def _deltas(adapter) -> dict[str, torch.Tensor]:
    return {name: w.delta_weight() for name, w in adapter.modules.items()}


@pytest.mark.parametrize("convention", ["ldm", "diffusers"])
@pytest.mark.parametrize("locon", [False, True], ids=["attention", "locon"])
def test_kohya_sdxl_equals_its_diffusers_conversion(sdxl_spec, sdxl_unet_config, convention, locon):
    kohya = kohya_sdxl_state(sdxl_spec, convention=convention, seed=3, locon=locon)
    converted = kohya_to_diffusers_state_dict(kohya, sdxl_unet_config)
    a = prepare_adapter(to_bytes(kohya), sdxl_spec)
    b = prepare_adapter(to_bytes(converted), sdxl_spec)
    assert (a.source_format, b.source_format) == ("kohya", "diffusers")
    assert len(a.adapter.modules) == len(kohya) // 3
    assert sorted(a.adapter.modules) == sorted(b.adapter.modules)
    assert set(a.adapter.components) == {"unet", "text_encoder", "text_encoder_2"}
    da, db = _deltas(a.adapter), _deltas(b.adapter)
    for name in da:
        torch.testing.assert_close(da[name], db[name], rtol=1e-6, atol=1e-7, msg=name)
    assert any(float(da[name].abs().max()) > 1e-3 for name in da)  # non-zero
    alphas = {w.alpha for w in a.adapter.modules.values()}
    assert alphas == {2.0, 4.0, 8.0}  # each module keeps its own alpha
    if locon:
        assert any(name.endswith(".downsamplers.0.conv") for name in a.adapter.modules)


def test_both_conventions_give_the_same_canonical_adapter(sdxl_spec):
    ldm = prepare_adapter(to_bytes(kohya_sdxl_state(sdxl_spec, convention="ldm", seed=5, locon=True)), sdxl_spec)
    dif = prepare_adapter(to_bytes(kohya_sdxl_state(sdxl_spec, convention="diffusers", seed=5, locon=True)), sdxl_spec)
    assert ldm.sha256 == dif.sha256


def test_text_encoder_2_component(sdxl_spec):
    state = kohya_sdxl_state(sdxl_spec, seed=1, unet_targets=(), text_targets=(), text_2_targets=SDXL_TEXT_TARGETS)
    adapter = prepare_adapter(to_bytes(state), sdxl_spec).adapter
    assert adapter.components == ("text_encoder_2",) and adapter.has_text_encoder
    te2 = adapter.component("text_encoder_2")
    assert "text_model.encoder.layers.0.self_attn.q_proj" in te2 and len(te2) == 3 * 6
    assert adapter.component("text_encoder") == {} and adapter.component("unet") == {}
    w = te2["text_model.encoder.layers.0.self_attn.q_proj"]
    down = state["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"]
    torch.testing.assert_close(w.A, down)
    with pytest.raises(ValueError, match="component must be one of"):
        adapter.component("text_encoder_3")


@pytest.mark.parametrize("flat", [True, False], ids=["flat-names", "text_model-names"])
def test_diffusers_file_with_text_encoder_2(sdxl_spec, flat):
    weights = random_lora(sdxl_spec, seed=2, te_targets=("q_proj", "v_proj"))
    weights.update(
        {
            TE2_Q: (torch.randn(4, 96) * 0.1, torch.randn(96, 4) * 0.1),
            "text_encoder_2.text_projection": (torch.randn(4, 96) * 0.1, torch.randn(96, 4) * 0.1),
        }
    )
    state = diffusers_state(weights, flat_text_encoder=flat)
    if flat:
        state = {k.replace("text_encoder_2.text_model.", "text_encoder_2."): v for k, v in state.items()}
    adapter = prepare_adapter(to_bytes(state), sdxl_spec).adapter
    assert set(adapter.modules) == set(weights)
    assert adapter.component("text_encoder_2").keys() == {
        "text_model.encoder.layers.0.self_attn.q_proj",
        "text_projection",
    }
    torch.testing.assert_close(adapter.modules[TE2_Q].A, weights[TE2_Q][0])


def test_peft_metadata_alpha_for_text_encoder_2(sdxl_spec):
    state = diffusers_state({TE2_Q: (torch.randn(4, 96) * 0.1, torch.randn(96, 4) * 0.1)})
    metadata = {"lora_adapter_metadata": json.dumps({"text_encoder_2.r": 4, "text_encoder_2.lora_alpha": 2})}
    adapter = prepare_adapter(to_bytes(state, metadata), sdxl_spec).adapter
    assert adapter.modules[TE2_Q].alpha == 2.0


def test_kohya_file_loads_into_diffusers_sdxl_pipeline_as_converted(sdxl_spec, sdxl_unet_config, tiny_sdxl_dir):
    """The converted file loads with ``StableDiffusionXLPipeline.load_lora_weights``, and every module's update
    there equals the registry's canonical update for the kohya file (the helper other tests rely on)."""
    from diffusers import StableDiffusionXLPipeline

    kohya = kohya_sdxl_state(sdxl_spec, convention="ldm", seed=7)
    canonical = prepare_adapter(to_bytes(kohya), sdxl_spec).adapter
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
    pipe.load_lora_weights(kohya_to_diffusers_state_dict(kohya, sdxl_unet_config), adapter_name="style")
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    for name, w in canonical.modules.items():
        component, _, path = name.partition(".")
        layer = get_module(models[component], path)
        a, b = layer.lora_A["style"].weight, layer.lora_B["style"].weight
        theirs = layer.scaling["style"] * (b.flatten(1) @ a.flatten(1))
        torch.testing.assert_close(theirs, w.delta_weight().flatten(1), rtol=1e-5, atol=1e-7, msg=name)


# -- another family's adapter --------------------------------------------------------------------------------------


def _refused(data: bytes, spec) -> InvalidAdapterError:
    with pytest.raises(InvalidAdapterError) as e:
        prepare_adapter(data, spec)
    return e.value


def test_sd1_adapter_on_sdxl_base(registry_tiny_spec, sdxl_spec):
    weights = random_lora(registry_tiny_spec, seed=1, te_targets=("q_proj",))
    for data in (to_bytes(diffusers_state(weights)), to_bytes(kohya_state(weights, alpha=4.0))):
        e = _refused(data, sdxl_spec)
        assert (e.status, e.code) == (422, "base_mismatch")
        assert e.message.startswith("this adapter is for SD1.x")
        assert e.message.endswith("but the base model is SDXL (tiny-sdxl)")
        assert "\n" not in e.message and e.keys


def test_sdxl_adapter_on_sd1_base(registry_tiny_spec, sdxl_spec):
    for state in (
        kohya_sdxl_state(sdxl_spec, convention="ldm"),
        kohya_sdxl_state(sdxl_spec, convention="diffusers", unet_targets=(), text_targets=()),  # te2 only
    ):
        e = _refused(to_bytes(state), registry_tiny_spec)
        assert e.code == "base_mismatch"
        assert e.message.startswith("this adapter is for SDXL (its module names fit SDXL models, not SD1.x)")
        assert e.message.endswith("but the base model is SD1.x (tiny-sd)")


def test_full_size_adapters_are_named_by_their_shapes(registry_tiny_spec, sdxl_spec):
    """A real SD1.5 LoRA (768-wide cross attention) and a real SDXL one (2048-wide), as random rank-1 files."""
    sd15 = to_bytes(diffusers_state(random_lora(reference_spec("sd1"), rank=1, unet_targets=("attn2.to_k",))))
    e = _refused(sd15, sdxl_spec)
    assert e.message == (
        "this adapter is for SD1.x (every key and shape fits SD1.5's modules) but the base model is SDXL (tiny-sdxl)"
    )
    sdxl = to_bytes(kohya_sdxl_state(reference_spec("sdxl"), rank=1, unet_targets=("attn2.to_k",), text_targets=()))
    e = _refused(sdxl, registry_tiny_spec)
    assert e.message == (
        "this adapter is for SDXL (every key and shape fits SDXL 1.0's modules) but the base model is SD1.x (tiny-sd)"
    )


def test_own_family_mismatch_keeps_the_precise_error(registry_tiny_spec):
    """An SD1 adapter with a wrong shape on an SD1 base is a shape error, not a family one."""
    weights = random_lora(registry_tiny_spec, seed=1)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    weights[name] = (torch.randn(4, 33), weights[name][1])
    assert _refused(to_bytes(diffusers_state(weights)), registry_tiny_spec).code == "shape_mismatch"
    unknown = {
        "lora_unet_nothing_here.lora_down.weight": torch.zeros(4, 8),
        "lora_unet_nothing_here.lora_up.weight": torch.zeros(8, 4),
    }
    assert _refused(to_bytes(unknown), registry_tiny_spec).code == "unknown_modules"


def test_registry_refuses_with_422_and_stores_nothing(adapter_store, registry_tiny_spec, sdxl_spec, tmp_path):
    from registry_helpers import fresh_registry, store_keys

    registry = fresh_registry(sdxl_spec, tmp_path, adapter_store)
    manifest = registry.register(to_bytes(kohya_sdxl_state(sdxl_spec, seed=9)), name="xl-style")
    assert manifest.base_model.family == "sdxl" and manifest.has_text_encoder
    assert any(m.startswith("text_encoder_2.") for m in manifest.target_modules)
    before = store_keys(adapter_store)
    with pytest.raises(InvalidAdapterError) as e:
        registry.register(to_bytes(diffusers_state(random_lora(registry_tiny_spec))), name="sd1-style")
    assert (e.value.status, e.value.code) == (422, "base_mismatch")
    assert store_keys(adapter_store) == before
    _, loaded = registry.load("xl-style")
    assert loaded.components == ("unet", "text_encoder", "text_encoder_2")


def test_locon_targets_cover_every_conv(sdxl_spec):
    """Every Conv2d of the tiny SDXL UNet is a LoCon target of the helper (so a file can adapt all of them)."""
    convs = {n for n, s in sdxl_spec.modules.items() if n.startswith("unet.") and s.kind == "conv2d"}
    targeted = {n for n in convs if n.endswith(LOCON_TARGETS)}
    assert targeted == convs


def test_round_trip_through_safetensors_file(sdxl_spec, tmp_path):
    from lora_helpers import write_kohya_sdxl_file

    path = write_kohya_sdxl_file(sdxl_spec, tmp_path / "style.safetensors", seed=4)
    state = safetensors.torch.load_file(str(path))
    assert any(k.startswith("lora_te2_") for k in state) and any("input_blocks_" in k for k in state)
    assert prepare_adapter(path.read_bytes(), sdxl_spec).source_format == "kohya"
