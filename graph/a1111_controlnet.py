"""The ControlNet extension's IP-Adapter unit on A1111's API, as lorafleet's ``style_image`` / ``style_scale``.

A1111 users reach IP-Adapter through the ControlNet extension (``Mikubill/sd-webui-controlnet``): a unit in
``alwayson_scripts`` whose preprocessor (``module``) or ``model`` is an IP-Adapter::

    {"alwayson_scripts": {"ControlNet": {"args": [
        {"enabled": true, "module": "ip-adapter_clip_h", "model": "ip-adapter_sd15 [6a3f6166]",
         "image": "<base64 PNG>", "weight": 0.8}]}}}

becomes the native ``style_image`` (the unit's ``image``) and ``style_scale`` (its ``weight``), checked by the
planner like any native request; its errors name the unit's fields (``alwayson_scripts.ControlNet.args[0].weight``).

Rules (``docs/a1111.md``), chosen so no unit a client sent is silently dropped:

- The script's key matches ``controlnet`` in any case (A1111 matches script titles so; webuiapi sends
  ``ControlNet``). Its ``args`` entries that are not objects are skipped, as the extension skips them.
- A unit with ``enabled: false`` is ignored (the extension does the same). A unit without ``enabled`` counts as
  enabled (the extension before 1.1.4 did so, and a unit with an image is a unit the client wants).
- An enabled unit that is not an IP-Adapter (canny, depth, openpose, reference, ...) is a 422 naming its
  ``module``: lorafleet serves no ControlNet models. FaceID, full-face, PuLID and InstantID units too: they are
  other adapters than the served one.
- One IP-Adapter unit per request (one style image); a second is a 422 naming it.
- ``image`` (or the legacy ``input_image``): base64 or a data URL, or ``{"image": ..., "mask": null}``, or
  ``[image, null]``, or a one-element list of such objects (the extension's shapes). Several images, a mask
  or an ``effective_region_mask`` (attention masks), ``ipadapter_input`` (precomputed embeddings) and
  ``advanced_weighting`` (per-layer weights: use the native ``style_scale`` per-block form) are 422s.
- ``weight`` (default 1.0, as the extension) is the scale, 0 to 2 (the extension's range too).
- ``guidance_start`` / ``guidance_end`` other than 0 / 1 and a ``control_mode`` other than Balanced are 422s:
  the served IP-Adapter acts at every step with plain attention, so those would silently change nothing.
- ``model`` picks nothing: the served model's IP-Adapter (``GET /controlnet/model_list``) is used whatever
  name is sent (clients hard-code names such as ``ip-adapter_sd15 [6a3f6166]``); the answer's infotext says
  which one ran. ``resize_mode``, ``processor_res``, ``threshold_a/b``, ``pixel_perfect``, ``low_vram``,
  ``hr_option``, ``save_detected_map``: no effect on an IP-Adapter unit here (the image encoder's own
  preprocessing resizes the image), accepted and ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import APIError

SCRIPT = "controlnet"
API_VERSION = 3  # the extension's ``external_code.get_api_version()`` whose unit shape this reads
# The extension's IP-Adapter preprocessors (scripts/ipadapter/presets.py); each runs the served image encoder.
MODULES = ("ip-adapter-auto", "ip-adapter_clip_h", "ip-adapter_clip_g")
# Adapters that are IP-Adapter by name but not the served kind: refused by name.
_OTHER_ADAPTERS = ("face_id", "faceid", "full-face", "full_face", "pulid", "instant_id", "instantid")
_BALANCED = ("Balanced", 0)


@dataclass(frozen=True)
class StyleUnit:
    """The request's IP-Adapter unit: where it is (``field``, A1111's path) and what it asks for."""

    field: str  # "alwayson_scripts.ControlNet.args[0]"
    image: str
    weight: object  # checked by the planner (style_scale)
    module: str
    model: str

    def infotext(self, served: str) -> str:
        """A1111's ``ControlNet 0`` infotext entry; ``served``: the IP-Adapter that ran."""
        return f"Module: {self.module}, Model: {served}, Weight: {self.weight}"


def _error(field: str, message: str) -> APIError:
    return APIError(422, "invalid_value", f"{field}: {message}", field)


def is_ip_adapter(module: str, model: str) -> bool:
    """Whether a unit's preprocessor or model names an IP-Adapter.

    >>> is_ip_adapter("ip-adapter_clip_h", "None"), is_ip_adapter("none", "ip-adapter_sd15 [6a3f6166]")
    (True, True)
    >>> is_ip_adapter("canny", "control_v11p_sd15_canny [d14c016b]")
    False
    """
    text = f"{module} {model}".lower()
    return "ip-adapter" in text or "ip_adapter" in text or "ipadapter" in text


def style_unit(alwayson_scripts) -> StyleUnit | None:
    """The IP-Adapter unit of an A1111 request's ``alwayson_scripts`` (None: no enabled ControlNet unit); a 422
    naming the unit's field for what is not served (the module docstring's rules)."""
    if not isinstance(alwayson_scripts, dict):
        return None
    key = next((k for k in alwayson_scripts if isinstance(k, str) and k.lower() == SCRIPT), None)
    if key is None:
        return None
    script = alwayson_scripts[key]
    base = f"alwayson_scripts.{key}"
    if script is None:
        return None
    if not isinstance(script, dict):
        raise _error(base, f'must be an object {{"args": [unit, ...]}}, got {type(script).__name__}')
    args = script.get("args", [])
    if not isinstance(args, list):
        raise _error(f"{base}.args", f"must be a list of ControlNet units, got {type(args).__name__}")
    found: StyleUnit | None = None
    for i, unit in enumerate(args):
        if not isinstance(unit, dict):
            continue  # the extension reads only unit objects among its args
        field = f"{base}.args[{i}]"
        enabled = unit.get("enabled", True)
        if not isinstance(enabled, bool):
            raise _error(f"{field}.enabled", f"must be true or false, got {enabled!r}"[:200])
        if not enabled:
            continue
        module, model = _text(unit, "module", field, "none"), _text(unit, "model", field, "None")
        if not is_ip_adapter(module, model):
            raise _error(
                f"{field}.module",
                f"ControlNet module {module[:60]!r} (model {model[:60]!r}) is not served; only IP-Adapter units "
                f"(style from a reference image: module one of {list(MODULES)}, GET /controlnet/module_list) are",
            )
        other = next((name for name in _OTHER_ADAPTERS if name in f"{module} {model}".lower()), None)
        if other is not None:
            where = "module" if other in module.lower() else "model"
            raise _error(
                f"{field}.{where}",
                f"{(module if where == 'module' else model)[:60]!r} is a {other} adapter; only the plain and "
                "plus IP-Adapter (style) are served (GET /controlnet/model_list)",
            )
        if found is not None:
            raise _error(field, f"one IP-Adapter unit per request (one style image); {found.field} is one already")
        found = StyleUnit(field, _image(unit, field), _weight(unit, field), module, model)
        _check_unused(unit, field)
    return found


def _text(unit: dict, name: str, field: str, default: str) -> str:
    value = unit.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _error(f"{field}.{name}", f"must be text, got {type(value).__name__}")
    return value


def _image(unit: dict, field: str) -> str:
    """The unit's one image (base64 / data URL), from any of the extension's shapes."""
    name = "image"
    if unit.get("image") in (None, "") and unit.get("input_image") not in (None, ""):
        name = "input_image"  # the extension's legacy alias
    value, where = unit.get(name), f"{field}.{name}"
    mask = unit.get("mask", unit.get("mask_image"))
    if isinstance(value, list) and len(value) == 2 and not any(isinstance(v, dict) for v in value):
        value, mask = value[0], value[1]  # [image, mask]
    elif isinstance(value, list):
        if len(value) != 1:
            raise _error(where, f"one style image per request, got {len(value)} images")
        value, where = value[0], f"{where}[0]"
    if isinstance(value, dict):
        mask = value.get("mask")
        value, where = value.get("image"), f"{where}.image"
    if mask not in (None, ""):
        raise _error(f"{field}.mask", "IP-Adapter attention masks are not served; send the image alone")
    if value in (None, ""):
        raise _error(where, "an IP-Adapter unit needs an image (base64 PNG, JPEG or WebP)")
    if not isinstance(value, str):
        raise _error(where, f"must be a base64 image, got {type(value).__name__}")
    return value


def _weight(unit: dict, field: str):
    weight = unit.get("weight", 1.0)
    return 1.0 if weight is None else weight  # its type and range: the planner's style_scale check


def _check_unused(unit: dict, field: str) -> None:
    """The unit's fields that would change the extension's result and that lorafleet does not serve: 422s."""
    for name in ("effective_region_mask", "ipadapter_input", "advanced_weighting"):
        if unit.get(name) not in (None, "", []):
            hint = " (per-block scales: the native style_scale)" if name == "advanced_weighting" else ""
            raise _error(f"{field}.{name}", f"is not served for IP-Adapter units{hint}; leave it out")
    for name, default in (("guidance_start", 0.0), ("guidance_end", 1.0)):
        value = unit.get(name, default)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _error(f"{field}.{name}", f"must be a number, got {value!r}"[:200])
        if value != default:
            raise _error(
                f"{field}.{name}",
                f"must be {default:g}: the served IP-Adapter acts at every step (got {value:g})",
            )
    mode = unit.get("control_mode", "Balanced")
    if mode is not None and mode not in _BALANCED:
        raise _error(
            f"{field}.control_mode",
            f"must be 'Balanced' (0): the served IP-Adapter has no prompt / control weighting (got {mode!r})"[:240],
        )


# -- GET /controlnet/... ------------------------------------------------------------------------------------


def model_name(model: str, variant: str, mhash: str) -> str:
    """The name ``GET /controlnet/model_list`` gives a served model's IP-Adapter, in the extension's
    ``name [hash]`` form.

    >>> model_name("tiny-sd", "plus", "0123456789")
    'ip-adapter-plus_tiny-sd [01234567]'
    """
    kind = "ip-adapter-plus" if variant == "plus" else "ip-adapter"
    return f"{kind}_{model} [{mhash[:8]}]"


def module_list(any_served: bool) -> dict:
    """``GET /controlnet/module_list``: the IP-Adapter preprocessors (each runs the served image encoder),
    none when no model is served with IP-Adapter. ``module_detail``: no sliders, each needs a model."""
    modules = list(MODULES) if any_served else []
    return {"module_list": modules, "module_detail": {m: {"model_free": False, "sliders": []} for m in modules}}


def version() -> dict:
    """``GET /controlnet/version``."""
    return {"version": API_VERSION}
