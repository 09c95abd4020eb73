"""The ControlNet extension's IP-Adapter unit on A1111's API (graph/a1111_controlnet.py), in-process: the unit's
shapes as the extension and webuiapi send them, mapped onto ``style_image`` / ``style_scale``; what is refused,
naming the unit's field; the planner's style errors renamed into the unit's fields.
(Over real HTTP with the webuiapi client: tests/test_e2e_a1111_controlnet.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import webuiapi
from PIL import Image

from graph import a1111, a1111_controlnet
from graph.config import LimitsConfig
from graph.errors import APIError, FieldError
from graph.style_inputs import StyleSupport, check_style_inputs

from conftest import make_plan
from image_helpers import png_b64

SAMPLERS = a1111.sampler_table("PNDMScheduler")
LIMITS = LimitsConfig()
STYLE = png_b64(np.full((32, 48, 3), 200, np.uint8))


def unit(**fields) -> dict:
    return {"enabled": True, "module": "ip-adapter_clip_h", "model": "ip-adapter_sd15 [6a3f6166]", **fields}


def call_of(*units, key: str = "ControlNet", **fields) -> a1111.NativeCall:
    body = a1111.Txt2ImgRequest(prompt="a boat", alwayson_scripts={key: {"args": list(units)}}, **fields)
    return a1111.txt2img_call(body, LIMITS, SAMPLERS)


def refused(*units, **fields) -> APIError:
    with pytest.raises(APIError) as e:
        call_of(*units, **fields)
    assert e.value.status == 422 and "\n" not in e.value.message
    return e.value


# -- what maps ------------------------------------------------------------------------------------


def test_an_ip_adapter_unit_is_the_style_image_and_its_weight_the_scale():
    call = call_of(unit(image=STYLE, weight=0.8))
    assert call.request.style_image == STYLE and call.request.style_scale == 0.8
    assert call.style == a1111_controlnet.StyleUnit(
        "alwayson_scripts.ControlNet.args[0]", STYLE, 0.8, "ip-adapter_clip_h", "ip-adapter_sd15 [6a3f6166]"
    )
    assert call.ignored == []  # the ControlNet script is read, not ignored


def test_webuiapis_controlnet_unit_maps_as_sent():
    """The client's own ``ControlNetUnit.to_dict()`` (raw base64 PNG, its defaults: processor_res 512,
    threshold 64, "Resize and Fill", control_mode 0 -> "Balanced", mask None)."""
    picture = Image.fromarray(np.full((16, 16, 3), 90, np.uint8))
    sent = webuiapi.ControlNetUnit(image=picture, module="ip-adapter_clip_sd15", model="ip-adapter_sd15", weight=0.6)
    call = call_of(sent.to_dict())
    assert call.request.style_scale == 0.6
    assert call.request.style_image == webuiapi.raw_b64_img(picture)


@pytest.mark.parametrize(
    "shape",
    [
        {"image": STYLE},
        {"input_image": STYLE},  # the extension's legacy alias
        {"image": {"image": STYLE, "mask": None}},
        {"image": [STYLE, None]},
        {"image": [{"image": STYLE, "mask": None}]},
        {"image": "data:image/png;base64," + STYLE},
    ],
)
def test_the_extensions_image_shapes(shape):
    expected = shape["image"] if isinstance(shape.get("image"), str) else STYLE
    assert call_of(unit(**shape)).request.style_image == expected


def test_without_weight_the_scale_is_the_extensions_default_and_without_enabled_the_unit_counts():
    fields = {k: v for k, v in unit(image=STYLE).items() if k != "enabled"}
    call = call_of(fields)
    assert call.request.style_image == STYLE and call.request.style_scale == 1.0


@pytest.mark.parametrize("key", ["controlnet", "ControlNet", "CONTROLNET"])
def test_the_script_key_in_any_case(key):
    assert call_of(unit(image=STYLE), key=key).style.field == f"alwayson_scripts.{key}.args[0]"


def test_disabled_units_and_non_unit_args_are_skipped():
    canny = {"enabled": False, "module": "canny", "model": "control_v11p_sd15_canny", "image": STYLE}
    call = call_of(True, canny, unit(image=STYLE, weight=0.5))
    assert call.request.style_scale == 0.5 and call.style.field == "alwayson_scripts.ControlNet.args[2]"
    assert call_of(canny).request.style_image is None


def test_no_controlnet_script_or_empty_args_leave_no_style():
    for scripts in ({}, {"ControlNet": {"args": []}}, {"ADetailer": {"args": [False]}}):
        call = a1111.txt2img_call(a1111.Txt2ImgRequest(prompt="a", alwayson_scripts=scripts), LIMITS, SAMPLERS)
        assert call.request.style_image is None and call.request.style_scale is None and call.style is None


def test_other_scripts_are_still_reported_as_ignored_beside_controlnet():
    scripts = {"ControlNet": {"args": [unit(image=STYLE)]}, "ADetailer": {"args": [True, {"ad_model": "face"}]}}
    call = a1111.txt2img_call(a1111.Txt2ImgRequest(prompt="a", alwayson_scripts=scripts), LIMITS, SAMPLERS)
    assert call.ignored == ["alwayson_scripts"]


def test_img2img_keeps_the_style():
    body = a1111.Img2ImgRequest(
        prompt="a",
        init_images=[png_b64(np.zeros((64, 64, 3), np.uint8))],
        alwayson_scripts={"controlnet": {"args": [unit(image=STYLE, weight=1.5)]}},
    )
    call = a1111.img2img_call(body, LIMITS, SAMPLERS)
    assert call.mode == "img2img" and call.request.style_image == STYLE and call.request.style_scale == 1.5


# -- what is refused ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "units, field, text",
    [
        (
            [{"enabled": True, "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]", "image": STYLE}],
            "alwayson_scripts.ControlNet.args[0].module",
            "'canny'",
        ),
        (
            [unit(image=STYLE), {"module": "depth_midas", "model": "control_depth", "image": STYLE}],
            "alwayson_scripts.ControlNet.args[1].module",
            "not served",
        ),
        (
            [{"enabled": True, "module": "none", "model": "None"}],
            "alwayson_scripts.ControlNet.args[0].module",
            "IP-Adapter",
        ),
        (
            [unit(image=STYLE, module="ip-adapter_face_id_plus", model="ip-adapter-faceid-plusv2_sd15")],
            "alwayson_scripts.ControlNet.args[0].module",
            "face_id",
        ),
        (
            [unit(image=STYLE, model="ip-adapter-full-face_sd15")],
            "alwayson_scripts.ControlNet.args[0].model",
            "full-face",
        ),
        ([unit(image=STYLE), unit(image=STYLE)], "alwayson_scripts.ControlNet.args[1]", "one IP-Adapter unit"),
        ([unit()], "alwayson_scripts.ControlNet.args[0].image", "needs an image"),
        ([unit(image="")], "alwayson_scripts.ControlNet.args[0].image", "needs an image"),
        ([unit(image=[STYLE, STYLE, STYLE])], "alwayson_scripts.ControlNet.args[0].image", "got 3 images"),
        ([unit(image=[{"image": STYLE}, {"image": STYLE}])], "alwayson_scripts.ControlNet.args[0].image", "got 2"),
        ([unit(image=STYLE, mask=STYLE)], "alwayson_scripts.ControlNet.args[0].mask", "masks"),
        ([unit(image={"image": STYLE, "mask": STYLE})], "alwayson_scripts.ControlNet.args[0].mask", "masks"),
        ([unit(image=7)], "alwayson_scripts.ControlNet.args[0].image", "int"),
        ([unit(image=STYLE, guidance_start=0.2)], "alwayson_scripts.ControlNet.args[0].guidance_start", "every step"),
        ([unit(image=STYLE, guidance_end=0.5)], "alwayson_scripts.ControlNet.args[0].guidance_end", "every step"),
        ([unit(image=STYLE, guidance_end="1")], "alwayson_scripts.ControlNet.args[0].guidance_end", "number"),
        (
            [unit(image=STYLE, control_mode="ControlNet is more important")],
            "alwayson_scripts.ControlNet.args[0].control_mode",
            "Balanced",
        ),
        (
            [unit(image=STYLE, advanced_weighting=[1.0] * 16)],
            "alwayson_scripts.ControlNet.args[0].advanced_weighting",
            "style_scale",
        ),
        (
            [unit(image=STYLE, effective_region_mask=STYLE)],
            "alwayson_scripts.ControlNet.args[0].effective_region_mask",
            "not served",
        ),
        ([unit(image=STYLE, enabled="yes")], "alwayson_scripts.ControlNet.args[0].enabled", "true or false"),
        ([unit(image=STYLE, module=3)], "alwayson_scripts.ControlNet.args[0].module", "text"),
    ],
)
def test_what_is_not_served_is_a_422_naming_the_units_field(units, field, text):
    error = refused(*units)
    assert error.field == field and text in error.message and error.message.startswith(field)


def test_a_malformed_script_is_a_422():
    for scripts, field in (
        ({"ControlNet": [unit()]}, "alwayson_scripts.ControlNet"),
        ({"ControlNet": {"args": {"0": unit()}}}, "alwayson_scripts.ControlNet.args"),
    ):
        with pytest.raises(APIError) as e:
            a1111.txt2img_call(a1111.Txt2ImgRequest(prompt="a", alwayson_scripts=scripts), LIMITS, SAMPLERS)
        assert e.value.field == field


def test_balanced_and_full_guidance_are_accepted_in_the_extensions_forms():
    for extra in (
        {"control_mode": 0},
        {"control_mode": "Balanced"},
        {"guidance_start": 0, "guidance_end": 1},
        {"resize_mode": "Crop and Resize", "processor_res": 512, "pixel_perfect": True, "hr_option": "Both"},
    ):
        assert call_of(unit(image=STYLE, **extra)).request.style_image == STYLE


# -- the planner's style errors, in the unit's names -------------------------------------------------


SUPPORT = StyleSupport("plain", {"down": (0, 1), "up": (1, 2)}, {"down": 1, "up": 2}, True)


def translated(call: a1111.NativeCall) -> APIError:
    with pytest.raises(FieldError) as e:
        check_style_inputs(call.request, LIMITS, SUPPORT, "tiny-sd")
    return call.names.translate(e.value)


@pytest.mark.parametrize(
    "fields, field, text",
    [
        (
            {"weight": 2.5},
            "alwayson_scripts.ControlNet.args[0].weight",
            "alwayson_scripts.ControlNet.args[0].weight must be in [0, 2.0], got 2.5",
        ),
        ({"weight": "strong"}, "alwayson_scripts.ControlNet.args[0].weight", "must be a number"),
        (
            {"image": "not base64!"},
            "alwayson_scripts.ControlNet.args[0].image",
            "alwayson_scripts.ControlNet.args[0].image",
        ),
    ],
)
def test_the_planners_style_errors_name_the_units_fields(fields, field, text):
    error = translated(call_of(unit(**{"image": STYLE, **fields})))
    assert error.status == 422 and error.field == field and text in error.message


def test_style_unsupported_names_the_units_image():
    call = call_of(unit(image=STYLE))
    with pytest.raises(FieldError) as e:
        check_style_inputs(call.request, LIMITS, None, "tiny-sd")
    error = call.names.translate(e.value)
    assert error.code == "style_image_unsupported" and error.field == "alwayson_scripts.ControlNet.args[0].image"


def test_other_fields_keep_their_a1111_names_beside_the_units():
    names = call_of(unit(image=STYLE)).names
    assert names.outward("guidance_scale") == "cfg_scale" and names.outward("style_scale") == (
        "alwayson_scripts.ControlNet.args[0].weight"
    )


# -- the answer --------------------------------------------------------------------------------------


def test_the_infotext_names_the_unit_and_the_ip_adapter_that_ran():
    body = a1111.Txt2ImgRequest(
        prompt="a boat", seed=3, alwayson_scripts={"ControlNet": {"args": [unit(image=STYLE, weight=0.7)]}}
    )
    call = a1111.txt2img_call(body, LIMITS, SAMPLERS)
    plan = make_plan(seed=3, num_images=1)
    out = a1111.a1111_response(
        body, call, plan, [b"png"], "tiny-sd", "0123456789", style_model="ip-adapter_tiny-sd [01234567]"
    )
    info = json.loads(out["info"])
    expected = "Module: ip-adapter_clip_h, Model: ip-adapter_tiny-sd [01234567], Weight: 0.7"
    assert info["extra_generation_params"]["ControlNet 0"] == expected
    assert f"ControlNet 0: {expected}" in info["infotexts"][0]


# -- GET /controlnet/... --------------------------------------------------------------------------------


def test_listings():
    assert a1111_controlnet.version() == {"version": 3}
    assert a1111_controlnet.model_name("tiny-sd", "plain", "abcdef0123") == "ip-adapter_tiny-sd [abcdef01]"
    modules = a1111_controlnet.module_list(True)
    assert modules["module_list"] == ["ip-adapter-auto", "ip-adapter_clip_h", "ip-adapter_clip_g"]
    assert set(modules["module_detail"]) == set(modules["module_list"])
    assert a1111_controlnet.module_list(False) == {"module_list": [], "module_detail": {}}


# -- the routes, in-process (the app with a fake graph) -------------------------------------------------------


@pytest.fixture
def styled(tmp_path, cache_dir):
    from ingress_helpers import app_config, make_ingress

    mp = pytest.MonkeyPatch()
    client, ingress = make_ingress(app_config(tmp_path, cache_dir, model={"ip_adapter": {"variant": "plus"}}), mp)
    yield client, ingress
    mp.undo()


def test_routes_list_the_served_ip_adapter_and_txt2img_takes_the_unit(styled):
    client, ingress = styled
    assert client.get("/controlnet/version").json() == {"version": 3}
    models = client.get("/controlnet/model_list").json()["model_list"]
    assert len(models) == 1 and models[0].startswith("ip-adapter-plus_tiny-sd [")
    assert client.get("/controlnet/module_list").json()["module_list"] == list(a1111_controlnet.MODULES)
    body = {
        "prompt": "a",
        "steps": 2,
        "width": 64,
        "height": 64,
        "alwayson_scripts": {"ControlNet": {"args": [unit(image=STYLE, weight=0.4, model=models[0])]}},
    }
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    plan = ingress.graph.plans[-1]
    assert plan.style_scale == 0.4 and plan.style_image.pixels.shape == (32, 48, 3)
    assert json.loads(r.json()["info"])["extra_generation_params"]["ControlNet 0"] == (
        f"Module: ip-adapter_clip_h, Model: {models[0]}, Weight: 0.4"
    )
    body["alwayson_scripts"]["ControlNet"]["args"][0]["weight"] = 2.5
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 422 and r.json()["error"]["field"] == "alwayson_scripts.ControlNet.args[0].weight"


def test_without_ip_adapter_the_lists_are_empty_and_a_unit_is_unsupported(tmp_path, cache_dir):
    from ingress_helpers import app_config, make_ingress

    mp = pytest.MonkeyPatch()
    try:
        client, _ = make_ingress(app_config(tmp_path, cache_dir), mp)
        assert client.get("/controlnet/model_list").json() == {"model_list": []}
        assert client.get("/controlnet/module_list").json()["module_list"] == []
        body = {"prompt": "a", "steps": 2, "alwayson_scripts": {"controlnet": {"args": [unit(image=STYLE)]}}}
        error = client.post("/sdapi/v1/txt2img", json=body).json()["error"]
        assert (error["code"], error["field"]) == (
            "style_image_unsupported",
            "alwayson_scripts.controlnet.args[0].image",
        )
    finally:
        mp.undo()
