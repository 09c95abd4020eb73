"""HTTP routes: the native API, the OpenAI Images API, models, health and readiness.

Every request is checked here, against the config's limits, before any GPU
work is queued; stages are chained with DeploymentResponses so tensors move
between replicas through Ray's object store, never through this process as
JSON.
"""

import asyncio
import base64
import secrets
import time
from dataclasses import dataclass

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.engine import models
from deployments.engine.adapters import SlotWaitTimeoutError, open_model_registry
from deployments.engine.images import MIME_TYPES
from deployments.engine.prompts import count_tokens
from deployments.engine.step_scheduler import QueueFullError
from lora_registry.errors import RegistryError

from . import errors
from .adapters_api import AdapterResolver, AdminAuth
from .config import AppConfig
from .errors import APIError
from .schemas import (
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    LoRASpec,
    OpenAIImage,
    OpenAIImagesRequest,
    OpenAIImagesResponse,
    Timings,
)

_metrics = None


def metrics():
    """This replica's IngressMetrics, created on first use (metrics live in the replica process)."""
    global _metrics
    if _metrics is None:
        from deployments.metrics import IngressMetrics

        _metrics = IngressMetrics()
    return _metrics


app = FastAPI(
    title="lorafleet",
    description="Text-to-image serving on Ray Serve: one Stable Diffusion model, many LoRA styles.",
    version="0.1.0",
)
errors.install(app)


_GENERATION_ROUTES = {"/v1/generate", "/v1/images/generations"}


@app.middleware("http")
async def _count_requests(request: Request, call_next):
    start = time.perf_counter()
    response = await call_next(request)
    route = request.scope.get("route")
    path = getattr(route, "path", None) or "unmatched"
    m = metrics()
    m.requests.inc(tags={"route": path, "status": str(response.status_code)})
    if path in _GENERATION_ROUTES and response.status_code < 300:
        m.request_latency.observe(1000.0 * (time.perf_counter() - start), tags={"route": path})
    return response


_ERRORS = {
    400: {"description": "Malformed request"},
    422: {"description": "Invalid field value; the error names the field"},
    503: {"description": "Overloaded: retry after the Retry-After header's seconds"},
}


@dataclass(frozen=True)
class Plan:
    """A validated generation request, ready for the graph."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    scheduler: str
    output_format: str
    tenant: str = "anonymous"
    # ((ref, scale), ...): adapters with UNet / text-encoder weights, pinned name@version refs.
    unet_adapters: tuple[tuple[str, float], ...] = ()
    text_adapters: tuple[tuple[str, float], ...] = ()
    applied: tuple[tuple[str, float], ...] = ()

    def denoise_params(self) -> dict:
        return {
            "adapters": [list(a) for a in self.unet_adapters],
            "tenant": self.tenant,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "seed": self.seed,
            "num_images": self.num_images,
            "scheduler": self.scheduler,
        }


def _cause(e: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (RayTaskError subclasses its cause's type)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if inner is None or isinstance(e, (QueueFullError, BackPressureError, RegistryError, SlotWaitTimeoutError)):
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


async def _resolve(response):
    return await response


def _tenant(request: Request, user: str | None) -> str:
    """The fair-scheduling tenant: the API key if one is sent, else the ``user`` field."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer ") and auth[7:].strip():
        import hashlib

        return "key:" + hashlib.sha256(auth[7:].strip().encode()).hexdigest()[:12]
    return f"user:{user}" if user else "anonymous"


def _parse_openai_model(model: str | None) -> tuple[str | None, list[LoRASpec]]:
    """``"tiny-sd:watercolor@2"`` -> (``"tiny-sd"``, [watercolor v2 at scale 1])."""
    if model is None or ":" not in model:
        return model, []
    base, _, adapter = model.partition(":")
    name, _, version = adapter.partition("@")
    if not name or (version and not version.isdigit()):
        raise APIError(422, "invalid_value", f'model must look like "base:adapter[@version]", got {model!r}', "model")
    return base or None, [LoRASpec(name=name, version=int(version) if version else None)]


def _raw_format(accept: str) -> str | None:
    first = accept.split(",")[0].split(";")[0].strip().lower()
    return {v: k for k, v in MIME_TYPES.items()}.get(first)


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    w, sep, h = size.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise APIError(422, "invalid_value", f'size must look like "512x512", got {size!r}', "size")
    return int(w), int(h)


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        text_encoder: DeploymentHandle,
        denoiser: DeploymentHandle,
        vae: DeploymentHandle,
        config: AppConfig,
    ):
        self.config = config
        self.limits = config.limits
        directory = models.resolve_model_dir(config.model.uri, config.model.cache_dir)
        info = models.read_model_info(config.model.uri, directory)
        self.model_name = config.model.name or info.name
        self.info = info
        self.tokenizer = models.load_tokenizer(directory)
        self.registry, self.base_spec = open_model_registry(config.registry, directory)
        self.resolver = AdapterResolver(self.registry, self.base_spec, config.lora)
        self.auth = AdminAuth(config.admin)
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.vae = vae
        self.started = int(time.time())

    # -- validation -------------------------------------------------------------

    def plan(
        self,
        *,
        prompt: str,
        negative_prompt: str,
        model: str | None,
        width: int | None,
        height: int | None,
        steps: int,
        guidance_scale: float,
        seed: int | None,
        num_images: int,
        scheduler: str,
        output_format: str,
        loras: list[LoRASpec] = (),
        tenant: str = "anonymous",
        fields: dict[str, str] | None = None,
    ) -> Plan:
        """Check a request against the limits; ``fields`` maps names to the endpoint's own field names."""
        f = {"width": "width", "height": "height", "num_images": "num_images", "model": "model", **(fields or {})}
        lim = self.limits
        if model is not None and model != self.model_name:
            raise APIError(404, "model_not_found", f"unknown model {model!r}; served: {self.model_name!r}", f["model"])
        if not prompt.strip():
            raise APIError(422, "invalid_value", "prompt must not be empty", "prompt")
        width = self.info.default_side if width is None else width
        height = self.info.default_side if height is None else height
        for name, value in (("width", width), ("height", height)):
            if value % 8 or not lim.min_side <= value <= lim.max_side:
                raise APIError(
                    422,
                    "invalid_value",
                    f"{name} must be a multiple of 8 in [{lim.min_side}, {lim.max_side}], got {value}",
                    f[name],
                )
        if not 1 <= steps <= lim.max_steps:
            raise APIError(422, "invalid_value", f"steps must be in [1, {lim.max_steps}], got {steps}", "steps")
        if not 0 <= guidance_scale <= lim.max_guidance_scale:
            raise APIError(
                422,
                "invalid_value",
                f"guidance_scale must be in [0, {lim.max_guidance_scale}], got {guidance_scale}",
                "guidance_scale",
            )
        if not 1 <= num_images <= lim.max_num_images:
            raise APIError(
                422,
                "invalid_value",
                f"{f['num_images']} must be in [1, {lim.max_num_images}], got {num_images}",
                f["num_images"],
            )
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            n_tokens = count_tokens(self.tokenizer, text)
            if n_tokens > self.info.max_prompt_tokens:
                raise APIError(
                    422,
                    "prompt_too_long",
                    f"{name} is {n_tokens} tokens; the limit is {self.info.max_prompt_tokens} tokens "
                    "(CLIP's context, start and end tokens included)",
                    name,
                )
        if seed is None:
            seed = secrets.randbelow(2**31)
        unet_adapters, text_adapters, applied = self.resolver.resolve(list(loras), field=f.get("loras", "loras"))
        return Plan(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=float(guidance_scale),
            seed=seed,
            num_images=num_images,
            scheduler=scheduler,
            output_format=output_format,
            tenant=tenant,
            unet_adapters=unet_adapters,
            text_adapters=text_adapters,
            applied=applied,
        )

    # -- the graph ---------------------------------------------------------------

    async def run(self, plan: Plan) -> dict:
        """TextEncoder -> Denoiser -> VAE, chained; returns the VAE's output with all timings.

        If a replica dies under the request, the whole chain is retried once: the seed makes
        the retry give the same image. A second failure is a 503, never a hang.
        """
        received = time.perf_counter()
        deadline = received + self.limits.request_timeout_s
        for attempt in (1, 2):
            try:
                result = await self._run_once(plan, deadline)
                break
            except ReplicaFailedError as e:
                metrics().replica_failures.inc(tags={"attempt": str(attempt)})
                if attempt == 2:
                    raise APIError(
                        503,
                        "replica_failed",
                        f"a replica failed twice while serving this request: {e}",
                        None,
                        {"Retry-After": "5"},
                    ) from e
        result["total_ms"] = 1000.0 * (time.perf_counter() - received)
        m = metrics()
        m.images.inc(plan.num_images)
        for stage in ("encode", "queue", "denoise", "decode"):
            m.stage_latency.observe(result[f"{stage}_ms"], tags={"stage": stage})
        return result

    async def _run_once(self, plan: Plan, deadline: float) -> dict:
        encoded = self.text_encoder.encode.remote(
            plan.prompt, plan.negative_prompt, [list(a) for a in plan.text_adapters]
        )
        denoiser = self.denoiser
        if plan.unet_adapters:
            # Prefer replicas that already hold the request's first adapter (Serve multiplexing).
            denoiser = denoiser.options(multiplexed_model_id=plan.unet_adapters[0][0])
        denoised = denoiser.denoise.remote(encoded, plan.denoise_params())
        decoded = self.vae.decode.remote(denoised, plan.output_format)
        try:
            return await asyncio.wait_for(_resolve(decoded), timeout=max(0.0, deadline - time.perf_counter()))
        except asyncio.TimeoutError as e:
            decoded.cancel()
            raise APIError(504, "timeout", f"no result within {self.limits.request_timeout_s:.0f}s") from e
        except Exception as e:
            cause = _cause(e)
            if isinstance(cause, QueueFullError):
                raise APIError(
                    503, "overloaded", str(cause), None, {"Retry-After": str(round(cause.retry_after_s))}
                ) from e
            if isinstance(cause, (BackPressureError, DeploymentUnavailableError)):
                raise APIError(
                    503, "overloaded", "the server is at capacity; retry later", None, {"Retry-After": "2"}
                ) from e
            if isinstance(cause, SlotWaitTimeoutError):
                raise APIError(503, "adapter_slots_busy", str(cause), "loras", {"Retry-After": "5"}) from e
            if isinstance(cause, RegistryError):
                raise APIError(cause.status, cause.code, cause.message, "loras") from e
            if _replica_died(e):
                raise ReplicaFailedError(str(e).splitlines()[0][:300]) from e
            raise

    # -- routes ------------------------------------------------------------------

    @app.post(
        "/v1/generate", response_model=GenerateResponse, responses={200: {"content": {"image/png": {}}}, **_ERRORS}
    )
    async def generate(self, body: GenerateRequest, request: Request):
        """Generate images. With ``num_images=1`` and ``Accept: image/png`` (or jpeg, webp) the raw image comes back."""
        raw = _raw_format(request.headers.get("accept", ""))
        plan = await self.plan_async(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            model=body.model,
            width=body.width,
            height=body.height,
            steps=body.steps,
            guidance_scale=body.guidance_scale,
            seed=body.seed,
            num_images=body.num_images,
            scheduler=body.scheduler,
            output_format=raw if raw and body.num_images == 1 else body.output_format,
            loras=body.loras,
            tenant=_tenant(request, body.user),
        )
        result = await self.run(plan)
        if raw and plan.num_images == 1:
            return Response(
                result["images"][0],
                media_type=MIME_TYPES[raw],
                headers={"X-Seed": str(plan.seed), "X-Model": self.model_name},
            )
        return GenerateResponse(
            images=[
                GeneratedImage(
                    b64=base64.b64encode(data).decode(), seed=plan.seed + k, width=plan.width, height=plan.height
                )
                for k, data in enumerate(result["images"])
            ],
            model=self.model_name,
            loras=[{"ref": ref, "scale": scale} for ref, scale in plan.applied],
            trace=result.get("trace", {}),
            timings=Timings(
                queue_ms=result["queue_ms"],
                encode_ms=result["encode_ms"],
                denoise_ms=result["denoise_ms"],
                decode_ms=result["decode_ms"],
            ),
        )

    @app.post("/v1/images/generations", response_model=OpenAIImagesResponse, responses=_ERRORS)
    async def images_generations(self, body: OpenAIImagesRequest, request: Request):
        """The OpenAI Images API: works with the official ``openai`` client.

        ``model`` may name an adapter: ``"tiny-sd:watercolor"`` or ``"tiny-sd:watercolor@2"``.
        """
        if body.response_format != "b64_json":
            raise APIError(
                400,
                "unsupported_response_format",
                f'response_format {body.response_format!r} is not served; use "b64_json"',
                "response_format",
            )
        width, height = _parse_size(body.size)
        base, loras = _parse_openai_model(body.model)
        plan = await self.plan_async(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            model=base,
            width=width,
            height=height,
            steps=body.steps,
            guidance_scale=body.guidance_scale,
            seed=body.seed,
            num_images=body.n,
            scheduler=body.scheduler,
            output_format=body.output_format,
            loras=loras + list(body.loras),
            tenant=_tenant(request, body.user),
            fields={"width": "size", "height": "size", "num_images": "n", "loras": "model" if loras else "loras"},
        )
        result = await self.run(plan)
        return OpenAIImagesResponse(
            created=int(time.time()),
            data=[OpenAIImage(b64_json=base64.b64encode(d).decode()) for d in result["images"]],
        )

    async def plan_async(self, **kwargs) -> Plan:
        """``plan`` in a thread: resolving adapters may read the registry's store."""
        try:
            return await asyncio.to_thread(self.plan, **kwargs)
        except RegistryError as e:
            raise APIError(e.status, e.code, e.message, kwargs.get("fields", {}).get("loras", "loras")) from e

    # -- adapter registry (admin API) -------------------------------------------------

    async def registry_op(self, operation: str, fn, *args):
        """Run a registry call in a thread, counting its outcome."""
        m = metrics()
        try:
            result = await asyncio.to_thread(fn, *args)
        except RegistryError as e:
            m.registry_ops.inc(tags={"operation": operation, "outcome": "error"})
            m.registry_errors.inc(tags={"code": e.code})
            raise
        except APIError:
            m.registry_ops.inc(tags={"operation": operation, "outcome": "rejected"})
            raise
        m.registry_ops.inc(tags={"operation": operation, "outcome": "ok"})
        return result

    @app.post("/v1/adapters", status_code=201, responses={401: {}, 403: {}, 409: {}, 413: {}, 422: {}, 503: {}})
    async def register_adapter(
        self,
        request: Request,
        file: UploadFile = File(..., description="LoRA safetensors: diffusers/PEFT or kohya"),
        name: str = Form(...),
        description: str = Form(""),
        trigger_words: str = Form("", description="comma-separated"),
        tags: str = Form("", description="comma-separated"),
        adapter_config: str | None = Form(None, description="PEFT adapter_config.json contents"),
    ):
        """Register a LoRA file as the next version of ``name``; usable at once, cluster-wide."""
        self.auth.check(request, write=True)
        manifest = await self.registry_op(
            "register", self.resolver.register, file.file, name, description, trigger_words, tags, adapter_config
        )
        return JSONResponse(manifest.to_dict(), status_code=201)

    @app.get("/v1/adapters")
    async def list_adapters(self, request: Request, tag: str | None = None, limit: int = 50, after: str | None = None):
        """One entry per adapter name (its latest version and live versions), sorted by name, paged."""
        self.auth.check(request, write=False)
        return await self.registry_op("list", self.resolver.list, tag, limit, after)

    @app.get("/v1/adapters/{ref}")
    async def show_adapter(self, ref: str, request: Request):
        """``name`` (latest version, with the list of versions) or ``name@version``."""
        self.auth.check(request, write=False)
        return await self.registry_op("show", self.resolver.show, ref)

    @app.delete("/v1/adapters/{ref}")
    async def delete_adapter(self, ref: str, request: Request):
        """Delete one version (``name@3``) or every version (``name``); gone from listings at once."""
        self.auth.check(request, write=True)
        return await self.registry_op("delete", self.resolver.delete, ref)

    @app.get("/v1/models")
    async def list_models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": self.started,
                    "owned_by": "lorafleet",
                    "uri": self.config.model.uri,
                    "default_size": f"{self.info.default_side}x{self.info.default_side}",
                    "default_scheduler": self.info.scheduler_class,
                }
            ],
        }

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        names = ("TextEncoder", "Denoiser", "VAE")
        handles = (self.text_encoder, self.denoiser, self.vae)
        results = await asyncio.gather(
            *(asyncio.wait_for(_resolve(h.ready.remote()), timeout=5.0) for h in handles), return_exceptions=True
        )
        status = {
            n: ("ready" if r is True else f"not ready: {type(r).__name__}") for n, r in zip(names, results, strict=True)
        }
        if all(r is True for r in results):
            return {"status": "ready", "deployments": status}
        return errors.error_response(503, "not_ready", f"deployments not ready: {status}", None)
