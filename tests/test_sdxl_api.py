"""SDXL at the edge, in-process: the request fields, sizes, adapters and every API front end on ``builtin:tiny-sdxl``.

The one validation step (``Planner.check_inputs``) turns SDXL's size and crop conditioning into
``DenoiseParams.micro`` and adapters with text_encoder_2 weights into ``EncodeRequest.adapters_2``; SDXL-only
fields on an SD1 model, sizes outside the model's limits and SD1 adapters on SDXL are 422s naming the field and
the limit (or both bases). Adapters come from a fake registry of manifests (their target modules decide where
they go); the HTTP routes run on the real ingress with a fake graph (``ingress_helpers``).
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from deployments.engine.config import LoRAConfig
from deployments.messages import AdapterUse, MicroConditioning
from graph import a1111, openai_images, page
from graph.adapters_api import AdapterResolver
from graph.config import AppConfig, ConfigError, LimitsConfig
from graph.errors import APIError, FieldError
from graph.planning import Planner
from graph.schemas import GenerateRequest, LoRASpec, OpenAIImagesRequest
from graph.validation import GenerationInput, native_input
from lora_registry.errors import AdapterNotFoundError, InvalidAdapterError
from lora_registry.manifest import BaseModelRef, Manifest

from ingress_helpers import ADMIN, app_config, make_ingress

XL_BASE = SimpleNamespace(family="sdxl", fingerprint="xl0000000000000f")
SD1_BASE = BaseModelRef(family="sd1", fingerprint="sd10000000000000")

UNET = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
TE1 = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
TE2 = "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj"


def manifest(name: str, *modules: str, base=None, version: int = 1) -> Manifest:
    base = base or BaseModelRef(XL_BASE.family, XL_BASE.fingerprint)
    return Manifest(
        name=name,
        version=version,
        base_model=base,
        format="canonical",
        source_format="diffusers",
        rank=4,
        alpha=4.0,
        target_modules=tuple(modules),
        has_text_encoder=any(m.startswith("text_encoder") for m in modules),
        dtype="float32",
        sha256="0" * 64,
        size_bytes=1,
        created_at="2026-01-01T00:00:00Z",
    )


class FakeRegistry:
    """``Registry.resolve`` over fixed manifests: "name" is the latest version, "name@v" that one."""

    def __init__(self, *manifests: Manifest, errors: dict | None = None):
        self.manifests = {m.ref: m for m in manifests}
        self.errors = errors or {}

    def resolve(self, ref: str) -> Manifest:
        if ref in self.errors:
            raise self.errors[ref]
        if "@" not in ref:
            versions = [m for m in self.manifests.values() if m.name == ref]
            if versions:
                return max(versions, key=lambda m: m.version)
        if ref in self.manifests:
            return self.manifests[ref]
        raise AdapterNotFoundError(f"no adapter named {ref!r}")


ADAPTERS = FakeRegistry(
    manifest("ink", UNET),  # UNet only
    manifest("pastel", UNET, TE1),  # UNet and the first encoder
    manifest("bold", TE2),  # the second encoder only
    manifest("full", UNET, TE1, TE2),  # all three
    manifest("old", UNET, TE1, base=SD1_BASE),  # an SD1 adapter
    manifest("odd", UNET, "text_encoder_2.text_model.encoder.layers.0.mlp.gate"),  # a module without slots
    errors={"mismatch": InvalidAdapterError("this adapter is for SD1.x, the base is SDXL", code="base_mismatch")},
)


def planner_for(model, limits=LimitsConfig(), name=None) -> Planner:
    info = model["info"]
    name = name or info.name
    resolver = AdapterResolver(ADAPTERS, XL_BASE, LoRAConfig(), served_kind=info.kind, served_name=name)
    return Planner(info, name, limits, model["tokenizer"], resolver)


@pytest.fixture(scope="module")
def xl(tiny_sdxl) -> Planner:
    return planner_for(tiny_sdxl)


@pytest.fixture(scope="module")
def xl_1024(tiny_sdxl) -> Planner:
    """A real SDXL checkpoint's limits: native 1024 (its UNet's sample_size 128 x 8)."""
    return planner_for({**tiny_sdxl, "info": dataclasses.replace(tiny_sdxl["info"], default_side=1024)}, name="sdxl")


@pytest.fixture(scope="module")
def sd1(tiny) -> Planner:
    return planner_for(tiny)


def ask(**fields) -> GenerationInput:
    return GenerationInput(**{"prompt": "a boat", "steps": 4, "seed": 1, **fields})


def refused(planner: Planner, **fields) -> FieldError:
    with pytest.raises(FieldError) as e:
        planner.check_inputs(ask(**fields))
    return e.value


# -- micro-conditioning ---------------------------------------------------------------------


def test_the_models_know_their_kind(tiny, tiny_sdxl):
    assert (tiny["info"].kind, tiny["info"].family, tiny["info"].default_side) == ("sd1", "sd1", 256)
    assert (tiny_sdxl["info"].kind, tiny_sdxl["info"].family, tiny_sdxl["info"].default_side) == ("sdxl", "sdxl", 256)


def test_no_conditioning_fields_leave_every_default(xl):
    plan = xl.check_inputs(ask(width=64, height=128))
    assert plan.micro is None and plan.denoise_params().micro is None
    assert (plan.width, plan.height) == (64, 128)


def test_conditioning_fields_become_denoise_params_micro(xl):
    plan = xl.check_inputs(
        ask(
            width=64,
            height=96,
            original_size=(4096, 2048),
            crops_coords_top_left=(0, 32),
            target_size=(96, 64),
            negative_original_size=(512, 512),
            negative_crops_coords_top_left=(8, 0),
            negative_target_size=(1024, 1024),
        )
    )
    expected = MicroConditioning((4096, 2048), (0, 32), (96, 64), (512, 512), (8, 0), (1024, 1024))
    assert plan.micro == expected and plan.denoise_params().micro == expected
    # diffusers' _get_add_time_ids order: original (h, w), crop (top, left), target (h, w)
    assert plan.micro.time_ids(96, 64) == ((4096, 2048, 0, 32, 96, 64), (512, 512, 8, 0, 1024, 1024))


def test_one_field_keeps_the_others_defaults(xl):
    plan = xl.check_inputs(ask(width=64, height=64, crops_coords_top_left=(16, 0)))
    assert plan.micro == MicroConditioning(crops_coords_top_left=(16, 0))
    assert plan.micro.time_ids(64, 64) == ((64, 64, 16, 0, 64, 64), (64, 64, 16, 0, 64, 64))


def test_the_native_body_carries_the_fields_in_their_order():
    body = GenerateRequest.model_validate_json(
        json.dumps({"prompt": "p", "original_size": [768, 1024], "crops_coords_top_left": [0, 128]})
    )
    canonical = native_input(body, "anonymous")
    assert (canonical.original_size, canonical.crops_coords_top_left, canonical.target_size) == (
        (768, 1024),
        (0, 128),
        None,
    )


MICRO_ERRORS = [
    # fields, canonical field, message (or a part of it); tiny-sdxl: max_side auto = 1024, so pairs up to 4096
    ({"original_size": (64, 64, 64)}, "original_size", "original_size must be [height, width], two integers in"),
    ({"original_size": (64,)}, "original_size", "got [64]"),
    (
        {"target_size": (4097, 64)},
        "target_size",
        "target_size must be [height, width], two integers in [0, 4096] "
        "(4 x limits.max_side: auto for tiny-sdxl), got [4097, 64]",
    ),
    ({"crops_coords_top_left": (-1, 0)}, "crops_coords_top_left", "must be [top, left], two integers in [0, 4096]"),
    ({"negative_crops_coords_top_left": (0, 5000)}, "negative_crops_coords_top_left", "got [0, 5000]"),
    (
        {"negative_original_size": (512, 512)},
        "negative_original_size",
        "negative_original_size needs negative_target_size: SDXL uses the negative sizes only together",
    ),
    ({"negative_target_size": (512, 512)}, "negative_target_size", "needs negative_original_size"),
    (
        {"negative_crops_coords_top_left": (0, 0)},
        "negative_crops_coords_top_left",
        "negative_crops_coords_top_left needs negative_original_size and negative_target_size",
    ),
]


@pytest.mark.parametrize("fields, field, message", MICRO_ERRORS)
def test_bad_conditioning_is_a_422_naming_the_field_and_the_limit(xl, fields, field, message):
    error = refused(xl, **fields)
    assert (error.status, error.code, error.field) == (422, "invalid_value", field)
    assert message in error.message


def test_the_bound_follows_the_model(xl_1024):
    plan = xl_1024.check_inputs(ask(original_size=(8192, 8192)))  # 4 x 2048
    assert plan.micro == MicroConditioning(original_size=(8192, 8192))
    error = refused(xl_1024, original_size=(8193, 8192))
    assert "two integers in [0, 8192] (4 x limits.max_side: auto for sdxl)" in error.message


@pytest.mark.parametrize("field", ["original_size", "crops_coords_top_left", "negative_target_size"])
def test_sdxl_fields_on_an_sd1_model_are_a_422_naming_the_field(sd1, field):
    error = refused(sd1, **{field: (64, 64)})
    assert (error.status, error.code, error.field) == (422, "unsupported_field", field)
    assert error.message == f"{field} is SDXL size conditioning; the served model tiny-sd is sd1, which has none"


def test_sdxl_only_json_types_are_strict():
    for value in (["64", 64], [64.0, 64], [True, 64], "64x64", 64):
        with pytest.raises(ValueError):
            GenerateRequest.model_validate_json(json.dumps({"prompt": "p", "original_size": value}))


# -- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "max_side, native, expected",
    [("auto", 256, 1024), ("auto", 512, 1024), ("auto", 768, 1536), ("auto", 1024, 2048), ("auto", 2048, 2048)]
    + [(768, 1024, 768), (4096, 256, 4096)],
)
def test_max_side_auto_follows_the_model_and_numbers_stay(max_side, native, expected):
    limits = LimitsConfig(max_side=max_side)
    assert limits.max_side_for(native) == expected
    assert limits.for_model(native).max_side == expected


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"max_side": 32}, "limits.max_side: Value error, must be 'auto' or an integer in [64, 4096], got 32"),
        ({"max_side": "huge"}, "limits.max_side: Value error, must be 'auto' or an integer in [64, 4096]"),
        ({"min_side": 1032}, "min_side (1032) must be <= 1024, the least max_side auto gives"),
        ({"min_side": 512, "max_side": 256}, "min_side (512) must be <= max_side (256)"),
    ],
)
def test_bad_side_limits_fail_at_start_naming_the_field(limits, message):
    with pytest.raises(ConfigError) as e:
        AppConfig.load({"limits": limits})
    assert message in str(e.value)


def test_sizes_default_to_the_native_side_and_go_up_to_the_models_limit(xl, xl_1024):
    assert (xl.check_inputs(ask()).width, xl.check_inputs(ask()).height) == (256, 256)
    plan = xl_1024.check_inputs(ask())
    assert (plan.width, plan.height) == (1024, 1024)
    plan = xl_1024.check_inputs(ask(width=2048, height=1536))
    assert (plan.width, plan.height) == (2048, 1536)


@pytest.mark.parametrize(
    "planner, fields, field, message",
    [
        ("xl", {"width": 1032}, "width", "width must be a multiple of 8 in [64, 1024], got 1032 "),
        ("xl_1024", {"height": 2056}, "height", "in [64, 2048], got 2056 (limits.max_side: auto for sdxl)"),
        ("xl_1024", {"width": 56}, "width", "width must be a multiple of 8 in [64, 2048], got 56 (limits.min_side)"),
        ("xl_1024", {"width": 1020}, "width", "width must be a multiple of 8 in [64, 2048], got 1020"),
    ],
)
def test_sizes_outside_the_models_limits_name_the_limit(request_fixture, planner, fields, field, message):
    error = refused(request_fixture(planner), **fields)
    assert (error.status, error.code, error.field) == (422, "invalid_value", field)
    assert message in error.message
    if "1020" in message:  # in range, just not a multiple of 8: no limit to name
        assert error.message.endswith("got 1020")


def test_an_explicit_max_side_is_named_as_set(tiny_sdxl):
    planner = planner_for(tiny_sdxl, LimitsConfig(max_side=512))
    error = refused(planner, width=520)
    assert error.message == "width must be a multiple of 8 in [64, 512], got 520 (limits.max_side)"


@pytest.fixture
def request_fixture(request):
    return request.getfixturevalue


# -- adapters ----------------------------------------------------------------------------------


def test_adapters_go_to_the_parts_they_have_weights_on(xl):
    plan = xl.check_inputs(
        ask(
            prompt="a boat <lora:bold:0.5>",
            loras=(LoRASpec(name="ink", scale=0.25), LoRASpec(name="pastel"), LoRASpec(name="full", scale=2.0)),
        )
    )
    assert plan.applied == (("ink@1", 0.25), ("pastel@1", 1.0), ("full@1", 2.0), ("bold@1", 0.5))
    assert plan.unet_adapters == (("ink@1", 0.25), ("pastel@1", 1.0), ("full@1", 2.0))
    assert plan.text_adapters == (("pastel@1", 1.0), ("full@1", 2.0))  # text_encoder_2. is not text_encoder.
    assert plan.text_adapters_2 == (("full@1", 2.0), ("bold@1", 0.5))
    encode = plan.encode_request()
    assert encode.adapters == (AdapterUse("pastel@1", 1.0), AdapterUse("full@1", 2.0))
    assert encode.adapters_2 == (AdapterUse("full@1", 2.0), AdapterUse("bold@1", 0.5))
    assert plan.denoise_params().adapters == tuple(AdapterUse(r, w) for r, w in plan.unet_adapters)


def test_an_sd1_adapter_on_sdxl_names_both_bases(xl):
    error = refused(xl, loras=(LoRASpec(name="ink"), LoRASpec(name="old")))
    assert (error.status, error.code, error.field) == (422, "adapter_incompatible", "loras[1]")
    assert error.message == (
        f"adapter old@1 is for sd1 (base model {SD1_BASE.fingerprint}); "
        f"this server serves sdxl (tiny-sdxl, base model {XL_BASE.fingerprint})"
    )


def test_text_encoder_2_modules_are_checked_against_the_text_encoder_targets(xl):
    error = refused(xl, loras=(LoRASpec(name="odd"),))
    assert (error.status, error.code, error.field) == (422, "adapter_incompatible", "loras[0]")
    assert "text_encoder_2.text_model.encoder.layers.0.mlp.gate" in error.message and UNET not in error.message
    resolver = AdapterResolver(ADAPTERS, XL_BASE, LoRAConfig(text_encoder_target_modules=("q_proj",)))
    with pytest.raises(FieldError) as e:
        resolver.resolve([LoRASpec(name="bold")])
    assert TE2 in e.value.message  # k_proj: not a target any more


def test_a_base_mismatch_from_the_registry_is_a_422_on_the_field(xl):
    error = refused(xl, prompt="x <lora:mismatch>")
    assert (error.status, error.code, error.field) == (422, "base_mismatch", "prompt")
    assert error.message == "prompt: this adapter is for SD1.x, the base is SDXL"


# -- the front ends ----------------------------------------------------------------------------


def openai(planner: Planner, **body):
    req = OpenAIImagesRequest.model_validate_json(json.dumps({"prompt": "a boat", "steps": 4, **body}))
    inp, names = openai_images.to_input(req, "anonymous")
    try:
        return planner.check_inputs(inp)
    except FieldError as e:
        raise names.translate(e) from e


def test_openai_sizes_default_to_native_and_reach_the_models_limit(xl_1024):
    plan = openai(xl_1024)
    assert (plan.width, plan.height) == (1024, 1024)
    plan = openai(xl_1024, size="2048x1024", model="sdxl:full@1")
    assert (plan.width, plan.height) == (2048, 1024)
    assert plan.applied == plan.text_adapters_2 == (("full@1", 1.0),)
    with pytest.raises(APIError) as e:
        openai(xl_1024, size="4096x4096")
    assert (e.value.status, e.value.field) == (422, "size")
    assert (
        e.value.message
        == "size: width must be a multiple of 8 in [64, 2048], got 4096 (limits.max_side: auto for sdxl)"
    )


def test_openai_model_adapter_incompatible_names_model(xl):
    with pytest.raises(APIError) as e:
        openai(xl, model="tiny-sdxl:old")
    assert (e.value.status, e.value.code, e.value.field) == (422, "adapter_incompatible", "model")
    assert "is for sd1" in e.value.message and "serves sdxl (tiny-sdxl" in e.value.message


def test_a1111_defaults_to_native_and_ignores_conditioning_fields(xl_1024):
    body = {"prompt": "a boat", "steps": 4, "original_size": [4096, 4096], "target_size": [1024, 1024]}
    call = a1111.txt2img_call(
        a1111.Txt2ImgRequest.model_validate_json(json.dumps(body)),
        LimitsConfig(),
        a1111.sampler_table("EulerDiscreteScheduler"),
    )
    plan = xl_1024.check_inputs(call.request)
    assert (plan.width, plan.height, plan.micro) == (1024, 1024, None)
    assert call.ignored == ["original_size", "target_size"]  # named: they would have mattered to SDXL


def test_page_config_follows_the_model():
    config = page.page_config(
        model="sdxl", family="sdxl", default_side=1024, limits=LimitsConfig(), lora=LoRAConfig(), samplers=[]
    )
    assert (config["family"], config["default_side"], config["max_side"]) == ("sdxl", 1024, 2048)
    config = page.page_config(
        model="sd15", default_side=512, limits=LimitsConfig(max_side=768), lora=LoRAConfig(), samplers=[]
    )
    assert (config["family"], config["default_side"], config["max_side"]) == ("sd1", 512, 768)


# -- the HTTP routes on the real ingress (fake graph) ------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory, cache_dir, tiny_sdxl_dir):
    mp = pytest.MonkeyPatch()
    config = app_config(tmp_path_factory.mktemp("sdxl-api"), cache_dir, model={"uri": "builtin:tiny-sdxl"})
    client, ingress = make_ingress(config, mp)
    yield client, ingress
    mp.undo()


MICRO_BODY = {"original_size": [512, 384], "crops_coords_top_left": [0, 16], "target_size": [64, 64]}
MICRO = MicroConditioning((512, 384), (0, 16), (64, 64))


def test_models_list_the_kind_family_and_sizes(served):
    client, _ = served
    (model,) = client.get("/v1/models").json()["data"]
    assert (model["id"], model["kind"], model["family"]) == ("tiny-sdxl", "sdxl", "sdxl")
    assert (model["default_size"], model["max_size"], model["default_scheduler"]) == (
        "256x256",
        "1024x1024",
        "EulerDiscreteScheduler",
    )
    (checkpoint,) = client.get("/sdapi/v1/sd-models").json()
    assert (checkpoint["model_name"], checkpoint["kind"], checkpoint["family"]) == ("tiny-sdxl", "sdxl", "sdxl")


def test_the_page_shows_the_models_defaults(served):
    client, _ = served
    html = client.get("/").text
    config = json.loads(html.split('<script type="application/json" id="config">')[1].split("</script>")[0])
    assert (config["model"], config["family"], config["default_side"], config["max_side"]) == (
        "tiny-sdxl",
        "sdxl",
        256,
        1024,
    )


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/jobs"])
def test_native_routes_carry_the_conditioning(served, path):
    client, ingress = served
    r = client.post(path, json={"prompt": "a boat", "width": 64, "height": 64, "steps": 3, "seed": 2, **MICRO_BODY})
    assert r.status_code in (200, 202), r.text
    plan = ingress.graph.plans[-1] if path == "/v1/generate" else ingress.jobs.submitted[-1]
    assert plan.denoise_params().micro == MICRO and (plan.width, plan.height) == (64, 64)


def test_openai_and_a1111_routes_default_to_the_native_size(served):
    client, ingress = served
    r = client.post("/v1/images/generations", json={"prompt": "a boat", "model": "tiny-sdxl", "steps": 2})
    assert r.status_code == 200, r.text
    assert (ingress.graph.plans[-1].width, ingress.graph.plans[-1].height) == (256, 256)
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a boat", "steps": 2, "original_size": [1024, 1024]})
    assert r.status_code == 200, r.text
    assert (ingress.graph.plans[-1].width, ingress.graph.plans[-1].micro) == (256, None)
    assert json.loads(r.json()["info"])["ignored_fields"] == ["original_size"]


def test_http_errors_name_the_field_and_the_limit(served):
    client, _ = served
    r = client.post("/v1/generate", json={"prompt": "a boat", "original_size": [1024, 1024, 3]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "original_size"
    r = client.post("/v1/generate", json={"prompt": "a boat", "original_size": ["1024", 1024]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "original_size[0]"
    r = client.post("/v1/images/generations", json={"prompt": "a boat", "size": "2048x2048"})
    assert r.status_code == 422 and r.json()["error"] == {  # OpenAI's error shape
        "message": "size: width must be a multiple of 8 in [64, 1024], got 2048 (limits.max_side: auto for tiny-sdxl)",
        "type": "invalid_request_error",
        "param": "size",
        "code": "invalid_value",
    }


def test_a_base_mismatch_at_registration_is_a_422(served, monkeypatch):
    client, ingress = served

    def register(*args):
        raise InvalidAdapterError(
            "this adapter is for SD1.x (its module names fit SD1.x models, not SDXL) but the base model is SDXL",
            code="base_mismatch",
        )

    monkeypatch.setattr(ingress.resolver, "register", register)
    r = client.post("/v1/adapters", headers=ADMIN, files={"file": ("x.safetensors", b"x")}, data={"name": "x"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "base_mismatch" and "SDXL" in r.json()["error"]["message"]


def test_sdxl_fields_on_the_sd1_app_are_a_422_naming_the_field(tmp_path, cache_dir, served):
    with pytest.MonkeyPatch.context() as mp:
        client, _ = make_ingress(app_config(tmp_path, cache_dir), mp)
        r = client.post("/v1/generate", json={"prompt": "a boat", "crops_coords_top_left": [0, 0]})
        (model,) = client.get("/v1/models").json()["data"]
    assert r.status_code == 422 and r.json()["error"] == {
        "code": "unsupported_field",
        "message": "crops_coords_top_left is SDXL size conditioning; the served model tiny-sd is sd1, which has none",
        "field": "crops_coords_top_left",
    }
    assert (model["kind"], model["family"], model["default_size"], model["max_size"]) == (
        "sd1",
        "sd1",
        "256x256",
        "1024x1024",
    )


# -- export-model ------------------------------------------------------------------------------


def test_export_model_of_an_unknown_builtin_names_the_known_ones(tmp_path, capsys):
    from graph.cli import main

    assert main(["export-model", "builtin:tiny-xl", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown builtin model 'builtin:tiny-xl'") and "'builtin:tiny-sdxl'" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()


def test_export_model_writes_an_sdxl_directory_diffusers_loads(tmp_path, cache_dir, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    from deployments.engine.models import check_model_dir, read_model_info
    from graph.cli import main

    out = tmp_path / "tiny-sdxl"
    assert main(["export-model", "builtin:tiny-sdxl", str(out)]) == 0
    check_model_dir(out)
    info = read_model_info(str(out), out)
    assert (info.kind, info.family, info.default_side) == ("sdxl", "sdxl", 256)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out), local_files_only=True)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.unet.config.addition_embed_type == "text_time"
    # the very weights the server loads from the builtin
    served = tiny_sdxl["unet"].state_dict()
    assert all((served[k] == v).all() for k, v in pipe.unet.state_dict().items())
