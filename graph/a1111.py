"""The AUTOMATIC1111 web UI's API (``/sdapi/v1/...``), translated at the edge into the native API.

An A1111 request becomes the same native request as ``POST /v1/generate`` (``txt2img_call``) or
``POST /v1/img2img`` / ``/v1/inpaint`` (``img2img_call``), checked by the same ``Planner.check_inputs``;
its errors name the A1111 fields (``NativeCall.names``), and the answer is shaped back into A1111's
``{images, parameters, info}``. Nothing below the ingress knows A1111 exists.

Compatibility rules, in one place:

- Defaults are A1111's (``steps`` 50, ``cfg_scale`` 7, sampler ``Euler``), except ``width`` /
  ``height``, which default to the served model's native size (A1111's 512 is SD1.5's).
- ``seed: -1`` (or null) means random; image ``k`` of ``batch_size × n_iter`` uses ``seed + k``, as
  A1111 does without variation seeds.
- ``sampler_name`` (or the legacy ``sampler_index``) names an A1111 sampler or one of its aliases,
  case-insensitively (``"Euler a"``, ``"k_euler_a"``, ``"euler_a"``); an unknown one is a 422 listing
  the choices (``GET /sdapi/v1/samplers``).
- Fields lorafleet does not implement (``override_settings``, ``styles``, ``restore_faces``,
  ``enable_hr``, ``alwayson_scripts``, extensions' own fields, ...) are accepted and ignored, as A1111
  ignores fields it does not know. Those sent with a value that would have changed A1111's result
  (``restore_faces: true``, ``enable_hr: true``, a non-empty ``override_settings``; not their defaults
  or "off" values) are named in ``info["ignored_fields"]``, so a client can see they had no effect.
- Fields lorafleet does implement are typed strictly, like the native API: ``"steps": "20"`` is a 422
  naming ``steps``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass, field, replace

from pydantic import BaseModel, ConfigDict, Field

from .config import LimitsConfig
from .errors import APIError, FieldError
from .schemas import MAX_SEED
from .validation import FieldNames, GenerationInput

# -- samplers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    """An A1111 sampler name and the lorafleet scheduler that runs it."""

    name: str
    scheduler: str  # lorafleet's name (deployments/engine/schedulers.py)
    diffusers_class: str
    aliases: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """``GET /sdapi/v1/samplers`` entry. A1111's ``options`` are str -> str."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "options": {"lorafleet_scheduler": self.scheduler, "diffusers_class": self.diffusers_class},
        }


# A1111 names whose arithmetic is the diffusers scheduler's (same schedule, no Karras sigmas).
_SAMPLERS = (
    ("Euler", "euler", "EulerDiscreteScheduler", ("k_euler",)),
    ("Euler a", "euler_a", "EulerAncestralDiscreteScheduler", ("k_euler_a", "k_euler_ancestral")),
    ("DDIM", "ddim", "DDIMScheduler", ()),
    ("DPM++ 2M", "dpmpp_2m", "DPMSolverMultistepScheduler", ("k_dpmpp_2m",)),
)
# A1111's name for the model's own scheduler, where it has one: PNDM (skipping PRK steps) is PLMS.
_DEFAULT_NAMES = {"PNDMScheduler": ("PLMS", ("plms", "pndm"))}
DEFAULT_SAMPLER = "Euler"  # A1111's default (its ``sampler_index``)


def sampler_table(model_scheduler_class: str) -> tuple[Sampler, ...]:
    """The samplers this server offers, A1111 names first; every entry also answers to our own name.

    >>> [s.name for s in sampler_table("PNDMScheduler")]
    ['Euler', 'Euler a', 'DDIM', 'DPM++ 2M', 'PLMS']
    """
    table = [Sampler(name, ours, cls, (*aliases, ours)) for name, ours, cls, aliases in _SAMPLERS]
    name, aliases = _DEFAULT_NAMES.get(model_scheduler_class, ("Default", ()))
    table.append(Sampler(name, "default", model_scheduler_class, (*aliases, "default")))
    return tuple(table)


def resolve_sampler(name: str, table: tuple[Sampler, ...], field_name: str = "sampler_name") -> Sampler:
    """Find ``name`` among the samplers' names and aliases, ignoring case; else a 422 listing them."""
    wanted = name.strip().lower()
    for sampler in table:
        if wanted == sampler.name.lower() or wanted in (a.lower() for a in sampler.aliases):
            return sampler
    raise APIError(
        422,
        "invalid_value",
        f"{field_name}: unknown sampler {name!r}; choose one of {[s.name for s in table]} "
        "(GET /sdapi/v1/samplers lists their aliases)",
        field_name,
    )


# -- request bodies -------------------------------------------------------------------------


class _A1111Body(BaseModel):
    # extra="allow": A1111 clients send many fields we do not implement; see the module docstring.
    model_config = ConfigDict(extra="allow", strict=True)


class Txt2ImgRequest(_A1111Body):
    """``POST /sdapi/v1/txt2img``: the fields lorafleet implements; any other field is accepted and ignored."""

    prompt: str = Field("", description="What to draw; may hold <lora:name:weight>.")
    negative_prompt: str = ""
    seed: int | None = Field(-1, ge=-1, le=MAX_SEED, description="-1: random. Image k uses seed + k.")
    steps: int = Field(50, ge=1)
    cfg_scale: float = Field(7.0, ge=0, description="Classifier-free guidance scale.")
    width: int | None = Field(None, description="Default: the model's native size.")
    height: int | None = Field(None, description="Default: the model's native size.")
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1, description="Batches; batch_size × n_iter images in all.")
    sampler_name: str | None = Field(None, description="An A1111 sampler name or alias (GET /sdapi/v1/samplers).")
    sampler_index: str = Field(DEFAULT_SAMPLER, description="A1111's legacy sampler field, used if no sampler_name.")
    send_images: bool = Field(True, description="false: answer without the images.")


class Img2ImgRequest(Txt2ImgRequest):
    """``POST /sdapi/v1/img2img``: img2img, or inpainting when ``mask`` is given."""

    init_images: list[str] = Field(description="Exactly one base64 (or data URL) PNG/JPEG/WebP image.")
    denoising_strength: float = Field(0.75, gt=0, le=1, description="How much of the image is repainted.")
    mask: str | None = Field(None, description="base64 image; white = repaint, black = keep.")
    inpainting_mask_invert: int | bool = Field(0, description="1: repaint the black part instead.")


# A1111 fields lorafleet does not implement, and the values with which they change nothing in A1111
# either (its defaults; "off" values clients send). Only other values are reported as ignored.
# _DEPENDENT: fields that only act together with another field, which is reported instead
# (hires-fix settings without enable_hr, script_args without script_name, ...).
_DEPENDENT = object()
_NEUTRAL: dict[str, object] = {
    "styles": ([],),
    "subseed": _DEPENDENT,  # needs subseed_strength
    "subseed_strength": (0,),
    "seed_resize_from_h": (-1, 0),
    "seed_resize_from_w": (-1, 0),
    "restore_faces": (False,),
    "tiling": (False,),
    "do_not_save_samples": _DEPENDENT,
    "do_not_save_grid": _DEPENDENT,
    "save_images": _DEPENDENT,
    "eta": (),
    "s_min_uncond": (0,),
    "s_churn": (0,),
    "s_tmax": (0,),
    "s_tmin": (0,),
    "s_noise": (1,),
    "override_settings": ({},),
    "override_settings_restore_afterwards": _DEPENDENT,
    "refiner_checkpoint": ("", "None"),
    "refiner_switch_at": _DEPENDENT,
    "disable_extra_networks": (False,),
    "firstpass_image": (),
    "comments": _DEPENDENT,
    "enable_hr": (False,),
    "firstphase_width": _DEPENDENT,
    "firstphase_height": _DEPENDENT,
    "hr_scale": _DEPENDENT,
    "hr_upscaler": _DEPENDENT,
    "hr_second_pass_steps": _DEPENDENT,
    "hr_resize_x": _DEPENDENT,
    "hr_resize_y": _DEPENDENT,
    "hr_checkpoint_name": _DEPENDENT,
    "hr_sampler_name": _DEPENDENT,
    "hr_scheduler": _DEPENDENT,
    "hr_prompt": _DEPENDENT,
    "hr_negative_prompt": _DEPENDENT,
    "hr_additional_modules": _DEPENDENT,
    "denoising_strength": _DEPENDENT,  # txt2img: the hires pass's strength
    "force_task_id": _DEPENDENT,
    "script_name": ("",),
    "script_args": _DEPENDENT,
    "alwayson_scripts": ({},),
    "infotext": (),
    "scheduler": ("automatic",),  # A1111 >= 1.9's sigma schedule; ours is the sampler's own
    "clip_skip": (1,),
    "user": _DEPENDENT,
    # img2img
    "resize_mode": (0,),
    "image_cfg_scale": _DEPENDENT,  # instruct-pix2pix models only
    "mask_blur": _DEPENDENT,  # needs mask_blur_x / mask_blur_y
    "mask_blur_x": (0, 4),
    "mask_blur_y": (0, 4),
    "mask_round": _DEPENDENT,
    "inpainting_fill": (0, 1),  # "fill" / "original": the start is the noised image either way here
    "inpaint_full_res": (False, True, 0, 1),  # whole picture / only masked: the same with a full-size mask
    "inpaint_full_res_padding": _DEPENDENT,
    "initial_noise_multiplier": (1,),
    "latent_mask": (),
    "include_init_images": _DEPENDENT,
}


def _is_neutral(name: str, value) -> bool:
    if value is None:
        return True
    neutral = _NEUTRAL.get(name, (False, "", [], {}, 0))
    if neutral is _DEPENDENT:
        return True
    return any(_same(value, n) for n in neutral)


def _same(value, neutral) -> bool:
    if isinstance(value, str) and isinstance(neutral, str):
        return value.lower() == neutral.lower()
    if isinstance(value, bool) or isinstance(neutral, bool):  # True == 1 in Python; not here
        return value is neutral
    return value == neutral


def ignored_fields(req: _A1111Body) -> list[str]:
    """The extra fields that would have changed the result in A1111 and have no effect here, sorted.
    ``override_settings`` counts only for settings other than ``sd_model_checkpoint`` (which picks the model).

    >>> ignored_fields(Txt2ImgRequest(prompt="a", restore_faces=True, styles=[], tiling=False))
    ['restore_faces']
    >>> ignored_fields(Txt2ImgRequest(prompt="a", override_settings={"sd_model_checkpoint": "tiny-sd"}))
    []
    """
    extra = dict(req.model_extra or {})
    overrides = extra.get("override_settings")
    if isinstance(overrides, dict) and CHECKPOINT_SETTING in overrides:
        extra["override_settings"] = {k: v for k, v in overrides.items() if k != CHECKPOINT_SETTING}
    return sorted(k for k, v in extra.items() if not _is_neutral(k, v))


CHECKPOINT_SETTING = "sd_model_checkpoint"


def requested_checkpoint(req: _A1111Body) -> str | None:
    """``override_settings.sd_model_checkpoint``, the model an A1111 request asks for (None: the default);
    422 naming it if it is not text."""
    overrides = (req.model_extra or {}).get("override_settings")
    if not isinstance(overrides, dict) or overrides.get(CHECKPOINT_SETTING) in (None, ""):
        return None
    value = overrides[CHECKPOINT_SETTING]
    if not isinstance(value, str):
        raise APIError(
            422,
            "invalid_value",
            f"override_settings.sd_model_checkpoint must be a model title or name, got {type(value).__name__}",
            "override_settings.sd_model_checkpoint",
        )
    return value


def checkpoint_model(checkpoint: str, models: list[tuple[str, str]]) -> str | None:
    """The served model a checkpoint string names, as A1111 matches them: its title (``name [hash]``), its
    name, its short hash, or its name with a file extension. ``models``: (name, short hash) pairs.

    >>> checkpoint_model("xl [0123456789]", [("sd", "aaaaaaaaaa"), ("xl", "0123456789")])
    'xl'
    >>> checkpoint_model("sd.safetensors", [("sd", "aaaaaaaaaa")]), checkpoint_model("nope", [("sd", "a")])
    ('sd', None)
    """
    text = checkpoint.strip()
    for name, mhash in models:
        if text in (name, mhash, f"{name} [{mhash}]"):
            return name
    stem = text.rsplit(" [", 1)[0].rsplit(".", 1)[0]  # "sd.safetensors [hash]" -> "sd"
    return next((name for name, _ in models if stem == name), None)


# -- A1111 -> native ------------------------------------------------------------------------


@dataclass(frozen=True)
class NativeCall:
    """An A1111 request in native terms.

    ``request``: the native request (``Planner.check_inputs`` checks it, as any other); for
    img2img the ``/v1/img2img`` fields, for inpainting the ``/v1/inpaint`` ones. ``names``: the
    A1111 names of its fields, for the errors it may get (``guidance_scale`` -> ``cfg_scale``, ...).
    """

    mode: str  # "txt2img" | "img2img" | "inpaint"
    request: GenerationInput
    names: FieldNames
    sampler: Sampler
    ignored: list[str] = field(default_factory=list)


# native field -> A1111 field, where they differ (num_images and scheduler depend on the request).
_NAMES = {"guidance_scale": "cfg_scale", "image": "init_images", "strength": "denoising_strength"}


def _field_names(req: Txt2ImgRequest, limits: LimitsConfig, sampler_field: str) -> FieldNames:
    """Errors in A1111's names: ``num_images`` is ``batch_size × n_iter``, named by the factor at fault."""
    at_fault = "batch_size" if req.batch_size > limits.max_num_images or req.n_iter == 1 else "n_iter"

    def num_images(error: FieldError) -> str:
        total = req.batch_size * req.n_iter
        return (
            f"batch_size × n_iter must be at most {error.values['high']} images, "
            f"got {req.batch_size} × {req.n_iter} = {total}"
        )

    names = {**_NAMES, "num_images": at_fault, "scheduler": sampler_field}
    return FieldNames(names, messages={"num_images": num_images})


def check_extra_text(req: _A1111Body) -> None:
    """The fields lorafleet ignores are echoed back (``parameters``), so they must be text the answer
    can carry: a lone surrogate anywhere in them (legal in JSON, not in UTF-8) is a 422 naming the field."""
    for key, value in (req.model_extra or {}).items():
        if not _encodable(key) or not _encodable(value):
            name = key.encode("utf-8", "replace").decode()
            raise APIError(422, "invalid_value", f"{name!r} is not valid Unicode text (a lone surrogate)", name)


def _encodable(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_encodable(k) and _encodable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_encodable(v) for v in value)
    return True


def txt2img_call(
    req: Txt2ImgRequest, limits: LimitsConfig, samplers: tuple[Sampler, ...], tenant: str = "anonymous"
) -> NativeCall:
    """Translate a txt2img request; the route checks ``request`` and answers errors in ``names``.

    >>> call = txt2img_call(Txt2ImgRequest(prompt="a boat", seed=-1, batch_size=2, n_iter=2,
    ...                                    sampler_name="Euler a"), LimitsConfig(), sampler_table("PNDMScheduler"))
    >>> call.request.seed, call.request.num_images, call.request.scheduler
    (None, 4, 'euler_a')
    """
    check_extra_text(req)
    sampler_field = "sampler_name" if req.sampler_name is not None else "sampler_index"
    sampler = resolve_sampler(getattr(req, sampler_field), samplers, sampler_field)
    request = GenerationInput(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        width=req.width,
        height=req.height,
        steps=req.steps,
        guidance_scale=req.cfg_scale,
        seed=None if req.seed is None or req.seed == -1 else req.seed,
        num_images=req.batch_size * req.n_iter,
        scheduler=sampler.scheduler,
        output_format="png",
        tenant=tenant,
    )
    return NativeCall("txt2img", request, _field_names(req, limits, sampler_field), sampler, ignored_fields(req))


def img2img_call(
    req: Img2ImgRequest, limits: LimitsConfig, samplers: tuple[Sampler, ...], tenant: str = "anonymous"
) -> NativeCall:
    """Translate an img2img request: ``mode`` "img2img", or "inpaint" when a mask is given.

    ``request`` is the ``/v1/img2img`` request (``image``, ``strength``) or the ``/v1/inpaint`` one
    (plus ``mask``, white = repaint, or black with ``inpainting_mask_invert: 1``, which the decoding
    inverts; and ``preserve_unmasked``: A1111 pastes the unmasked original back too). ``width`` /
    ``height`` are None unless the request sent them (the native image routes' rule then applies).
    """
    call = txt2img_call(req, limits, samplers, tenant)
    if len(req.init_images) != 1:
        raise APIError(
            422,
            "invalid_value",
            f"init_images must hold exactly one image, got {len(req.init_images)}",
            "init_images",
        )
    if req.inpainting_mask_invert not in (0, 1):
        raise APIError(
            422,
            "invalid_value",
            f"inpainting_mask_invert must be 0 or 1, got {req.inpainting_mask_invert}",
            "inpainting_mask_invert",
        )
    request = replace(
        call.request,
        image=req.init_images[0],
        strength=req.denoising_strength,
        mask=req.mask,
        invert_mask=req.mask is not None and bool(req.inpainting_mask_invert),
        preserve_unmasked=True,
    )
    mode = "img2img" if req.mask is None else "inpaint"
    return NativeCall(mode, request, call.names, call.sampler, call.ignored)


# -- native -> A1111 ------------------------------------------------------------------------


def model_hash(fingerprint: str) -> str:
    """A stable 10-hex-digit id in A1111's short-hash form (no checkpoint file to hash: the module fingerprint)."""
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:10]


def _infotext(prompt, negative, steps, sampler, cfg, seed, width, height, model, mhash, extra: dict) -> str:
    """A1111's "parameters" text, as its PNG info and infotexts carry it."""
    settings = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": cfg,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": mhash,
        "Model": model,
        **extra,
        "Version": "lorafleet",
    }
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items()))
    return "\n".join(lines)


def a1111_response(
    req: Txt2ImgRequest, call: NativeCall, plan, images: list[bytes], model: str, mhash: str, stopped: str | None = None
) -> dict:
    """``{images, parameters, info}``: base64 images (PNG unless the caller's ``samples_format`` says
    otherwise), the request echoed (defaults filled in; init images and mask left out, as A1111 does), and
    ``info`` as a JSON string. ``stopped``: "interrupted" / "skipped" when ``/interrupt`` / ``/skip`` ended
    the generation (``images`` then holds what it finished: none), in ``info["stopped"]``."""
    seeds = [plan.seed + k for k in range(plan.num_images)]
    extra = {}
    if call.mode != "txt2img":
        extra["Denoising strength"] = call.request.strength
    if plan.applied:
        extra["Lora"] = " ".join(f"{ref}:{scale:g}" for ref, scale in plan.applied)
    infotexts = [
        _infotext(
            req.prompt,
            req.negative_prompt,
            plan.steps,
            call.sampler.name,
            req.cfg_scale,
            seed,
            plan.width,
            plan.height,
            model,
            mhash,
            extra,
        )
        for seed in seeds
    ]
    n = plan.num_images
    info = {
        "prompt": req.prompt,
        "all_prompts": [req.prompt] * n,
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * n,
        "seed": plan.seed,
        "all_seeds": seeds,
        "subseed": plan.seed,
        "all_subseeds": seeds,
        "subseed_strength": 0,
        "width": plan.width,
        "height": plan.height,
        "sampler_name": call.sampler.name,
        "cfg_scale": req.cfg_scale,
        "steps": plan.steps,
        "batch_size": req.batch_size,
        "n_iter": req.n_iter,
        "restore_faces": False,
        "sd_model_name": model,
        "sd_model_hash": mhash,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": call.request.strength,
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": "lorafleet",
        "loras": [{"ref": ref, "scale": scale} for ref, scale in plan.applied],
        "lorafleet_scheduler": plan.scheduler,
        "ignored_fields": call.ignored,
        "stopped": stopped,
    }
    parameters = req.model_dump()
    parameters["width"], parameters["height"] = plan.width, plan.height
    if isinstance(req, Img2ImgRequest):
        parameters["init_images"] = None
        parameters["mask"] = None
    images_b64 = [base64.b64encode(data).decode() for data in images] if req.send_images else []
    return {"images": images_b64, "parameters": parameters, "info": json.dumps(info)}


def sd_models(model: str, uri: str, mhash: str, fingerprint: str, kind: str = "sd1", family: str = "sd1") -> list[dict]:
    """A ``GET /sdapi/v1/sd-models`` entry for one served checkpoint, with lorafleet's ``kind`` (``sd1``,
    ``sdxl``) and ``family`` (``sdxl-inpaint``, ...) beside A1111's fields."""
    return [
        {
            "title": f"{model} [{mhash}]",
            "model_name": model,
            "hash": mhash,
            "sha256": hashlib.sha256(fingerprint.encode()).hexdigest(),
            "filename": uri,
            "config": None,
            "kind": kind,
            "family": family,
        }
    ]


def lora_entry(listing: dict) -> dict:
    """``GET /sdapi/v1/loras`` entry from a registry listing (``AdapterListing.to_dict()``).

    Public by design: names, descriptions, trigger words, tags and versions are what a user needs to
    use an adapter; the admin API (``/v1/adapters``, behind ``admin.protect_reads``) has the rest.
    ``model``: the served model the latest version is for (None: no served one), where the listing says
    (``AdapterResolver.listed`` does), so the page offers each model only its own adapters.
    """
    latest = listing["latest"]
    entry = {
        "name": listing["name"],
        "alias": listing["name"],
        "path": f"{latest['name']}@{latest['version']}",
        "metadata": {
            "description": latest["description"],
            "trigger_words": list(latest["trigger_words"]),
            "tags": list(latest["tags"]),
            "versions": list(listing["versions"]),
            "latest_version": latest["version"],
            "rank": latest["rank"],
            "has_text_encoder": latest["has_text_encoder"],
            "base_model": latest["base_model"]["family"],
            "source_format": latest["source_format"],
            "created_at": latest["created_at"],
        },
    }
    if "model" in listing:
        entry["model"] = listing["model"]
    return entry


def list_loras(resolver) -> list[dict]:
    """Every adapter with a live version, by name (``AdapterResolver.list``, page by page)."""
    out, after = [], None
    while True:
        page = resolver.list(None, 1000, after)
        out.extend(lora_entry(item) for item in page["data"])
        after = page["next"]
        if after is None:
            return out
