"""The AUTOMATIC1111 translation (graph/a1111.py) and the page's static files (graph/page.py), in-process.

(How its errors come out in A1111's names, through the one validation step: tests/test_validation.py.)"""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from pydantic import ValidationError

from graph import a1111, page
from graph.config import LimitsConfig
from graph.errors import APIError
from graph.planning import Plan
from graph.validation import GenerationInput

from image_helpers import png_b64

SAMPLERS = a1111.sampler_table("PNDMScheduler")
LIMITS = LimitsConfig()


# -- samplers -----------------------------------------------------------------------------


# The sampler table, names, schedules and their errors: tests/test_samplers_names.py.


# -- txt2img ------------------------------------------------------------------------------


def test_txt2img_defaults_are_a1111s():
    call = a1111.txt2img_call(a1111.Txt2ImgRequest(prompt="a boat"), LIMITS, SAMPLERS, tenant="user:x")
    assert call.mode == "txt2img"
    assert call.request == GenerationInput(
        prompt="a boat",
        negative_prompt="",
        model=None,
        width=None,
        height=None,
        steps=50,
        guidance_scale=7.0,
        seed=None,
        num_images=1,
        scheduler="euler",
        output_format="png",
        loras=(),
        tenant="user:x",
    )
    assert call.sampler.name == "Euler" and call.ignored == []


@pytest.mark.parametrize(
    "fields, renamed",
    [
        ({}, {"guidance_scale": "cfg_scale", "num_images": "batch_size", "scheduler": "sampler_index"}),
        ({"sampler_name": "DDIM"}, {"scheduler": "sampler_name"}),
        ({"batch_size": 2, "n_iter": 3}, {"num_images": "n_iter"}),  # the factor that went over the limit
        ({"batch_size": 9, "n_iter": 3}, {"num_images": "batch_size"}),
        ({"init_images": ["x"]}, {"image": "init_images", "strength": "denoising_strength", "mask": "mask"}),
        ({}, {"prompt": "prompt", "width": "width", "steps": "steps", "seed": "seed"}),
    ],
)
def test_native_fields_are_named_back_in_a1111s_names(fields, renamed):
    cls = a1111.Img2ImgRequest if "init_images" in fields else a1111.Txt2ImgRequest
    call = (a1111.img2img_call if "init_images" in fields else a1111.txt2img_call)(
        cls(prompt="p", **fields), LIMITS, SAMPLERS
    )
    assert {native: call.names.outward(native) for native in renamed} == renamed


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"seed": 7}, {"seed": 7}),
        ({"seed": -1}, {"seed": None}),
        ({"seed": None}, {"seed": None}),
        ({"seed": 2**32 - 1}, {"seed": 2**32 - 1}),
        ({"batch_size": 2, "n_iter": 3}, {"num_images": 6}),
        ({"cfg_scale": 3}, {"guidance_scale": 3}),
        ({"sampler_index": "DDIM"}, {"scheduler": "ddim"}),
        ({"sampler_index": "DDIM", "sampler_name": "Euler a"}, {"scheduler": "euler_a"}),
        ({"width": 64, "height": 128, "steps": 3}, {"width": 64, "height": 128, "steps": 3}),
        ({"negative_prompt": "fog"}, {"negative_prompt": "fog"}),
    ],
)
def test_txt2img_mapping(fields, expected):
    call = a1111.txt2img_call(a1111.Txt2ImgRequest(prompt="p", **fields), LIMITS, SAMPLERS)
    assert {k: getattr(call.request, k) for k in expected} == expected


@pytest.mark.parametrize(
    "fields, field, text",
    [
        ({"sampler_index": "Nope"}, "sampler_index", "unknown sampler 'Nope'"),
        ({"sampler_name": "Nope"}, "sampler_name", "unknown sampler 'Nope'"),
    ],
)
def test_unknown_samplers_are_refused_naming_the_a1111_field(fields, field, text):
    with pytest.raises(APIError) as e:
        a1111.txt2img_call(a1111.Txt2ImgRequest(prompt="p", **fields), LIMITS, SAMPLERS)
    assert (e.value.status, e.value.field) == (422, field)
    assert text in e.value.message


@pytest.mark.parametrize(
    "fields, loc",
    [
        ({"steps": "20"}, "steps"),
        ({"seed": -2}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"batch_size": 0}, "batch_size"),
        ({"cfg_scale": -1}, "cfg_scale"),
        ({"width": 64.0}, "width"),
        ({"send_images": "yes"}, "send_images"),
    ],
)
def test_implemented_fields_are_strictly_typed(fields, loc):
    with pytest.raises(ValidationError) as e:
        a1111.Txt2ImgRequest(prompt="p", **fields)
    assert e.value.errors()[0]["loc"][0] == loc


def test_unimplemented_fields_are_ignored_and_reported_unless_neutral():
    req = a1111.Txt2ImgRequest.model_validate(
        {
            "prompt": "p",
            # A1111 defaults: no effect there either, not reported
            "styles": [],
            "override_settings": {},
            "scheduler": "automatic",
            "eta": None,
            "seed_resize_from_w": 0,
            "s_tmax": 0,
            "mask_blur": 4,
            "override_settings_restore_afterwards": False,  # acts only with override_settings
            "denoising_strength": 0.7,  # acts only with enable_hr
            "hr_scale": 4.0,
            "scheduler_x": 0,  # an extension's field, falsy: not reported
            # would change the image in A1111: reported
            "tiling": True,
            "seed_resize_from_h": 256,
            "enable_hr": True,
            "restore_faces": 1,
            "my_extension": {"a": 1},
        }
    )
    assert a1111.ignored_fields(req) == ["enable_hr", "my_extension", "restore_faces", "seed_resize_from_h", "tiling"]
    req = a1111.Txt2ImgRequest(prompt="p", scheduler="Karras", override_settings={"CLIP_stop_at_last_layers": 2})
    assert a1111.txt2img_call(req, LIMITS, SAMPLERS).ignored == ["override_settings"]  # scheduler: implemented


# -- img2img ------------------------------------------------------------------------------


def test_img2img_maps_to_the_native_img2img_request():
    image = png_b64(np.zeros((16, 8, 3), np.uint8), data_url=True)
    req = a1111.Img2ImgRequest(prompt="p", init_images=[image], denoising_strength=0.4, seed=3, steps=4)
    call = a1111.img2img_call(req, LIMITS, SAMPLERS)
    assert call.mode == "img2img"
    assert call.request.image == image and call.request.strength == 0.4
    r = call.request
    assert (r.width, r.height, r.seed, r.steps, r.mask, r.invert_mask) == (None, None, 3, 4, None, False)
    sized = a1111.Img2ImgRequest(prompt="p", init_images=[image], width=64)
    assert a1111.img2img_call(sized, LIMITS, SAMPLERS).request.width == 64
    assert a1111.Img2ImgRequest(prompt="p", init_images=[image]).denoising_strength == 0.75


@pytest.mark.parametrize("invert, inverted", [(0, False), (False, False), (1, True), (True, True)])
def test_img2img_with_a_mask_is_inpainting_and_invert_is_left_to_the_decoding(invert, inverted):
    # The mask is passed on as sent: the one decoding path inverts it (tests/test_image_decoding.py).
    image, mask = png_b64(np.zeros((8, 8, 3), np.uint8)), png_b64(np.zeros((8, 8), np.uint8))
    req = a1111.Img2ImgRequest(prompt="p", init_images=[image], mask=mask, inpainting_mask_invert=invert)
    call = a1111.img2img_call(req, LIMITS, SAMPLERS)
    assert call.mode == "inpaint"
    assert (call.request.mask, call.request.invert_mask, call.request.preserve_unmasked) == (mask, inverted, True)
    assert call.request.strength == 0.75


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"init_images": []}, "init_images"),
        ({"init_images": ["a", "b"]}, "init_images"),
        ({"inpainting_mask_invert": 2}, "inpainting_mask_invert"),
    ],
)
def test_img2img_translation_errors(fields, field):
    body = {"prompt": "p", "init_images": ["aW1n"], **fields}
    with pytest.raises(APIError) as e:
        a1111.img2img_call(a1111.Img2ImgRequest(**body), LIMITS, SAMPLERS)
    assert (e.value.status, e.value.field, e.value.code) == (422, field, "invalid_value")


@pytest.mark.parametrize("strength", [0, -0.1, 1.01])
def test_denoising_strength_is_in_0_1(strength):
    with pytest.raises(ValidationError) as e:
        a1111.Img2ImgRequest(prompt="p", init_images=["x"], denoising_strength=strength)
    assert e.value.errors()[0]["loc"] == ("denoising_strength",)


def test_init_images_is_required():
    with pytest.raises(ValidationError) as e:
        a1111.Img2ImgRequest(prompt="p")
    assert e.value.errors()[0]["loc"] == ("init_images",) and e.value.errors()[0]["type"] == "missing"


# -- the answer ---------------------------------------------------------------------------


def plan_for(call, seed=40, width=64, height=64, applied=()):
    r = call.request
    return Plan(
        prompt=r.prompt,
        negative_prompt=r.negative_prompt,
        width=width,
        height=height,
        steps=r.steps,
        guidance_scale=r.guidance_scale,
        seed=seed,
        num_images=r.num_images,
        scheduler=r.scheduler,
        output_format="png",
        applied=applied,
    )


def test_response_has_images_parameters_and_info():
    req = a1111.Txt2ImgRequest(
        prompt="a boat <lora:ink:0.5>", negative_prompt="fog", seed=-1, steps=4, batch_size=2, n_iter=2, tiling=True
    )
    call = a1111.txt2img_call(req, LIMITS, SAMPLERS)
    plan = plan_for(call, applied=(("ink@2", 0.5),))
    out = a1111.a1111_response(req, call, plan, [b"a", b"b", b"c", b"d"], "tiny-sd", "0123456789")
    assert out["images"] == [base64.b64encode(x).decode() for x in (b"a", b"b", b"c", b"d")]
    params = out["parameters"]
    assert params["prompt"] == "a boat <lora:ink:0.5>" and params["seed"] == -1
    assert (params["width"], params["height"], params["steps"], params["batch_size"]) == (64, 64, 4, 2)
    assert params["tiling"] is True  # echoed as sent, though ignored
    info = json.loads(out["info"])
    assert info["seed"] == 40 and info["all_seeds"] == [40, 41, 42, 43]
    assert info["all_prompts"] == ["a boat <lora:ink:0.5>"] * 4
    assert (info["sampler_name"], info["cfg_scale"], info["steps"]) == ("Euler", 7.0, 4)
    assert (info["width"], info["height"], info["sd_model_name"], info["sd_model_hash"]) == (
        64,
        64,
        "tiny-sd",
        "0123456789",
    )
    assert info["loras"] == [{"ref": "ink@2", "scale": 0.5}]
    assert info["ignored_fields"] == ["tiling"]
    assert info["infotexts"][1] == (
        "a boat <lora:ink:0.5>\nNegative prompt: fog\n"
        "Steps: 4, Sampler: Euler, Schedule type: Automatic, CFG scale: 7.0, Seed: 41, Size: 64x64, "
        "Model hash: 0123456789, Model: tiny-sd, Lora: ink@2:0.5, Version: lorafleet"
    )
    quiet = a1111.Txt2ImgRequest(prompt="p", send_images=False)
    call = a1111.txt2img_call(quiet, LIMITS, SAMPLERS)
    assert a1111.a1111_response(quiet, call, plan_for(call), [b"a"], "m", "h")["images"] == []


def test_img2img_response_leaves_the_images_out_of_parameters():
    image = png_b64(np.zeros((8, 8, 3), np.uint8))
    req = a1111.Img2ImgRequest(prompt="p", init_images=[image], mask=image, denoising_strength=0.5)
    call = a1111.img2img_call(req, LIMITS, SAMPLERS)
    out = a1111.a1111_response(req, call, plan_for(call), [b"x"], "m", "h")
    assert out["parameters"]["init_images"] is None and out["parameters"]["mask"] is None
    assert out["parameters"]["denoising_strength"] == 0.5
    info = json.loads(out["info"])
    assert info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in info["infotexts"][0]


# -- models and adapters ------------------------------------------------------------------


def test_sd_models_entry():
    [entry] = a1111.sd_models("tiny-sd", "builtin:tiny-sd", a1111.model_hash("fp"), "fp")
    assert entry["title"] == f"tiny-sd [{a1111.model_hash('fp')}]"
    assert re.fullmatch(r"[0-9a-f]{10}", entry["hash"]) and entry["sha256"].startswith(entry["hash"])
    assert (entry["model_name"], entry["filename"]) == ("tiny-sd", "builtin:tiny-sd")


def listing(name, versions, description="", trigger_words=(), tags=()):
    latest = {
        "name": name,
        "version": versions[-1],
        "description": description,
        "trigger_words": list(trigger_words),
        "tags": list(tags),
        "rank": 4,
        "has_text_encoder": False,
        "base_model": {"family": "sd1", "fingerprint": "f"},
        "source_format": "kohya",
        "created_at": "2025-01-01T00:00:00Z",
        "sha256": "secret-ish",
        "target_modules": ["unet.x"],
    }
    return {"name": name, "latest": latest, "versions": list(versions)}


class FakeResolver:
    """Pages of ``page_size`` names, like AdapterResolver.list; records its calls."""

    def __init__(self, listings, page_size):
        self.listings, self.page_size, self.calls = listings, page_size, []

    def list(self, tag, limit, after):
        self.calls.append((tag, limit, after))
        names = [x for x in self.listings if after is None or x["name"] > after]
        page = names[: self.page_size]
        more = len(names) > self.page_size
        return {"data": page, "next": page[-1]["name"] if more else None}


def test_loras_lists_every_page_with_public_metadata():
    resolver = FakeResolver(
        [
            listing("ink", [1, 3], "ink wash", ["ink style", "brush"], ["art"]),
            listing("oil", [2]),
            listing("zebra", [1]),
        ],
        page_size=2,
    )
    entries = a1111.list_loras(resolver)
    assert resolver.calls == [(None, 1000, None), (None, 1000, "oil")]
    assert [e["name"] for e in entries] == ["ink", "oil", "zebra"]
    assert entries[0] == {
        "name": "ink",
        "alias": "ink",
        "path": "ink@3",
        "metadata": {
            "description": "ink wash",
            "trigger_words": ["ink style", "brush"],
            "tags": ["art"],
            "versions": [1, 3],
            "latest_version": 3,
            "rank": 4,
            "has_text_encoder": False,
            "base_model": "sd1",
            "source_format": "kohya",
            "created_at": "2025-01-01T00:00:00Z",
        },
    }


# -- the page's files ---------------------------------------------------------------------


def test_static_files_are_served_with_their_types_and_load_nothing_from_elsewhere():
    files = page.load_static()
    assert set(files) == {"index.html", "app.js", "style.css"}
    assert files["app.js"].media_type.startswith("text/javascript")
    assert files["style.css"].media_type.startswith("text/css")
    for name, f in files.items():
        text = f.body.decode()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), name
        assert "@import" not in text and "url(http" not in text, name
    index = files["index.html"].body.decode()
    assert '<script src="static/app.js" defer></script>' in index
    assert '<link rel="stylesheet" href="static/style.css">' in index


def test_index_carries_the_config_and_nothing_can_close_its_script():
    site = page.Site({"model": "</script><script>alert(1)</script>", "max_steps": 150})
    html = site.get("index.html").body.decode()
    blob = re.search(r'<script type="application/json" id="config">(.*?)</script>', html).group(1)
    assert json.loads(blob) == {"model": "</script><script>alert(1)</script>", "max_steps": 150}
    assert "alert(1)</script>" not in html
    assert site.get("index.html").etag != page.load_static()["index.html"].etag
    assert site.get("nope.js") is None


def test_index_without_marker_fails_loudly(tmp_path):
    (tmp_path / "index.html").write_text("<html></html>")
    with pytest.raises(ValueError, match="config marker"):
        page.Site({}, tmp_path)


def test_page_config_from_limits():
    from deployments.engine.config import LoRAConfig

    config = page.page_config(
        model="tiny-sd",
        default_side=256,
        limits=LIMITS,
        lora=LoRAConfig(),
        samplers=[s.to_dict() for s in SAMPLERS],
    )
    assert config["max_steps"] == 150 and config["max_side"] == 1024 and config["max_loras"] == 4
    assert config["schedulers"][-1] == {"name": "PLMS", "value": "default"}
