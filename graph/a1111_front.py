"""What the ingress's A1111 routes hold between requests: each caller's options (``a1111_options``) and
in-flight generations (``a1111_progress``), and the served models under A1111's names. No Ray, no HTTP:
the routes in ``ingress.py`` pass the caller (``a1111_options.caller_of``) and the graph call in."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import replace

from deployments.messages import DecodedImages

from . import a1111
from .a1111_options import CHECKPOINT, CallerOptions, Checkpoint, apply_options, options
from .a1111_progress import A1111Work, Outcome
from .errors import APIError


class A1111Front:
    """``checkpoints``: each served model as A1111 names it, the default (first) first."""

    def __init__(
        self,
        checkpoints: list[Checkpoint],
        preview_every_steps: int,
        settings: CallerOptions | None = None,
        work: A1111Work | None = None,
    ):
        self.checkpoints = checkpoints
        self.preview_every_steps = preview_every_steps
        self.settings = settings if settings is not None else CallerOptions()
        self.work = work if work is not None else A1111Work()

    @classmethod
    def of(cls, models: list[tuple[str, str]], preview_every_steps: int) -> A1111Front:
        """From each served model's (name, fingerprint), as ``sd-models`` derives its hashes."""
        checkpoints = [
            Checkpoint(name, a1111.model_hash(fp), hashlib.sha256(fp.encode()).hexdigest()) for name, fp in models
        ]
        return cls(checkpoints, preview_every_steps)

    def resolve(self, text: str) -> str | None:
        """The served model a checkpoint string names (title, name, short hash, file name), else None."""
        return a1111.checkpoint_model(text, [(c.name, c.short_hash) for c in self.checkpoints])

    def checkpoint(self, name: str | None) -> Checkpoint:
        return next((c for c in self.checkpoints if c.name == name), self.checkpoints[0])

    def model_for(self, body: a1111.Txt2ImgRequest, caller: str) -> str | None:
        """The model a generation runs on: its ``override_settings.sd_model_checkpoint`` (404 if no served model
        has that name), else the caller's ``sd_model_checkpoint`` option, else None (the default)."""
        wanted = a1111.requested_checkpoint(body)
        if wanted is None:
            return self.settings.get(caller).model
        name = self.resolve(wanted)
        if name is None:
            titles = ", ".join(repr(c.title) for c in self.checkpoints)
            raise APIError(
                404,
                "model_not_found",
                f"unknown override_settings.{CHECKPOINT} {wanted!r}; served: {titles}",
                f"override_settings.{CHECKPOINT}",
            )
        return name

    def native_call(self, call: a1111.NativeCall, model: str, caller: str) -> a1111.NativeCall:
        """The translated request on ``model``, in the caller's ``samples_format``."""
        fmt = self.settings.get(caller).output_format
        return replace(call, request=replace(call.request, model=model, output_format=fmt))

    def get_options(self, caller: str) -> dict:
        settings = self.settings.get(caller)
        return options(settings, self.checkpoint(settings.model), self.preview_every_steps)

    def set_options(self, caller: str, body: dict) -> dict:
        """Apply a POSTed options dict to ``caller`` alone: ``{"applied": [...], "ignored": [...]}``."""
        settings, applied, ignored = apply_options(body, self.settings.get(caller), self.checkpoints, self.resolve)
        self.settings.set(caller, settings)
        return {"applied": applied, "ignored": ignored}

    async def generate(
        self, caller: str, mode: str, steps: int, run: Callable[..., Awaitable[DecodedImages]]
    ) -> Outcome:
        """``run(on_event=..., preview_every_steps=...)`` (``GraphRouter.run`` bound to the plan) as the caller's
        generation: its progress recorded, stoppable by the caller's ``/interrupt`` and ``/skip``."""
        every = self.preview_every_steps
        return await self.work.run(
            caller, mode, steps, lambda on_event: run(on_event=on_event, preview_every_steps=every)
        )
