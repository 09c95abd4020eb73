"""A1111's ``/sdapi/v1/options``, held per caller: one caller's POST never changes anything for another.

A1111 has one settings object for the whole server: a POST of ``sd_model_checkpoint`` switches the model
for everyone. lorafleet serves several callers (and several models) at once, so the settings a POST applies
are held per caller (``caller_of``) and only change that caller's later A1111 requests:

- ``sd_model_checkpoint``: the model the caller's txt2img / img2img run on when the request's own
  ``override_settings.sd_model_checkpoint`` does not name one (that still wins, as in A1111);
- ``samples_format``: ``png`` (default), ``jpg`` / ``jpeg``, ``webp`` (lossless): the caller's images' format.

``sd_vae`` (``Automatic`` / ``None``: the model's own VAE) and ``CLIP_stop_at_last_layers`` (1) are accepted
with the only values lorafleet has. Any other key is accepted and ignored (A1111 clients post back the whole
dict they read) and named in the answer's ``ignored``; a bad value of a known key is a 422 naming it, and then
nothing is applied. Selections live in the ingress replica's memory, bounded (``CallerOptions``: least recently
used callers go first, and a caller idle for ``ttl_s`` starts again from the defaults).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from fastapi import Request

from .errors import APIError
from .planning import tenant_of

CHECKPOINT = "sd_model_checkpoint"
# A1111's samples_format values -> the native output_format.
SAMPLES_FORMATS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}
VAES = ("Automatic", "None")  # A1111's names for "the checkpoint's own VAE": the only one lorafleet serves


def caller_of(request: Request) -> str:
    """Who an A1111 call is from: the API key (``Authorization: Bearer``, the fair-queuing tenant), else
    A1111's own HTTP Basic credentials (``--api-auth``; webuiapi's ``set_auth``, Open WebUI's
    ``AUTOMATIC1111_API_AUTH``), else the client's network address.

    >>> from starlette.requests import Request as R
    >>> caller_of(R({"type": "http", "headers": [(b"authorization", b"")], "client": ("10.0.0.7", 5)}))
    'addr:10.0.0.7'
    """
    return tenant_of(request, None)  # one identity function for tenants and callers


@dataclass(frozen=True)
class CallerSettings:
    """What a caller's POSTs selected; None: the default (the first served model)."""

    model: str | None = None
    samples_format: str = "png"  # A1111's spelling, as posted ("jpg" stays "jpg")

    @property
    def output_format(self) -> str:
        return SAMPLES_FORMATS[self.samples_format]


class CallerOptions:
    """Each caller's ``CallerSettings``: at most ``max_callers`` (least recently used dropped first),
    each forgotten ``ttl_s`` after its last use."""

    def __init__(self, max_callers: int = 10_000, ttl_s: float = 86_400.0, clock: Callable[[], float] = time.monotonic):
        if max_callers < 1:
            raise ValueError(f"max_callers must be >= 1, got {max_callers}")
        self.max_callers = max_callers
        self.ttl_s = ttl_s
        self.clock = clock
        self._held: OrderedDict[str, tuple[CallerSettings, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def get(self, caller: str) -> CallerSettings:
        held = self._held.get(caller)
        now = self.clock()
        if held is None or now - held[1] >= self.ttl_s:
            self._held.pop(caller, None)
            return CallerSettings()
        self._held[caller] = (held[0], now)
        self._held.move_to_end(caller)
        return held[0]

    def set(self, caller: str, settings: CallerSettings) -> None:
        self._held[caller] = (settings, self.clock())
        self._held.move_to_end(caller)
        while len(self._held) > self.max_callers:
            self._held.popitem(last=False)


@dataclass(frozen=True)
class Checkpoint:
    """A served model as A1111 names it: ``title`` is ``name [short hash]``; ``sha256`` as in sd-models."""

    name: str
    short_hash: str
    sha256: str

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]"


def _invalid(field: str, message: str) -> APIError:
    return APIError(422, "invalid_value", f"{field} {message}", field)


def apply_options(
    body: dict, current: CallerSettings, checkpoints: list[Checkpoint], resolve: Callable[[str], str | None]
) -> tuple[CallerSettings, list[str], list[str]]:
    """A POSTed options dict -> (the caller's new settings, keys applied, keys ignored), both sorted.

    ``resolve`` maps a checkpoint string (title, name, hash, file name) to a served model's name, or None.
    Every known key is checked before anything is applied: a bad value is a 422 naming the key.

    >>> cps = [Checkpoint("tiny-sd", "0123456789", "01" * 32)]
    >>> apply_options({"samples_format": "JPG", "jpeg_quality": 80}, CallerSettings(), cps, lambda s: None)
    (CallerSettings(model=None, samples_format='jpg'), ['samples_format'], ['jpeg_quality'])
    """
    settings, applied = current, []
    if CHECKPOINT in body:
        value = body[CHECKPOINT]
        name = resolve(value) if isinstance(value, str) else None
        if name is None:
            titles = ", ".join(repr(c.title) for c in checkpoints)
            raise _invalid(CHECKPOINT, f"must name a served model ({titles}), got {value!r}")
        settings, applied = replace(settings, model=name), [*applied, CHECKPOINT]
    if "samples_format" in body:
        value = body["samples_format"]
        if not isinstance(value, str) or value.lower() not in SAMPLES_FORMATS:
            raise _invalid("samples_format", f"must be one of {list(SAMPLES_FORMATS)}, got {value!r}")
        settings, applied = replace(settings, samples_format=value.lower()), [*applied, "samples_format"]
    if "sd_vae" in body:
        if body["sd_vae"] not in VAES:
            raise _invalid("sd_vae", f"must be one of {list(VAES)} (each model's own VAE), got {body['sd_vae']!r}")
        applied.append("sd_vae")
    if "CLIP_stop_at_last_layers" in body:
        value = body["CLIP_stop_at_last_layers"]
        if isinstance(value, bool) or value != 1:
            raise _invalid("CLIP_stop_at_last_layers", f"must be 1 (lorafleet has no CLIP skip), got {value!r}")
        applied.append("CLIP_stop_at_last_layers")
    ignored = sorted(k for k in body if k not in applied)
    return settings, sorted(applied), ignored


def options(settings: CallerSettings, checkpoint: Checkpoint, preview_every_steps: int) -> dict:
    """``GET /sdapi/v1/options`` for a caller: A1111's keys (``modules/shared_options.py``) with the values
    lorafleet really uses. ``sd_checkpoint_hash`` is the checkpoint's ``sha256`` as ``GET /sdapi/v1/sd-models``
    lists it (what ``webuiapi``'s ``util_get_current_model`` matches)."""
    return {
        CHECKPOINT: checkpoint.title,
        "sd_checkpoint_hash": checkpoint.sha256,
        "sd_vae": "Automatic",
        "sd_unet": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "samples_format": settings.samples_format,
        "samples_save": False,  # images are answered, never written to the server's disk
        "grid_save": False,
        "eta_noise_seed_delta": 0,
        "live_previews_enable": preview_every_steps > 0,
        "show_progress_every_n_steps": preview_every_steps,
        "sd_lora": "None",
    }
