"""Run a ``Plan`` through the graph: TextEncoder -> Denoiser -> VAE, chained DeploymentResponses (beside the
TextEncoder, the VAE's encode for img2img / inpainting and the ImageEncoder for a style image).

Tensors move replica to replica through Ray's object store, never through the
ingress as JSON. Replica deaths are retried once; overload and registry errors
become the HTTP errors clients see.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.engine.adapter_slots import AdapterBudgetError
from deployments.engine.adapters import SlotWaitTimeoutError
from deployments.engine.conditioning import ImageInputError
from deployments.engine.step_scheduler import NonFiniteLatentsError, QueueFullError
from deployments.messages import DecodedImages, Denoised, Preview, Queued, Step
from lora_registry.errors import RegistryError

from .config import LimitsConfig
from .errors import APIError
from .planning import Plan

logger = logging.getLogger("ray.serve")


_KNOWN = (
    QueueFullError,
    BackPressureError,
    RegistryError,
    SlotWaitTimeoutError,
    AdapterBudgetError,
    ImageInputError,
    NonFiniteLatentsError,
)


def _cause(e: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers.

    ``RayTaskError`` subclasses its cause's type (so ``isinstance`` sees a QueueFullError) but
    carries only the remote traceback as text; the original, with its fields, is its ``cause``.
    """
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None)
        if not isinstance(inner, BaseException):
            inner = None if isinstance(e, _KNOWN) else e.__cause__
        if inner is None:
            break
        e = inner
    return e


class ReplicaFailedError(RuntimeError):
    """A replica died (or became unreachable) while it held the request."""


def _replica_died(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (RayActorError, ActorDiedError, ActorUnavailableError)):
            return True
        e = getattr(e, "cause", None) or e.__cause__
    return False


async def resolve(response):
    return await response


@dataclass(frozen=True)
class ModelGraph:
    """One base model's deployments (handles in a replica; bound deployments in ``build_app``)."""

    text_encoder: DeploymentHandle
    denoiser: DeploymentHandle
    vae: DeploymentHandle
    image_encoder: DeploymentHandle | None = None  # models served with IP-Adapter only (style_image)


class GraphClient:
    def __init__(
        self,
        text_encoder: DeploymentHandle,
        denoiser: DeploymentHandle,
        vae: DeploymentHandle,
        limits: LimitsConfig,
        metrics,
        model: str = "",
        image_encoder: DeploymentHandle | None = None,
    ):
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.denoiser = denoiser
        self.vae = vae
        self.limits = limits
        self.metrics = metrics
        self.model = model  # the ``model`` label of this chain's metrics

    @classmethod
    def of(cls, graph: ModelGraph, limits: LimitsConfig, metrics, model: str) -> GraphClient:
        return cls(graph.text_encoder, graph.denoiser, graph.vae, limits, metrics, model, graph.image_encoder)

    async def run(
        self,
        plan: Plan,
        on_event: Callable[[Queued | Step | Preview], None] | None = None,
        preview_every_steps: int = 0,
    ) -> DecodedImages:
        """TextEncoder -> Denoiser -> VAE, chained; returns the VAE's answer, with every stage's timing.

        With ``on_event``, the Denoiser is called as a stream (``denoise_stream``) and
        each progress event goes to ``on_event`` as it comes. If a replica dies under the
        request, the whole chain is retried once: the seed makes the retry give the same image.
        A second failure is a 503, never a hang. If the caller is cancelled (the HTTP client
        went away, a job was deleted), every call still in flight is cancelled too, so the
        denoiser drops the images.
        """
        received = time.perf_counter()
        deadline = received + self.limits.request_timeout_s
        for attempt in (1, 2):
            try:
                result = await self._run_once(plan, deadline, on_event, preview_every_steps)
                break
            except ReplicaFailedError as e:
                self.metrics().replica_failures.inc(tags={"attempt": str(attempt), "model": self.model})
                if attempt == 2:
                    raise APIError(
                        503,
                        "replica_failed",
                        "a replica failed twice while serving this request; retry later",
                        None,
                        {"Retry-After": "5"},
                    ) from e
        m = self.metrics()
        m.images.inc(plan.num_images, tags={"model": self.model})
        for stage, ms in (
            ("encode", result.encode_ms),
            ("queue", result.queue_ms),
            ("denoise", result.denoise_ms),
            ("decode", result.decode_ms),
        ):
            m.stage_latency.observe(ms, tags={"stage": stage, "model": self.model})
        return result

    async def _run_once(
        self, plan: Plan, deadline: float, on_event: Callable | None, preview_every_steps: int
    ) -> DecodedImages:
        inflight: list = []  # every DeploymentResponse(Generator) of this attempt, to cancel
        encoded = self.text_encoder.encode.remote(plan.encode_request())
        inflight.append(encoded)
        conditioning = None
        if plan.conditioning is not None:
            # img2img / inpainting: the VAE encodes the image beside the prompt encoding.
            conditioning = self.vae.encode.remote(plan.conditioning, plan.tenant, plan.tenant_weight)
            inflight.append(conditioning)
        style = {}  # the Denoiser's ``style`` argument, only with a style image
        if plan.style_image is not None:
            # IP-Adapter: the ImageEncoder embeds the style image beside the prompt encoding.
            if self.image_encoder is None:
                raise RuntimeError(f"model {self.model!r} has no ImageEncoder; the planner lets no style_image here")
            style = {"style": self.image_encoder.encode.remote(plan.style_request())}
            inflight.append(style["style"])
        # The Denoiser's router (deployments/routing.py) prefers replicas that hold the adapters.
        denoiser = self.denoiser
        if on_event is None:
            denoised = denoiser.denoise.remote(encoded, plan.denoise_params(), conditioning, **style)
            decoded = self.vae.decode.remote(denoised, plan.decode_params())
            inflight += [denoised, decoded]
            chain = resolve(decoded)
        else:
            chain = self._stream(denoiser, encoded, conditioning, style, plan, on_event, preview_every_steps, inflight)
        try:
            return await asyncio.wait_for(chain, timeout=max(0.0, deadline - time.perf_counter()))
        except asyncio.TimeoutError as e:
            _cancel(inflight)
            raise APIError(504, "timeout", f"no result within {self.limits.request_timeout_s:.0f}s") from e
        except asyncio.CancelledError:
            # The client went away (Serve cancels the handler and, recursively, its calls) or a
            # job was deleted (a task of the Jobs replica, not a Serve request: nothing cancels
            # its calls for it). Either way the calls in flight stop here, the Denoiser's stream too.
            _cancel(inflight)
            raise
        except Exception as e:
            # A failed call fails the calls chained after it; nothing is left to cancel.
            error = _api_error(e)
            if error is e:
                raise
            raise error from e

    async def _stream(
        self,
        denoiser,
        encoded,
        conditioning,
        style: dict,
        plan: Plan,
        on_event,
        preview_every_steps: int,
        inflight: list,
    ) -> DecodedImages:
        stream = denoiser.options(stream=True).denoise_stream.remote(
            encoded, plan.denoise_params(), preview_every_steps, conditioning, **style
        )
        inflight.append(stream)
        denoised = None
        async for event in stream:
            if isinstance(event, Denoised):
                denoised = event
            else:
                on_event(event)
        if denoised is None:
            raise RuntimeError("the Denoiser's stream ended without a result")
        decoded = self.vae.decode.remote(denoised, plan.decode_params())
        inflight.append(decoded)
        return await decoded


class GraphRouter:
    """Runs each plan on its own model's graph (``Plan.model``): the ingress's and the Jobs store's one
    way into the deployments. With a single graph, every plan runs on it (the Jobs replica does not
    read the model, so it knows a single model's name only from the plans)."""

    def __init__(self, clients: dict[str, GraphClient]):
        self.clients = clients

    def client(self, model: str) -> GraphClient:
        if model not in self.clients and len(self.clients) == 1:
            return next(iter(self.clients.values()))
        return self.clients[model]

    async def run(self, plan: Plan, **kwargs) -> DecodedImages:
        return await self.client(plan.model).run(plan, **kwargs)


def _cancel(responses: list) -> None:
    """Cancel every call of a chain. A call that already failed re-raises its error from
    ``cancel()`` (Serve resolves the call first); that call needs no cancelling."""
    for response in responses:
        try:
            response.cancel()
        except Exception:  # noqa: BLE001 - the call is over either way
            pass


def _api_error(e: Exception) -> Exception:
    """The HTTP error a failed chain means (or ``ReplicaFailedError``, or ``e`` itself).

    Messages are built from the errors' fields, never from ``str()`` of what Ray raised: the
    exception Ray hands back is a subclass of the original whose text is the remote traceback
    (paths, pids, the node's IP, actor ids). The log keeps that; clients get one line.
    """
    cause = _cause(e)
    if isinstance(cause, QueueFullError):
        retry = round(cause.retry_after_s)
        message = f"the denoiser queue is full ({cause.queued} of {cause.limit} images waiting); retry in {retry} s"
        return APIError(503, "overloaded", message, None, {"Retry-After": str(retry)})
    if isinstance(cause, (BackPressureError, DeploymentUnavailableError)):
        return APIError(503, "overloaded", "the server is at capacity; retry later", None, {"Retry-After": "2"})
    if isinstance(cause, SlotWaitTimeoutError):
        message = f"no adapter slot became free within {cause.timeout_s:.0f} s; retry later"
        return APIError(503, "adapter_slots_busy", message, "loras", {"Retry-After": "5"})
    if isinstance(cause, NonFiniteLatentsError):  # adapter refs and a step count: safe to show
        if cause.adapters:
            return APIError(422, "non_finite_image", cause.message, "loras")
        logger.error("non-finite latents without adapters: %s", cause.message)
        return APIError(500, "internal_error", "the image could not be computed; the server log has the details")
    if isinstance(cause, AdapterBudgetError):  # its words are counts and config names: safe to show
        return APIError(422, "adapters_exceed_memory", cause.message, "loras")
    if isinstance(cause, RegistryError):
        if cause.status >= 500:  # the store's own words name buckets, endpoints and addresses: logged only
            logger.warning("registry error while serving a request: %s", cause.message)
            return APIError(cause.status, cause.code, "the adapter registry is unavailable; retry later", "loras")
        return APIError(cause.status, cause.code, cause.message, "loras")
    if isinstance(cause, ImageInputError):
        return APIError(422, "invalid_image", cause.message, cause.field)
    if _replica_died(e):
        logger.warning("a replica died under a request: %s", e)
        return ReplicaFailedError("a replica stopped while it held this request")
    return e
