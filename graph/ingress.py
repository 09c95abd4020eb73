"""HTTP routes: the native API, the OpenAI Images API, the adapter registry, models, health, readiness.

A generation route parses its body (``schemas``), translates it into the native request
(``validation.native_input``, ``openai_images``, ``a1111``), has ``Planner.check_inputs`` turn that
into a checked ``Plan`` (errors renamed back into the route's own field names), runs it through the
graph (``chain``) and shapes the answer.
"""

import asyncio
import base64
import dataclasses
import functools
import hashlib
import time
from collections.abc import AsyncIterable

from fastapi import Depends, FastAPI, File, Form, Header, Request, Security, UploadFile
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.engine.images import MIME_TYPES
from deployments.messages import DecodedImages
from lora_registry.errors import RegistryError
from lora_registry.keys import KeyStoreError

from . import a1111, a1111_controlnet, a1111_info, errors, job_routes, openai_images, page
from .a1111_front import A1111Front
from .a1111_options import caller_of
from .adapters_api import AdminAuth
from .admission import Admission
from .auth import GatedGraph, KeyCreate, KeyUpdate, TenantGate, TenantMetrics, held_job, key_store
from .chain import GraphClient, GraphRouter, ModelGraph, resolve
from .config import AppConfig
from .edge import EdgeLimits, EdgePolicy, SecurityHeaders
from .errors import APIError, FieldError
from .multipart_bodies import MultipartBodies
from .planning import Plan, raw_format
from .schemas import (
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    Img2ImgRequest,
    InpaintRequest,
    JobCreated,
    JobObject,
    JobRequest,
    OpenAIImagesRequest,
    OpenAIImagesResponse,
    Timings,
)
from .served import ServedModel, ServedModels
from .validation import NATIVE, FieldNames, GenerationInput, check_text, native_input
from .webhooks import check_webhook_url

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
    description="Text-to-image serving on Ray Serve: Stable Diffusion models (SD1.x, SDXL), many LoRA styles.",
    version="0.1.0",
)


def _edge_policy() -> EdgePolicy | None:
    """This replica's ``EdgePolicy`` (``Ingress.edge``), found as Serve's class-based view finds the replica."""
    try:
        replica = serve.get_replica_context().servable_object
    except Exception:  # not in a replica (yet): nothing to check against
        return None
    return getattr(replica, "edge", None)


# Declares the admin routes' bearer scheme in OpenAPI; the check itself is AdminAuth (and EdgeLimits for uploads).
_admin_bearer = HTTPBearer(
    scheme_name="adminToken", description="The admin token (admin.token or $LORAFLEET_ADMIN_TOKEN).", auto_error=False
)
_ADMIN = [Security(_admin_bearer)]

_GENERATION_ROUTES = {
    "/v1/generate",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/img2img",
    "/v1/inpaint",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
}


class RequestMetrics:
    """``lorafleet_requests_total`` by route and status, unhandled exceptions as 500 (the global handler
    answers them outside the middleware stack), and the latency of successful generations (to the
    response's start). A plain ASGI middleware: it passes ``receive`` through untouched, so a body cap
    raised while the route reads (``edge.BodyTooLarge``) reaches FastAPI as itself."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = None

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                path = _route_template(scope)
                if path in _GENERATION_ROUTES and status < 300:
                    ms = 1000.0 * (time.perf_counter() - start)
                    metrics().request_latency.observe(ms, tags={"route": path, "model": _model_of(scope)})
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            status = 500 if status is None else status
            raise
        finally:
            tags = {"route": _route_template(scope), "status": str(status or 500), "model": _model_of(scope)}
            metrics().requests.inc(tags=tags)


def _route_template(scope) -> str:
    return getattr(scope.get("route"), "path", None) or "unmatched"


def _model_of(scope) -> str:
    """The base model a request was for (``request.state.model``, set once the route picked it), else ``-``."""
    return (scope.get("state") or {}).get("model", "-")


def install_edge(fastapi_app: FastAPI, policy) -> None:
    """What every request meets before and after its route: the one error shape (``errors``), and the
    middleware, outermost first: ``SecurityHeaders``, ``EdgeLimits`` (it counts its own refusals: they
    never reach a route), ``RequestMetrics``, ``MultipartBodies`` (``multipart_bodies.py``)."""
    errors.install(fastapi_app)
    fastapi_app.add_middleware(MultipartBodies)  # innermost: a native route's form becomes its JSON body
    fastapi_app.add_middleware(RequestMetrics)
    fastapi_app.add_middleware(EdgeLimits, policy=policy)
    fastapi_app.add_middleware(SecurityHeaders)


install_edge(app, _edge_policy)


def _record_body(route: str, nbytes: int) -> None:
    if nbytes > 0:
        metrics().request_body_bytes.inc(nbytes, tags={"route": route})


def _count_refusal(route: str, status: int) -> None:
    metrics().requests.inc(tags={"route": route, "status": str(status), "model": "-"})


def replica_alias(replica_id: str) -> str:
    """What a caller without the admin token sees of a replica id: stable per replica (so a client can
    still tell replicas apart), not the id Ray and Serve know it by."""
    return "r-" + hashlib.sha256(f"lorafleet-replica:{replica_id}".encode()).hexdigest()[:12] if replica_id else ""


_ERRORS = {
    400: {"description": "Malformed request"},
    422: {"description": "Invalid field value; the error names the field"},
    503: {"description": "Overloaded: retry after the Retry-After header's seconds"},
}
# The OpenAI routes: JSON, or with ``stream: true`` Server-Sent Events; errors as {"error": {message, type, param,
# code}}.
_OPENAI_RESPONSES = {200: {"content": {"text/event-stream": {}}}, **_ERRORS}


async def _existing_job(job_id: str) -> None:
    """404 before a job's event stream starts (a streamed answer's 200 is final): the dependency finds the
    replica's Jobs handle as Serve's class-based view finds the replica."""
    await job_routes.require(serve.get_replica_context().servable_object.jobs, job_id)


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, graphs: list[ModelGraph] | None, config: AppConfig, jobs: DeploymentHandle | None = None):
        """``graphs``: each served model's deployments, in ``config.served_models()``'s order (None: no
        deployments, for tests that replace ``self.graph``)."""
        self.config = config
        self.models = ServedModels.open(config)
        if graphs is None:
            graphs = [ModelGraph(None, None, None) for _ in self.models.all]
        self.handles = dict(zip(self.models.names, graphs, strict=True))
        self.auth = AdminAuth(config.admin)
        tenant_metrics = TenantMetrics(config.auth.max_tenant_labels)
        self.gate = TenantGate(config.auth, None, self.auth.is_admin, metrics=tenant_metrics)
        # Past capacity, 503 over a tenant's fair share, else a wait in fair order (graph/admission.py).
        weights = {
            m.name: s.denoiser.tenant_weights for m, s in zip(self.models.all, config.served_models(), strict=True)
        }
        self.admission = Admission(config.admission, weights, metrics=tenant_metrics)
        self.graph = GraphRouter(
            {m.name: GraphClient.of(self.handles[m.name], m.limits, metrics, m.name) for m in self.models.all}
        )
        self.scales_from_zero = {
            served_model.name: served.denoiser.autoscaling is not None
            and served.denoiser.autoscaling.get("min_replicas", 1) == 0
            for served_model, served in zip(self.models.all, config.served_models(), strict=True)
        }
        self.edge = EdgePolicy(
            limits=config.limits,
            upload_bytes=config.upload_limit_bytes(),
            admin_check=lambda headers: self.auth.problem(headers, write=True),
            record_body=_record_body,
            count_refusal=_count_refusal,
            style_images=any(served.model.ip_adapter is not None for served in config.served_models()),
        )
        self.jobs = jobs  # the Jobs deployment (graph/jobs.py): the async-job store
        self.started = int(time.time())

    @property
    def graph(self) -> GatedGraph:
        """The graph every synchronous generation runs through, holding its images in flight (``graph/auth.py``)."""
        return self._graph

    @graph.setter
    def graph(self, graph) -> None:  # tests put fakes here: they are gated too
        self._graph = GatedGraph(graph, self.gate, self.admission)

    @functools.cached_property
    def keys(self):
        """Tenant keys in the registry's store (``lora_registry/keys.py``), opened on first use."""
        return key_store(self.config.registry)

    async def tenant(self, request: Request, user: str | None = None) -> str:
        """Who a generation is from (401 without a valid key when keys are required, 429 over the rate):
        the one check every generation route makes, before planning. With keys, in a thread: it may read
        the key's record from the store."""
        if not self.config.auth.require_keys:
            return self.gate.tenant(request, user).id
        if self.gate.keys is None:
            self.gate.keys = self.keys
        return (await asyncio.to_thread(self.gate.tenant, request, user)).id

    @property
    def resolver(self):
        """The default model's adapters: the registry's reads and writes without a ``model``."""
        return self.models.default.resolver

    def model_for(self, name: str | None, request: Request | None = None, field: str = "model") -> ServedModel:
        """The served model ``name`` names (None: the default), noted on the request for its metrics."""
        served = self.models.pick(name, field)
        if request is not None:
            request.state.model = served.name
        return served

    # -- routes ------------------------------------------------------------------

    @app.post(
        "/v1/generate", response_model=GenerateResponse, responses={200: {"content": {"image/png": {}}}, **_ERRORS}
    )
    async def generate(self, body: GenerateRequest, request: Request):
        """Generate images. With ``num_images=1`` and ``Accept: image/png`` (or jpeg, webp) the raw image comes back."""
        return await self.native(body, request)

    @app.post(
        "/v1/img2img", response_model=GenerateResponse, responses={200: {"content": {"image/png": {}}}, **_ERRORS}
    )
    async def img2img(self, body: Img2ImgRequest, request: Request):
        """Restyle an image: ``image`` noised to ``strength``, then denoised with the prompt (and LoRAs).

        Runs in the same step-level batches as text-to-image requests. ``Accept: image/png`` as for /v1/generate.
        """
        return await self.native(body, request)

    @app.post(
        "/v1/inpaint", response_model=GenerateResponse, responses={200: {"content": {"image/png": {}}}, **_ERRORS}
    )
    async def inpaint(self, body: InpaintRequest, request: Request):
        """Repaint the white part of ``mask``. Works with ordinary checkpoints (latent blending) and with
        9-channel inpainting UNets; with ``preserve_unmasked`` the black part comes back pixel for pixel."""
        return await self.native(body, request)

    async def native(self, body: GenerateRequest, request: Request):
        """A native generation route: the body's names are the canonical ones."""
        raw = raw_format(request.headers.get("accept", ""))
        plan = await self.check_inputs(native_input(body, await self.tenant(request, body.user), raw), http=request)
        return self.generated(plan, await self.graph.run(plan), raw, admin=self.auth.is_admin(request.headers))

    async def check_inputs(
        self, request: GenerationInput, names: FieldNames = NATIVE, http: Request | None = None
    ) -> Plan:
        """The request's model (``request.model``; none: the default), then its ``Planner.check_inputs`` in
        a thread (it decodes uploads and may read the registry's store); errors in the route's own names."""
        try:
            served = self.model_for(request.model, http)
            check_text(request, served.limits)  # before any tokenizing: cheap, and first
            plan = await asyncio.to_thread(served.planner.check_inputs, request)
        except FieldError as e:
            raise names.translate(e) from e
        weight = self.gate.admitted(plan.tenant).weight  # a tenant key's weight, never a request field's
        return plan if weight is None else dataclasses.replace(plan, tenant_weight=weight)

    def generated(self, plan: Plan, result: DecodedImages, raw: str | None, admin: bool = False):
        """The native answer: the raw image (``Accept: image/...``, one image) or ``GenerateResponse``.

        ``trace`` names the Denoiser replica by its id for admins, by an alias (``replica_alias``) for others."""
        if raw and plan.num_images == 1:
            return Response(
                result.images[0],
                media_type=MIME_TYPES[raw],
                headers={"X-Seed": str(plan.seed), "X-Model": plan.model},
            )
        return GenerateResponse(
            images=[
                GeneratedImage(
                    b64=base64.b64encode(data).decode(), seed=plan.seed + k, width=plan.width, height=plan.height
                )
                for k, data in enumerate(result.images)
            ],
            model=plan.model,
            loras=[{"ref": ref, "scale": scale} for ref, scale in plan.applied],
            trace=result.trace.to_dict()
            if admin
            else {**result.trace.to_dict(), "denoiser_replica": replica_alias(result.trace.denoiser_replica)},
            timings=Timings(
                queue_ms=result.queue_ms,
                encode_ms=result.encode_ms,
                denoise_ms=result.denoise_ms,
                decode_ms=result.decode_ms,
                encode_wait_ms=result.encode_wait_ms,
                decode_wait_ms=result.decode_wait_ms,
                step_ms=result.step_ms,
            ),
        )

    # -- OpenAI Images API ------------------------------------------------------------------
    # Translated in and out by graph/openai_images.py; errors in OpenAI's shape (graph/errors.py).

    @app.post(
        "/v1/images/generations",
        response_model=OpenAIImagesResponse,
        response_model_exclude_none=True,
        responses=_OPENAI_RESPONSES,
    )
    async def images_generations(self, body: OpenAIImagesRequest, request: Request):
        """The OpenAI Images API: works with the official ``openai`` client. ``stream: true``: Server-Sent Events.

        ``model`` may name an adapter: ``"tiny-sd:watercolor"`` or ``"tiny-sd:watercolor@2"``.
        """
        how = openai_images.delivery(body, openai_images.GENERATION)
        tenant = await self.tenant(request, body.safety_identifier or body.user)
        plan = await self.check_inputs(*openai_images.to_input(body, tenant), http=request)
        return await self.openai_answer(plan, how, request)

    @app.post(
        "/v1/images/edits",
        response_model=OpenAIImagesResponse,
        response_model_exclude_none=True,
        responses=_OPENAI_RESPONSES,
        openapi_extra=openai_images.EDIT_OPENAPI,
    )
    async def images_edits(self, request: Request):
        """OpenAI's image edits (multipart): img2img of ``image``, or with ``mask`` inpainting of its
        transparent part. ``strength`` (lorafleet's): 0.75 by default, 1.0 with a mask."""
        form, image, mask, style = await openai_images.read_edit(request, self.config.limits.max_image_bytes)
        how = openai_images.delivery(form, openai_images.EDIT)
        tenant = await self.tenant(request, form.safety_identifier or form.user)
        edit = await asyncio.to_thread(openai_images.edit_input, form, image, mask, tenant, self.config.limits, style)
        plan = await self.check_inputs(*edit, http=request)
        return await self.openai_answer(plan, how, request)

    async def openai_answer(self, plan: Plan, how: openai_images.Delivery, request: Request):
        """Run an OpenAI request's plan: a stream of events, or the images as base64 or as URLs (held in the
        Jobs store for ``openai.image_url_ttl_s``)."""
        if how.stream:
            self.graph.check_room(plan)  # a 429 before the stream's 200; the run holds its images
            every = how.preview_every_steps(plan.steps)

            def run(on_event):
                return self.graph.run(plan, on_event=on_event, preview_every_steps=every)

            return EventSourceResponse(openai_images.stream(run, how, plan.width, plan.height))
        result = await self.graph.run(plan)
        images = await asyncio.to_thread(openai_images.encode_output, result.images, how)
        size = f"{plan.width}x{plan.height}"
        if how.response_format == "b64_json":
            return openai_images.to_response(images, how, size)
        ttl_s = self.config.openai.image_url_ttl_s
        file_id = await job_routes.keep(self.jobs, plan, images, ttl_s)
        expires = int(time.time() + ttl_s)
        urls = openai_images.image_urls(str(request.base_url), file_id, len(images), how.output_format, expires)
        return openai_images.to_response(images, how, size, urls)

    @app.get(
        "/v1/images/files/{file_id}/{name}",
        responses={200: {"content": {m: {} for m in MIME_TYPES.values()}}, 404: {"description": "image_expired"}},
    )
    async def images_file(self, file_id: str, name: str, expires: int | None = None) -> Response:
        """An image of a ``response_format: "url"`` answer, while it lasts (``openai.image_url_ttl_s``)."""
        return await openai_images.file_response(self.jobs, file_id, name, expires)

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

    @app.post(
        "/v1/adapters",
        status_code=201,
        responses={401: {}, 403: {}, 409: {}, 413: {}, 422: {}, 503: {}},
        dependencies=_ADMIN,
    )
    async def register_adapter(
        self,
        request: Request,
        file: UploadFile = File(..., description="LoRA safetensors: diffusers/PEFT or kohya"),
        name: str = Form(...),
        description: str = Form(""),
        trigger_words: str = Form("", description="comma-separated"),
        tags: str = Form("", description="comma-separated"),
        adapter_config: str | None = Form(None, description="PEFT adapter_config.json contents"),
        model: str | None = Form(None, description="The base model it is for (GET /v1/models); default: the first"),
    ):
        """Register a LoRA file as the next version of ``name``, for ``model``; usable at once, cluster-wide.
        A file made for another base model gets a 422 naming both."""
        self.auth.check(request, write=True)
        resolver = self.model_for(model or None, request).resolver
        manifest = await self.registry_op(
            "register", resolver.register, file.file, name, description, trigger_words, tags, adapter_config
        )
        return JSONResponse({**manifest.to_dict(), "model": resolver.served_name}, status_code=201)

    @app.get("/v1/adapters", dependencies=_ADMIN)
    async def list_adapters(
        self,
        request: Request,
        tag: str | None = None,
        limit: int = 50,
        after: str | None = None,
        model: str | None = None,
    ):
        """One entry per adapter name (its latest version and live versions, and ``model``: the base it is for),
        sorted by name, paged. ``model=`` keeps one base model's adapters (a page may then come back short:
        page on until ``next`` is null)."""
        self.auth.check(request, write=False)
        if model is None:
            return await self.registry_op("list", self.resolver.list, tag, limit, after)
        resolver = self.model_for(model, request).resolver
        return await self.registry_op("list", resolver.list, tag, limit, after, True)

    @app.get("/v1/adapters/{ref}", dependencies=_ADMIN)
    async def show_adapter(self, ref: str, request: Request):
        """``name`` (latest version, with the list of versions) or ``name@version``."""
        self.auth.check(request, write=False)
        return await self.registry_op("show", self.resolver.show, ref)

    @app.delete("/v1/adapters/{ref}", dependencies=_ADMIN)
    async def delete_adapter(self, ref: str, request: Request):
        """Delete one version (``name@3``) or every version (``name``); gone from listings at once."""
        self.auth.check(request, write=True)
        return await self.registry_op("delete", self.resolver.delete, ref)

    # -- tenant keys (admin API) ----------------------------------------------------------------
    # Stored hashed in the registry's store (lora_registry/keys.py); every route needs the admin token.

    async def keys_op(self, request: Request, fn, *args):
        self.auth.check(request, write=True)
        try:
            return await asyncio.to_thread(fn, *args)
        except KeyStoreError as e:
            status = {"key_exists": 409, "key_not_found": 404}.get(e.code, 422)
            raise APIError(status, e.code, str(e), "name" if status != 404 else None) from e

    @app.post("/v1/admin/keys", status_code=201, dependencies=_ADMIN, responses={401: {}, 403: {}, 409: {}, 422: {}})
    async def create_key(self, body: KeyCreate, request: Request) -> dict:
        """A new tenant key: the answer's ``key`` is shown this once (the store keeps its SHA-256 only)."""
        quota = body.quota.model_dump(exclude_none=True)
        raw, record = await self.keys_op(request, self.keys.create, body.name, body.weight, quota)
        return {"key": raw, **record.public()}

    @app.get("/v1/admin/keys", dependencies=_ADMIN)
    async def list_keys(self, request: Request) -> dict:
        """Every tenant key (revoked ones too): id, name, weight, quota overrides; never a key or its hash."""
        records = await self.keys_op(request, self.keys.list)
        return {"object": "list", "data": [r.public() for r in records]}

    @app.patch("/v1/admin/keys/{name}", dependencies=_ADMIN, responses={404: {}, 422: {}})
    async def update_key(self, name: str, body: KeyUpdate, request: Request) -> dict:
        """Change a key's weight or quota overrides; ingresses apply it within ``auth.key_cache_ttl_s``."""
        return (await self.keys_op(request, self.keys.set, name, body.weight, body.quota)).public()

    @app.delete("/v1/admin/keys/{name}", dependencies=_ADMIN, responses={404: {}})
    async def revoke_key(self, name: str, request: Request) -> dict:
        """Revoke a key (by name or id): 401 from then on (within ``auth.key_cache_ttl_s``)."""
        return (await self.keys_op(request, self.keys.revoke, name)).public()

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        """Every served base model, the default (for requests without ``model``) first: its kind (``sd1``,
        ``sdxl``) and family (``sdxl-inpaint``, ...), native size (the default) and largest size. ``uri``
        (where its weights are stored) only for the admin token."""
        admin = self.auth.is_admin(request.headers)
        return {"object": "list", "data": [m.describe(self.started, admin) for m in self.models.all]}

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz(self):
        """Ready when every model's deployments answer; a model that scales from zero is not woken (it is
        listed as ``scales from zero``)."""
        checks = {}
        status = {}
        for served, suffix in zip(self.models.all, (s.suffix for s in self.config.served_models()), strict=True):
            graph = self.handles[served.name]
            stages = [("TextEncoder", graph.text_encoder), ("Denoiser", graph.denoiser), ("VAE", graph.vae)]
            if graph.image_encoder is not None:  # models served with IP-Adapter
                stages.append(("ImageEncoder", graph.image_encoder))
            for stage, handle in stages:
                if self.scales_from_zero[served.name]:
                    status[stage + suffix] = "scales from zero"
                else:
                    checks[stage + suffix] = handle

        async def ready(handle) -> bool:
            return await asyncio.wait_for(resolve(handle.ready.remote()), timeout=5.0)

        results = await asyncio.gather(*(ready(h) for h in checks.values()), return_exceptions=True)
        for name, r in zip(checks, results, strict=True):
            status[name] = "ready" if r is True else f"not ready: {type(r).__name__}"
        if all(r is True for r in results):
            return {"status": "ready", "deployments": status}
        return errors.error_response(503, "not_ready", f"deployments not ready: {status}", None)

    # -- AUTOMATIC1111 -------------------------------------------------------------------
    # The A1111 web UI's API over the same planner and graph (rules: graph/a1111.py).

    @functools.cached_property
    def a1111_front(self) -> A1111Front:
        """Each caller's A1111 options and in-flight generations (graph/a1111_front.py)."""
        models = [(m.name, m.base_spec.fingerprint) for m in self.models.all]
        return A1111Front.of(models, self.config.jobs.preview_every_steps)

    async def a1111_generate(self, body: a1111.Txt2ImgRequest, request: Request, translate) -> dict:
        """An A1111 generation on its model (``override_settings``, else the caller's options): translated
        (``translate``: ``a1111.txt2img_call`` or ``img2img_call``), planned, run as the caller's generation
        (``/progress``, ``/interrupt``, ``/skip``) and answered in A1111's shape."""
        front, caller = self.a1111_front, caller_of(request)
        served = self.model_for(front.model_for(body, caller), request)
        samplers = a1111.sampler_table(served.info.scheduler_class)
        call = translate(body, served.limits, samplers, await self.tenant(request))
        call = front.native_call(call, served.name, caller)
        plan = await self.check_inputs(call.request, call.names)
        outcome = await front.generate(caller, call.mode, plan.steps, functools.partial(self.graph.run, plan))
        mhash = front.checkpoint(served.name).short_hash
        style_model = next((name for m, name in self.controlnet_models() if m == served.name), None)
        return a1111.a1111_response(
            body, call, plan, outcome.images, served.name, mhash, outcome.stopped, style_model=style_model
        )

    @app.post("/sdapi/v1/txt2img", responses=_ERRORS)
    async def a1111_txt2img(self, body: a1111.Txt2ImgRequest, request: Request) -> dict:
        """AUTOMATIC1111's txt2img: ``{images: [base64 PNG], parameters, info}``; unknown fields are ignored.
        ``override_settings.sd_model_checkpoint`` picks the model (``GET /sdapi/v1/sd-models``)."""
        return await self.a1111_generate(body, request, a1111.txt2img_call)

    @app.post("/sdapi/v1/img2img", responses=_ERRORS)
    async def a1111_img2img(self, body: a1111.Img2ImgRequest, request: Request) -> dict:
        """AUTOMATIC1111's img2img (inpainting when ``mask`` is sent): the /v1/img2img and /v1/inpaint paths."""
        return await self.a1111_generate(body, request, a1111.img2img_call)

    @app.get("/sdapi/v1/sd-models")
    async def a1111_sd_models(self, request: Request) -> list[dict]:
        """The served checkpoints, the default first; ``filename`` is the storage URI for the admin token,
        the name for others."""
        admin = self.auth.is_admin(request.headers)
        out = []
        for m in self.models.all:
            fingerprint = m.base_spec.fingerprint
            filename = m.uri if admin else m.name
            out += a1111.sd_models(
                m.name, filename, a1111.model_hash(fingerprint), fingerprint, m.info.kind, m.info.family
            )
        return out

    @app.get("/sdapi/v1/samplers")
    async def a1111_samplers(self) -> list[dict]:
        """The default model's samplers (each model's own scheduler is its ``Default`` entry)."""
        return [s.to_dict() for s in a1111.sampler_table(self.models.default.info.scheduler_class)]

    @app.get("/sdapi/v1/loras")
    async def a1111_loras(self) -> list[dict]:
        """Every adapter: name, description, trigger words, tags, versions. Public (the page's picker)."""
        return await self.registry_op("list", a1111.list_loras, self.resolver)

    @app.get("/sdapi/v1/options")
    async def a1111_get_options(self, request: Request) -> dict:
        """A1111's options as this caller sees them: ``sd_model_checkpoint`` (the title of the model its requests
        run on), ``sd_checkpoint_hash`` (its sha256, as in sd-models), ``samples_format``, ..."""
        return self.a1111_front.get_options(caller_of(request))

    @app.post("/sdapi/v1/options", responses=_ERRORS)
    async def a1111_set_options(self, body: dict, request: Request) -> dict:
        """Set options for this caller only (API key, A1111's Basic credentials, else network address), never
        for others: ``sd_model_checkpoint``, ``samples_format``. Other keys are ignored; the answer lists both."""
        return self.a1111_front.set_options(caller_of(request), body)

    @app.get("/sdapi/v1/progress")
    async def a1111_progress(self, request: Request, skip_current_image: bool = False) -> dict:
        """The progress of this caller's own A1111 generations; ``current_image``: the latest latent preview."""
        return self.a1111_front.work.progress(caller_of(request), not skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def a1111_interrupt(self, request: Request) -> dict:
        """Stop every A1111 generation of this caller (only theirs); each is answered with what it finished."""
        return {"interrupted": self.a1111_front.work.interrupt(caller_of(request))}

    @app.post("/sdapi/v1/skip")
    async def a1111_skip(self, request: Request) -> dict:
        """Stop this caller's oldest A1111 generation (A1111's current job); their others go on."""
        return {"skipped": self.a1111_front.work.skip(caller_of(request))}

    @app.get("/sdapi/v1/schedulers")
    async def a1111_schedulers(self) -> list[dict]:
        return a1111_info.schedulers()

    @app.get("/sdapi/v1/cmd-flags")
    async def a1111_cmd_flags(self) -> dict:
        return a1111_info.cmd_flags()

    @app.get("/sdapi/v1/sd-vae")
    async def a1111_sd_vae(self) -> list[dict]:
        """No separate VAE files: each model decodes with its own VAE (options' ``sd_vae``: Automatic)."""
        return []

    @app.get("/sdapi/v1/embeddings")
    async def a1111_embeddings(self) -> dict:
        return a1111_info.embeddings()

    @app.get("/sdapi/v1/scripts")
    async def a1111_scripts(self) -> dict:
        return a1111_info.scripts()

    # The ControlNet extension's routes, for its IP-Adapter unit (graph/a1111_controlnet.py): what is served only.

    def controlnet_models(self) -> list[tuple[str, str]]:
        """(served model, its IP-Adapter's ControlNet model name) for each model served with IP-Adapter."""
        out = []
        for m in self.models.all:
            style = getattr(m.planner, "style", None)
            if style is not None:
                mhash = a1111.model_hash(m.base_spec.fingerprint)
                out.append((m.name, a1111_controlnet.model_name(m.name, style.variant, mhash)))
        return out

    @app.get("/controlnet/version")
    async def controlnet_version(self) -> dict:
        return a1111_controlnet.version()

    @app.get("/controlnet/model_list")
    async def controlnet_model_list(self) -> dict:
        """The IP-Adapters served (one per model served with ``model.ip_adapter``); no ControlNet models."""
        return {"model_list": [name for _, name in self.controlnet_models()]}

    @app.get("/controlnet/module_list")
    async def controlnet_module_list(self) -> dict:
        """The IP-Adapter preprocessors, each the served image encoder (none if no model has IP-Adapter)."""
        return a1111_controlnet.module_list(bool(self.controlnet_models()))

    @app.get("/sdapi/v1/memory")
    async def a1111_memory(self) -> dict:
        """RAM (and CUDA memory, where it has a device) of the ingress replica that answers."""
        return await asyncio.to_thread(a1111_info.memory)

    # -- page ------------------------------------------------------------------------------
    # The browser page: graph/static, rendered with this server's limits (graph/page.py).

    @functools.cached_property
    def site(self) -> page.Site:
        configs = [
            page.page_config(
                model=m.name,
                family=m.info.family,
                default_side=m.info.default_side,
                limits=self.config.limits,
                lora=self.config.lora,
                samplers=[s.to_dict() for s in a1111.sampler_table(m.info.scheduler_class)],
            )
            for m in self.models.all
        ]
        return page.Site({**configs[0], "models": configs})

    def static_response(self, name: str, request: Request) -> Response:
        file = self.site.get(name)
        if file is None:
            raise APIError(404, "not_found", f"no static file {name!r}", None)
        headers = {"ETag": file.etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == file.etag:
            return Response(status_code=304, headers=headers)
        return Response(file.body, media_type=file.media_type, headers=headers)

    @app.get("/", include_in_schema=False)
    async def page_index(self, request: Request) -> Response:
        """The page. It loads ``static/...`` relative to itself (so it works under a route prefix): at a
        prefix without its trailing slash (``/multi``) it redirects to ``/multi/`` first."""
        if not request.url.path.endswith("/"):
            query = f"?{request.url.query}" if request.url.query else ""
            return RedirectResponse(request.url.path + "/" + query, status_code=307)
        return self.static_response("index.html", request)

    @app.get("/static/{name}", include_in_schema=False)
    async def page_static(self, name: str, request: Request) -> Response:
        return self.static_response(name, request)

    # -- async jobs ------------------------------------------------------------------------
    # POST /v1/jobs plans exactly as /v1/generate (same 4xx), then the Jobs deployment
    # (graph/jobs.py) runs the job and holds it; these routes only relay (graph/job_routes.py).

    @app.post("/v1/jobs", status_code=202, response_model=JobCreated, responses=_ERRORS)
    async def create_job(self, body: JobRequest, request: Request):
        """Start a generation in the background: 202 with the job's id; poll it, stream its events, cancel it.

        With ``image`` (and ``mask``) it is an img2img (inpainting) job, planned as /v1/img2img (/v1/inpaint).
        """
        if body.webhook_url is not None:
            problem = check_webhook_url(body.webhook_url)
            if problem is None and self.config.jobs.resolved_webhook_secret() is None:
                problem = "needs a signing secret on the server (jobs.webhook_secret or $LORAFLEET_WEBHOOK_SECRET)"
            if problem is not None:
                raise APIError(422, "invalid_value", f"webhook_url {problem}", "webhook_url")
        plan = await self.check_inputs(native_input(body, await self.tenant(request, body.user)), http=request)
        create = functools.partial(
            job_routes.create, self.jobs, plan, body.webhook_url, request.scope.get("root_path", "")
        )
        return await held_job(self.gate, self.jobs, plan, create, self.admission)

    def admission_stats(self) -> dict:
        """This replica's admission by model (``Admission.stats``), for tests and operators (a handle call)."""
        return self.admission.stats()

    @app.get("/v1/jobs/{job_id}", responses={200: {"model": JobObject}, 404: {"description": "job_not_found"}})
    async def get_job(self, job_id: str):
        """The job object: queued (position, ETA), running (step of steps), done (images), failed (error)."""
        return await job_routes.fetch(self.jobs, job_id)

    @app.get(
        "/v1/jobs/{job_id}/events",
        response_class=EventSourceResponse,
        dependencies=[Depends(_existing_job)],
        responses={404: {"description": "job_not_found"}},
    )
    async def job_events(
        self, job_id: str, previews: bool = False, last_event_id: str | None = Header(None)
    ) -> AsyncIterable[ServerSentEvent]:
        """Server-Sent Events: ``status`` on each change, ``preview`` (with ``previews=true``), then
        ``done`` / ``failed`` / ``cancelled`` and the end of the stream. Each event has an ``id``: a client
        reconnecting with it as ``Last-Event-ID`` gets only what changed since."""
        async for event in job_routes.events(self.jobs, job_id, previews, last_event_id):
            yield event

    @app.delete("/v1/jobs/{job_id}", responses={200: {"model": JobObject}, 404: {"description": "job_not_found"}})
    async def cancel_job(self, job_id: str):
        """Cancel a job (its batch slot frees at the next step); a finished job is removed."""
        return await job_routes.cancel(self.jobs, job_id)
