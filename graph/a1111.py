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
  case-insensitively (``"Euler a"``, ``"k_euler_a"``, ``"euler_a"``), maybe with a schedule's label after it
  (``"DPM++ 2M Karras"``, the names before A1111 1.9); else ``scheduler`` (A1111 >= 1.9) picks the sigma
  schedule, and "Automatic" is the sampler's own as A1111 has it (Karras for DPM++ 2M). An unknown sampler
  or schedule is a 422 listing the choices (``GET /sdapi/v1/samplers``, ``/sdapi/v1/schedulers``).
- Fields lorafleet does not implement (``override_settings``, ``styles``, ``restore_faces``,
  ``enable_hr``, ``alwayson_scripts``, extensions' own fields, ...) are accepted and ignored, as A1111
  ignores fields it does not know. Those sent with a value that would have changed A1111's result
  (``restore_faces: true``, ``enable_hr: true``, a non-empty ``override_settings``; not their defaults
  or "off" values) are named in ``info["ignored_fields"]``, so a client can see they had no effect.
- Fields lorafleet does implement are typed strictly, like the native API: ``"steps": "20"`` is a 422
  naming ``steps``.
- ``alwayson_scripts.ControlNet`` is read: its IP-Adapter unit is the native ``style_image`` / ``style_scale``,
  other enabled ControlNet units are 422s (``graph/a1111_controlnet.py``). Other scripts are ignored as above.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import time
from dataclasses import dataclass, field, replace

from pydantic import BaseModel, ConfigDict, Field

from deployments.engine.schedulers import DEFAULT_SCHEDULER, SAMPLERS, scheduler_name, schedules_of

from . import a1111_controlnet, a1111_info
from .config import LimitsConfig
from .errors import APIError, FieldError
from .schemas import MAX_SEED
from .validation import FieldNames, GenerationInput

# -- samplers -----------------------------------------------------------------------------
# A1111's samplers (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py, sd_samplers_lcm.py, 1.10) that
# diffusers has, each run by a lorafleet sampler (deployments/engine/schedulers.py), and A1111 >= 1.9's separate
# sigma schedule: its ``scheduler`` field, or a schedule's label after the name ("DPM++ 2M Karras", the
# names before 1.9, which win over the field, as A1111's ``get_sampler_and_scheduler`` has it).


@dataclass(frozen=True)
class Sampler:
    """An A1111 sampler: its name, aliases and options as ``GET /sdapi/v1/samplers`` lists them, the lorafleet
    sampler that runs it and, once resolved (``resolve_sampler``), the schedule it runs with."""

    name: str  # A1111's: "DPM++ 2M"
    sampler: str  # lorafleet's, without a schedule: "dpmpp_2m"; "default": the model's own scheduler
    diffusers_class: str
    aliases: tuple[str, ...] = ()
    automatic: str | None = None  # what A1111's "Automatic" schedule is for it ("karras"); None: the sampler's own
    own: bool = False  # the model's own scheduler: "Automatic" runs it ("default") as the model configures it
    schedule: str = "automatic"  # A1111's scheduler name, as resolved: "automatic", "karras", ...

    @property
    def schedules(self) -> tuple[str, ...]:
        """The A1111 schedules it takes besides "automatic" (the engine's names, as ``/sdapi/v1/schedulers``)."""
        return schedules_of(self.sampler) if self.sampler != DEFAULT_SCHEDULER else ()

    @property
    def scheduler(self) -> str:
        """lorafleet's scheduler name for the sampler with its schedule: ``dpmpp_2m_karras``."""
        if self.schedule != "automatic":
            return scheduler_name(self.sampler, self.schedule)
        return DEFAULT_SCHEDULER if self.own else scheduler_name(self.sampler, self.automatic)

    @property
    def schedule_label(self) -> str:
        """The schedule it runs with, by A1111's label ("Schedule type" in the infotext)."""
        schedule = self.automatic if self.schedule == "automatic" and not self.own else self.schedule
        return _schedule_labels()[schedule or "automatic"]

    def to_dict(self) -> dict:
        """``GET /sdapi/v1/samplers`` entry: A1111's options (str -> str, as its API gives them: ``scheduler``, the
        "Automatic" schedule; ``second_order``), then lorafleet's: the scheduler it runs by default, its diffusers
        class and the schedules it takes."""
        options = {}
        if self.automatic is not None:
            options["scheduler"] = self.automatic
        if self.sampler in SAMPLERS and SAMPLERS[self.sampler].second_order:
            options["second_order"] = "True"
        if self.sampler == "dpmpp_sde":
            options["brownian_noise"] = "True"
        options["lorafleet_scheduler"] = self.scheduler
        options["diffusers_class"] = self.diffusers_class
        options["schedulers"] = ",".join(("automatic", *self.schedules))
        return {"name": self.name, "aliases": list(self.aliases), "options": options}


# (A1111 name, lorafleet sampler, A1111's aliases, its "Automatic" schedule), in A1111's order.
_SAMPLERS = (
    ("DPM++ 2M", "dpmpp_2m", ("k_dpmpp_2m",), "karras"),
    ("DPM++ SDE", "dpmpp_sde", ("k_dpmpp_sde",), "karras"),
    ("DPM++ 2M SDE", "dpmpp_2m_sde", ("k_dpmpp_2m_sde",), "exponential"),
    ("DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun", ("k_dpmpp_2m_sde_heun",), "exponential"),
    ("DPM++ 3M SDE", "dpmpp_3m_sde", ("k_dpmpp_3m_sde",), "exponential"),
    ("Euler a", "euler_a", ("k_euler_a", "k_euler_ancestral"), None),
    ("Euler", "euler", ("k_euler",), None),
    ("LMS", "lms", ("k_lms",), None),
    ("Heun", "heun", ("k_heun",), None),
    ("DPM2", "dpm2", ("k_dpm_2",), "karras"),
    ("DPM2 a", "dpm2_a", ("k_dpm_2_a",), "karras"),
    ("DDIM", "ddim", ("ddim",), None),
    ("PLMS", "plms", ("plms",), None),
    ("UniPC", "unipc", ("unipc",), None),
    ("LCM", "lcm", ("k_lcm",), None),
)
# The A1111 sampler that is the model's own scheduler, by its class: PNDM (skipping PRK steps) is PLMS.
_DEFAULT_NAMES = {"PNDMScheduler": "PLMS"}
DEFAULT_SAMPLER = "Euler"  # A1111's default (its ``sampler_index``)


def sampler_table(model_scheduler_class: str) -> tuple[Sampler, ...]:
    """The samplers this server offers, in A1111's order, the model's own scheduler last: under its A1111 name
    (PLMS for PNDM), else as "Default". Every entry also answers to lorafleet's sampler name.

    >>> [s.name for s in sampler_table("PNDMScheduler")][-3:], sampler_table("EulerDiscreteScheduler")[-1].name
    (['UniPC', 'LCM', 'PLMS'], 'Default')
    """
    own = _DEFAULT_NAMES.get(model_scheduler_class)
    table, last = [], []
    for name, ours, aliases, automatic in _SAMPLERS:
        cls = SAMPLERS[ours].diffusers_class
        aliases = aliases if ours in aliases else (*aliases, ours)
        if name == own:
            last.append(Sampler(name, ours, cls, (*aliases, "pndm", "default"), automatic, own=True))
        else:
            table.append(Sampler(name, ours, cls, aliases, automatic))
    if own is None:
        last.append(Sampler("Default", DEFAULT_SCHEDULER, model_scheduler_class, ("default",), own=True))
    return (*table, *last)


@functools.cache
def _schedule_labels() -> dict[str, str]:
    """A1111 scheduler name -> its label, for those ``GET /sdapi/v1/schedulers`` lists."""
    return {s["name"]: s["label"] for s in a1111_info.schedulers()}


def _schedule_named(text: str) -> str | None:
    """The A1111 scheduler ``text`` names (its name, label or an alias, any case), or None."""
    wanted = text.strip().lower()
    for s in a1111_info.schedulers():
        if wanted in (o.lower() for o in (s["name"], s["label"], *s["aliases"])):
            return s["name"]
    return None


def _find(name: str, table: tuple[Sampler, ...]) -> Sampler | None:
    wanted = name.strip().lower()
    return next((s for s in table if wanted in (n.lower() for n in (s.name, *s.aliases))), None)


def resolve_sampler(
    name: str,
    table: tuple[Sampler, ...],
    field_name: str = "sampler_name",
    scheduler: str | None = None,
    scheduler_field: str = "scheduler",
) -> Sampler:
    """The sampler ``name`` names (its name or an alias, ignoring case) with its schedule: a schedule's label
    after the name ("DPM++ 2M Karras"), else ``scheduler`` (A1111's field: a name, label or alias of
    ``GET /sdapi/v1/schedulers``; None, "" and "Automatic": the sampler's own, as A1111 >= 1.9 gives it).
    An unknown sampler, an unknown schedule or one the sampler does not take is a 422 naming the field
    and listing the choices.

    >>> table = sampler_table("PNDMScheduler")
    >>> [resolve_sampler("DPM++ 2M Karras", table).scheduler, resolve_sampler("DPM++ 2M", table).scheduler]
    ['dpmpp_2m_karras', 'dpmpp_2m_karras']
    >>> [resolve_sampler(n, table, scheduler=s).scheduler for n, s in [("Euler", "Karras"), ("DPM++ 2M", "uniform")]]
    ['euler_karras', 'dpmpp_2m_uniform']
    """
    sampler, schedule, where = _find(name, table), None, scheduler_field
    if sampler is None:  # A1111's combined names: "<sampler> <schedule's label or alias>"
        for s in a1111_info.schedulers():
            for option in (s["label"], *s["aliases"]):
                base = name.strip()
                if s["name"] != "automatic" and base.lower().endswith(" " + option.lower()):
                    sampler, schedule, where = _find(base[: -len(option) - 1], table), s["name"], field_name
                    break
            if sampler is not None:
                break
    if sampler is None:
        raise APIError(
            422,
            "invalid_value",
            f"{field_name}: unknown sampler {name[:60]!r}; choose one of {[s.name for s in table]} "
            "(GET /sdapi/v1/samplers lists their aliases)",
            field_name,
        )
    if schedule is None and scheduler is not None and scheduler.strip():
        schedule = _schedule_named(scheduler)
        if schedule is None:
            raise APIError(
                422,
                "invalid_value",
                f"{scheduler_field}: unknown scheduler {scheduler[:60]!r}; choose one of "
                f"{list(_schedule_labels().values())} (GET /sdapi/v1/schedulers)",
                scheduler_field,
            )
    schedule = schedule or "automatic"
    if schedule != "automatic" and schedule not in sampler.schedules:
        labels = _schedule_labels()
        raise APIError(
            422,
            "invalid_value",
            f"{where}: sampler {sampler.name!r} takes no {labels[schedule]!r} schedule; choose one of "
            f"{[labels[s] for s in ('automatic', *sampler.schedules)]}",
            where,
        )
    return replace(sampler, schedule=schedule)


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
    scheduler: str | None = Field(
        None,
        description="A1111 >= 1.9's sigma schedule (GET /sdapi/v1/schedulers): Karras, Exponential, ...; "
        "default Automatic, the sampler's own. A schedule in sampler_name wins.",
    )
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
    scripts = extra.get("alwayson_scripts")
    if isinstance(scripts, dict):  # the ControlNet extension's units are read (graph/a1111_controlnet.py)
        extra["alwayson_scripts"] = {
            k: v for k, v in scripts.items() if not (isinstance(k, str) and k.lower() == a1111_controlnet.SCRIPT)
        }
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
    style: a1111_controlnet.StyleUnit | None = None  # the ControlNet extension's IP-Adapter unit, if any


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
    sampler = resolve_sampler(getattr(req, sampler_field), samplers, sampler_field, req.scheduler)
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
    names = _field_names(req, limits, sampler_field)
    style = a1111_controlnet.style_unit((req.model_extra or {}).get("alwayson_scripts"))
    if style is not None:  # the IP-Adapter unit: its image and weight, and its errors in its fields
        request = replace(request, style_image=style.image, style_scale=style.weight)
        unit = {"style_image": f"{style.field}.image", "style_scale": f"{style.field}.weight"}
        names = FieldNames({**names.names, **unit}, names.messages)
    return NativeCall("txt2img", request, names, sampler, ignored_fields(req), style)


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
    return NativeCall(mode, request, call.names, call.sampler, call.ignored, call.style)


# -- native -> A1111 ------------------------------------------------------------------------


def model_hash(fingerprint: str) -> str:
    """A stable 10-hex-digit id in A1111's short-hash form (no checkpoint file to hash: the module fingerprint)."""
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:10]


def _infotext(prompt, negative, steps, sampler: Sampler, cfg, seed, width, height, model, mhash, extra: dict) -> str:
    """A1111's "parameters" text, as its PNG info and infotexts carry it."""
    settings = {
        "Steps": steps,
        "Sampler": sampler.name,
        "Schedule type": sampler.schedule_label,
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
    req: Txt2ImgRequest,
    call: NativeCall,
    plan,
    images: list[bytes],
    model: str,
    mhash: str,
    stopped: str | None = None,
    style_model: str | None = None,
) -> dict:
    """``{images, parameters, info}``: base64 images (PNG unless the caller's ``samples_format`` says
    otherwise), the request echoed (defaults filled in; init images and mask left out, as A1111 does), and
    ``info`` as a JSON string. ``stopped``: "interrupted" / "skipped" when ``/interrupt`` / ``/skip`` ended
    the generation (``images`` then holds what it finished: none), in ``info["stopped"]``. ``style_model``: the
    served IP-Adapter's name (``GET /controlnet/model_list``), for an IP-Adapter unit's infotext."""
    seeds = [plan.seed + k for k in range(plan.num_images)]
    extra = {}
    if call.mode != "txt2img":
        extra["Denoising strength"] = call.request.strength
    if plan.applied:
        extra["Lora"] = " ".join(f"{ref}:{scale:g}" for ref, scale in plan.applied)
    if call.style is not None:  # as the extension's infotext: "ControlNet 0: Module: ..., Model: ..., Weight: ..."
        extra["ControlNet 0"] = call.style.infotext(style_model or call.style.model)
    infotexts = [
        _infotext(
            req.prompt,
            req.negative_prompt,
            plan.steps,
            call.sampler,
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
