"""The baseline the load test compares lorafleet with: plain diffusers behind one Ray Serve deployment.

What a team would build first: one ``StableDiffusionPipeline`` on the same model
directory, one request at a time (``max_ongoing_requests=1``; the rest wait in
Serve's queue), every adapter loaded up front with ``load_lora_weights`` (from
the same synthetic files lorafleet serves) and selected per request with
``set_adapters`` / ``disable_lora``. It speaks the subset of lorafleet's HTTP API
the load test sends (``POST /v1/generate``, ``POST /v1/images/generations``), so
the same locust traffic runs against both. Tenants are ignored: first come,
first served. Images are encoded as lorafleet encodes them (PNG, base64).

>>> app = baseline_app(model_dir, {"lt-style-000": path})                       # doctest: +SKIP
>>> serve.run(app, name="baseline", route_prefix="/baseline")                   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse


@serve.deployment(name="DiffusersBaseline", max_ongoing_requests=1, max_queued_requests=-1)
class DiffusersBaseline:
    def __init__(self, model_dir: str, adapters: dict[str, str], model_name: str, torch_threads: int | None = None):
        import safetensors.torch
        import torch
        from diffusers import StableDiffusionPipeline

        from deployments.engine.schedulers import SchedulerFactory

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.pipe = StableDiffusionPipeline.from_pretrained(
            model_dir, local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.schedulers = SchedulerFactory(type(self.pipe.scheduler).__name__, dict(self.pipe.scheduler.config))
        for name, path in adapters.items():
            self.pipe.load_lora_weights(safetensors.torch.load_file(path), adapter_name=name)
        self.adapters = set(adapters)
        self.model_name = model_name
        self.served = 0

    def stats(self) -> dict:
        import torch

        return {"served": self.served, "adapters": len(self.adapters), "torch_threads": torch.get_num_threads()}

    def generate(self, req: dict) -> list[bytes]:
        """One request through the pipeline: select its adapters, run, encode. Raises ValueError on bad input."""
        import torch

        from deployments.engine.images import encode_image

        loras = req.get("loras") or []
        unknown = [x["name"] for x in loras if x["name"] not in self.adapters]
        if unknown:
            raise LookupError(f"unknown adapter {unknown[0]!r}")
        if loras:
            self.pipe.enable_lora()
            self.pipe.set_adapters([x["name"] for x in loras], adapter_weights=[float(x["scale"]) for x in loras])
        else:
            self.pipe.disable_lora()
        self.pipe.scheduler = self.schedulers.create(req.get("scheduler", "default"))
        n = int(req.get("num_images", 1))
        seed = int(req["seed"]) if req.get("seed") is not None else int(torch.randint(0, 2**31, ()).item())
        images = self.pipe(
            req["prompt"],
            negative_prompt=req.get("negative_prompt") or None,
            width=int(req.get("width", 256)),
            height=int(req.get("height", 256)),
            num_inference_steps=int(req.get("steps", 30)),
            guidance_scale=float(req.get("guidance_scale", 7.5)),
            num_images_per_prompt=n,
            generator=[torch.Generator().manual_seed(seed + k) for k in range(n)],
            output_type="np",
        ).images  # [n, H, W, 3] float in [0, 1]
        pixels = (images * 255).round().astype("uint8")
        self.served += 1
        return [encode_image(p, "png") for p in pixels]

    async def __call__(self, request: Request):
        path = request.url.path.rstrip("/")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid_json", "body is not JSON")
        try:
            if path.endswith("/v1/generate"):
                start = time.perf_counter()
                images = await asyncio.to_thread(self.generate, body)
                return JSONResponse(
                    {
                        "images": [{"b64": base64.b64encode(b).decode(), "seed": body.get("seed")} for b in images],
                        "model": self.model_name,
                        "timings": {"total_ms": 1000 * (time.perf_counter() - start)},
                    }
                )
            if path.endswith("/v1/images/generations"):
                model = body.get("model") or self.model_name
                _, _, adapter = model.partition(":")
                w, _, h = (body.get("size") or "256x256").partition("x")
                req = {
                    **{k: body[k] for k in ("prompt", "negative_prompt", "steps", "guidance_scale", "seed", "scheduler")
                       if k in body},
                    "width": int(w),
                    "height": int(h),
                    "num_images": body.get("n", 1),
                    "loras": [{"name": adapter.partition("@")[0], "scale": 1.0}] if adapter else [],
                }  # fmt: skip
                images = await asyncio.to_thread(self.generate, req)
                return JSONResponse(
                    {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(b).decode()} for b in images]}
                )
        except LookupError as e:
            return _error(404, "adapter_not_found", str(e))
        except (KeyError, TypeError, ValueError) as e:
            return _error(422, "invalid_value", str(e))
        return _error(404, "not_found", f"no route {path}")


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": None}}, status_code=status)


def baseline_app(
    model_dir: Path, adapters: dict[str, Path], model_name: str = "tiny-sd", torch_threads: int | None = None
):
    """The baseline application, bound: deploy with ``serve.run(..., route_prefix="/baseline")``."""
    return DiffusersBaseline.bind(str(model_dir), {k: str(v) for k, v in adapters.items()}, model_name, torch_threads)
