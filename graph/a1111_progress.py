"""A1111's ``/progress``, ``/interrupt`` and ``/skip``, each scoped to the caller's own A1111 generations.

An A1111 txt2img / img2img runs through the same progress path as an async job (``GraphClient.run`` with
``on_event``: the Denoiser's ``denoise_stream``, its ``Queued`` / ``Step`` / ``Preview`` events and the latent
previews of ``engine/previews.py``); ``A1111Work`` records each generation's events under its caller
(``a1111_options.caller_of``) while the route waits for its images. So:

- ``progress(caller)`` answers A1111's ``ProgressResponse`` for that caller's generations only: ``state``
  describes the oldest one (A1111's "current job"), ``job_count`` is how many the caller has in flight,
  ``progress`` the share of all their steps done, ``current_image`` the latest preview (bare base64 PNG);
- ``interrupt(caller)`` stops every generation of that caller, ``skip(caller)`` the oldest only. A1111's
  ``skip`` ends the current batch of ``n_iter`` and goes on with the next; lorafleet runs all of a request's
  ``batch_size × n_iter`` images side by side, so there is no next batch within it: ``skip`` ends the current
  generation as ``interrupt`` does, and the caller's other generations go on.

A stopped generation leaves the Denoiser's batch at the next step and its request is answered 200 with the
images it finished: none (they all finish together), where A1111 would decode the current latents of the
interrupted batch (see docs/a1111.md). Nobody can stop, or see, another caller's work.

State lives in the ingress replica that runs the request (``ingress.num_replicas: 1``, the default, gives
one view of everything).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from deployments.messages import DecodedImages, Preview, Queued, Step

JOB_NAMES = {"txt2img": "scripts_txt2img", "img2img": "scripts_img2img", "inpaint": "scripts_img2img"}


@dataclass(eq=False)
class Generation:
    """One A1111 generation in flight, as its progress events leave it."""

    caller: str
    mode: str  # "txt2img" | "img2img" | "inpaint"
    steps: int
    started: float  # the work's clock (monotonic)
    timestamp: str  # A1111's job_timestamp, %Y%m%d%H%M%S
    step: int = 0
    position: int | None = None  # images ahead in the Denoiser's queue while queued
    eta_s: float | None = None
    preview: str | None = None  # the latest preview, "data:image/png;base64,..."
    stopped: str | None = None  # "interrupted" | "skipped"
    task: asyncio.Task | None = field(default=None, repr=False)

    def on_event(self, event: Queued | Step | Preview) -> None:
        """A progress event of the Denoiser's stream (as ``JobManager`` records them for async jobs)."""
        if isinstance(event, Queued):
            self.position, self.eta_s = event.position, event.eta_s
        elif isinstance(event, Step):
            self.position, self.eta_s, self.step = None, event.eta_s, event.step
        elif isinstance(event, Preview):
            self.preview = event.image
        else:
            raise TypeError(f"unknown progress event {event!r}")


@dataclass(frozen=True)
class Outcome:
    """What a generation gave: its images (none if stopped) and why it stopped early, if it did."""

    images: list[bytes]
    stopped: str | None = None


IDLE_STATE = {
    "skipped": False,
    "interrupted": False,
    "stopping_generation": False,
    "job": "",
    "job_count": 0,
    "job_timestamp": "0",
    "job_no": 0,
    "sampling_step": 0,
    "sampling_steps": 0,
}


class A1111Work:
    """The A1111 generations in flight on this replica, by caller (oldest first)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._by_caller: dict[str, list[Generation]] = {}

    def in_flight(self, caller: str) -> list[Generation]:
        return list(self._by_caller.get(caller, ()))

    async def run(
        self, caller: str, mode: str, steps: int, run: Callable[[Callable], Awaitable[DecodedImages]]
    ) -> Outcome:
        """``run(on_event)`` (the graph call) as the caller's generation, stoppable by its ``interrupt``/``skip``.

        If the HTTP client goes away, the route is cancelled and so is the graph call (Serve's rule)."""
        gen = Generation(caller, mode, steps, self.clock(), time.strftime("%Y%m%d%H%M%S"))
        self._by_caller.setdefault(caller, []).append(gen)
        gen.task = asyncio.ensure_future(run(gen.on_event))  # a child of this request: same context
        try:
            return Outcome(list((await gen.task).images))
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if gen.stopped is None or getattr(current, "cancelling", lambda: 0)():
                raise  # the route itself is cancelled: the client went away
            return Outcome([], gen.stopped)
        finally:
            self._forget(gen)

    def _forget(self, gen: Generation) -> None:
        gens = self._by_caller.get(gen.caller, [])
        if gen in gens:
            gens.remove(gen)
        if not gens:
            self._by_caller.pop(gen.caller, None)

    def _stop(self, gens: list[Generation], why: str) -> int:
        """Stop those of ``gens`` still running; returns how many it stopped."""
        stopped = 0
        for gen in gens:
            if gen.stopped is None and gen.task is not None and not gen.task.done():
                gen.stopped = why
                gen.task.cancel()  # GraphClient cancels its calls: the images leave the batch at the next step
                stopped += 1
        return stopped

    def interrupt(self, caller: str) -> int:
        """Stop every generation of ``caller``; returns how many."""
        return self._stop(self.in_flight(caller), "interrupted")

    def skip(self, caller: str) -> int:
        """Stop ``caller``'s oldest generation (A1111's current job); returns how many (0 or 1)."""
        return self._stop(self.in_flight(caller)[:1], "skipped")

    def progress(self, caller: str, with_image: bool) -> dict:
        """A1111's ``ProgressResponse`` for ``caller``'s own generations (idle: progress 0, job_count 0)."""
        gens = self.in_flight(caller)
        if not gens:
            return {"progress": 0.0, "eta_relative": 0.0, "state": dict(IDLE_STATE), "current_image": None,
                    "textinfo": None, "current_task": None}  # fmt: skip
        current = gens[0]
        done = sum(g.step for g in gens) / sum(g.steps for g in gens)
        etas = [g.eta_s for g in gens]
        if all(e is not None for e in etas):
            eta = max(etas)
        else:  # A1111's own estimate: the time so far, scaled by the share done (at least 1 %)
            elapsed = self.clock() - min(g.started for g in gens)
            eta = elapsed / max(done, 0.01) - elapsed
        state = {
            **IDLE_STATE,
            "interrupted": current.stopped == "interrupted",
            "skipped": current.stopped == "skipped",
            "job": JOB_NAMES[current.mode],
            "job_count": len(gens),
            "job_timestamp": current.timestamp,
            "sampling_step": current.step,
            "sampling_steps": current.steps,
        }
        image = current.preview.split(",", 1)[1] if with_image and current.preview else None
        textinfo = f"queued, {current.position} images ahead" if current.position is not None else None
        return {"progress": min(done, 1.0), "eta_relative": float(eta), "state": state, "current_image": image,
                "textinfo": textinfo, "current_task": None}  # fmt: skip
