"""The AUTOMATIC1111 translation (graph/a1111.py) and the page's static files (graph/page.py), in-process."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from graph import a1111, page
from graph.config import LimitsConfig
from graph.errors import APIError
from graph.planning import Plan

SAMPLERS = a1111.sampler_table("PNDMScheduler")
LIMITS = LimitsConfig()


def png_b64(array: np.ndarray, data_url: bool = False) -> str:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    text = base64.b64encode(out.getvalue()).decode()
    return "data:image/png;base64," + text if data_url else text


def decode(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text.split(",", 1)[-1]))))


# -- samplers -----------------------------------------------------------------------------


def test_sampler_table_names_the_model_default_by_its_a1111_name():
    assert [(s.name, s.scheduler) for s in SAMPLERS] == [
        ("Euler", "euler"),
        ("Euler a", "euler_a"),
        ("DDIM", "ddim"),
        ("DPM++ 2M", "dpmpp_2m"),
        ("PLMS", "default"),
    ]
    other = a1111.sampler_table("LMSDiscreteScheduler")
    assert (other[-1].name, other[-1].scheduler, other[-1].diffusers_class) == (
        "Default",
        "default",
        "LMSDiscreteScheduler",
    )
    assert SAMPLERS[1].to_dict() == {
        "name": "Euler a",
        "aliases": ["k_euler_a", "k_euler_ancestral", "euler_a"],
        "options": {"lorafleet_scheduler": "euler_a", "diffusers_class": "EulerAncestralDiscreteScheduler"},
    }


@pytest.mark.parametrize(
    "name, scheduler",
    [
        ("Euler", "euler"),
        ("euler", "euler"),
        ("k_euler", "euler"),
        ("Euler a", "euler_a"),
        ("EULER A", "euler_a"),
        ("k_euler_ancestral", "euler_a"),
        ("euler_a", "euler_a"),
        ("DDIM", "ddim"),
        ("DPM++ 2M", "dpmpp_2m"),
        ("k_dpmpp_2m", "dpmpp_2m"),
        ("PLMS", "default"),
        ("PNDM", "default"),
        ("default", "default"),
        (" Euler ", "euler"),
    ],
)
def test_resolve_sampler(name, scheduler):
    assert a1111.resolve_sampler(name, SAMPLERS).scheduler == scheduler


@pytest.mark.parametrize("name", ["DPM++ 2M Karras", "LMS", "Heun", "", "UniPC"])
def test_unknown_sampler_is_a_422_listing_the_choices(name):
    with pytest.raises(APIError) as e:
        a1111.resolve_sampler(name, SAMPLERS)
    assert (e.value.status, e.value.field) == (422, "sampler_name")
    assert "['Euler', 'Euler a', 'DDIM', 'DPM++ 2M', 'PLMS']" in e.value.message
    assert repr(name) in e.value.message


# -- txt2img ------------------------------------------------------------------------------


def test_txt2img_defaults_are_a1111s():
    call = a1111.txt2img_call(a1111.Txt2ImgRequest(prompt="a boat"), LIMITS, SAMPLERS)
    assert call.mode == "txt2img"
    assert call.body == {
        "prompt": "a boat",
        "negative_prompt": "",
        "model": None,
        "width": None,
        "height": None,
        "steps": 50,
        "guidance_scale": 7.0,
        "seed": None,
        "num_images": 1,
        "scheduler": "euler",
        "output_format": "png",
        "loras": [],
    }
    assert call.sampler.name == "Euler" and call.ignored == []
    assert call.fields["num_images"] == "batch_size"


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
    assert {k: call.body[k] for k in expected} == expected


@pytest.mark.parametrize(
    "fields, field, text",
    [
        ({"cfg_scale": 31.0}, "cfg_scale", "cfg_scale must be in [0, 30.0], got 31.0"),
        ({"batch_size": 9}, "batch_size", "got 9 × 1 = 9"),
        ({"batch_size": 4, "n_iter": 3}, "n_iter", "at most 8 images, got 4 × 3 = 12"),
        ({"batch_size": 9, "n_iter": 2}, "batch_size", "got 9 × 2 = 18"),
        ({"sampler_index": "Nope"}, "sampler_index", "unknown sampler 'Nope'"),
        ({"sampler_name": "Nope"}, "sampler_name", "unknown sampler 'Nope'"),
    ],
)
def test_txt2img_errors_name_the_a1111_field(fields, field, text):
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
    assert a1111.txt2img_call(req, LIMITS, SAMPLERS).ignored == ["override_settings", "scheduler"]


# -- img2img ------------------------------------------------------------------------------


def test_img2img_maps_to_the_native_img2img_body():
    image = png_b64(np.zeros((16, 8, 3), np.uint8), data_url=True)
    req = a1111.Img2ImgRequest(prompt="p", init_images=[image], denoising_strength=0.4, seed=3, steps=4)
    call = a1111.img2img_call(req, LIMITS, SAMPLERS, max_mask_pixels=10_000)
    assert call.mode == "img2img"
    assert call.body["image"] == image and call.body["strength"] == 0.4
    assert (call.body["width"], call.body["height"], call.body["seed"], call.body["steps"]) == (None, None, 3, 4)
    assert "mask" not in call.body and "preserve_unmasked" not in call.body
    assert call.fields["image"] == "init_images" and call.fields["strength"] == "denoising_strength"
    sized = a1111.Img2ImgRequest(prompt="p", init_images=[image], width=64)
    assert a1111.img2img_call(sized, LIMITS, SAMPLERS, 10_000).body["width"] == 64
    assert a1111.Img2ImgRequest(prompt="p", init_images=[image]).denoising_strength == 0.75


def test_img2img_with_a_mask_is_inpainting_and_invert_flips_the_mask():
    image = png_b64(np.zeros((8, 8, 3), np.uint8))
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255  # top half: repaint
    call = a1111.img2img_call(
        a1111.Img2ImgRequest(prompt="p", init_images=[image], mask=png_b64(mask)), LIMITS, SAMPLERS, 10_000
    )
    assert call.mode == "inpaint"
    assert call.body["mask"] == png_b64(mask) and call.body["preserve_unmasked"] is True
    assert call.body["strength"] == 0.75
    for invert in (1, True):
        req = a1111.Img2ImgRequest(prompt="p", init_images=[image], mask=png_b64(mask), inpainting_mask_invert=invert)
        inverted = a1111.img2img_call(req, LIMITS, SAMPLERS, 10_000).body["mask"]
        assert inverted.startswith("data:image/png;base64,")
        np.testing.assert_array_equal(decode(inverted), 255 - mask)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[4:] = 255
    np.testing.assert_array_equal(decode(a1111.invert_mask(png_b64(rgb, data_url=True), 64)), 255 - rgb[..., 0])


@pytest.mark.parametrize(
    "fields, field, code",
    [
        ({"init_images": []}, "init_images", "invalid_value"),
        ({"init_images": ["a", "b"]}, "init_images", "invalid_value"),
        ({"mask": "not base64!", "inpainting_mask_invert": 1}, "mask", "invalid_image"),
        ({"mask": base64.b64encode(b"not an image").decode(), "inpainting_mask_invert": 1}, "mask", "invalid_image"),
        ({"mask": png_b64(np.zeros((20, 20), np.uint8)), "inpainting_mask_invert": 1}, "mask", "image_too_large"),
        ({"inpainting_mask_invert": 2}, "inpainting_mask_invert", "invalid_value"),
        ({"cfg_scale": 40.0}, "cfg_scale", "invalid_value"),
    ],
)
def test_img2img_errors(fields, field, code):
    body = {"prompt": "p", "init_images": ["aW1n"], **fields}
    with pytest.raises(APIError) as e:
        a1111.img2img_call(a1111.Img2ImgRequest(**body), LIMITS, SAMPLERS, max_mask_pixels=256)
    assert (e.value.status, e.value.field, e.value.code) == (422, field, code)


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
    body = call.body
    return Plan(
        prompt=body["prompt"],
        negative_prompt=body["negative_prompt"],
        width=width,
        height=height,
        steps=body["steps"],
        guidance_scale=body["guidance_scale"],
        seed=seed,
        num_images=body["num_images"],
        scheduler=body["scheduler"],
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
        "Steps: 4, Sampler: Euler, CFG scale: 7.0, Seed: 41, Size: 64x64, Model hash: 0123456789, "
        "Model: tiny-sd, Lora: ink@2:0.5, Version: lorafleet"
    )
    quiet = a1111.Txt2ImgRequest(prompt="p", send_images=False)
    call = a1111.txt2img_call(quiet, LIMITS, SAMPLERS)
    assert a1111.a1111_response(quiet, call, plan_for(call), [b"a"], "m", "h")["images"] == []


def test_img2img_response_leaves_the_images_out_of_parameters():
    image = png_b64(np.zeros((8, 8, 3), np.uint8))
    req = a1111.Img2ImgRequest(prompt="p", init_images=[image], mask=image, denoising_strength=0.5)
    call = a1111.img2img_call(req, LIMITS, SAMPLERS, 10_000)
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
    assert '<script src="/static/app.js" defer></script>' in index
    assert '<link rel="stylesheet" href="/static/style.css">' in index


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
