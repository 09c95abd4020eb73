"""The engine as a Denoiser replica runs it, without Ray: prompts, adapter residency, the step scheduler, the VAE.

``ServedEngine`` wires the engine's own classes together as the deployments do
(``PromptEncoder`` / ``SDXLPromptEncoder``, ``MultiLoRAModel`` with the
server's default slot targets and kernel, ``AdapterResidency`` fetching from
host memory, ``StepScheduler``, ``images.decode``) and drives them in a closed
loop: a finished request is replaced by a new one between ticks.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from deployments.engine.adapter_slots import AdapterResidency, State
from deployments.engine.images import decode
from deployments.engine.multi_lora import MultiLoRAModel
from deployments.engine.prompts import PromptEncoder, SDXLPromptEncoder
from deployments.engine.schedulers import SchedulerFactory
from deployments.engine.step_graphs import make_step_graphs
from deployments.engine.step_scheduler import DenoiseRequest, StepScheduler
from deployments.messages import MicroConditioning

from .models import SERVED_LORA, ModelParts, Request, adapter_name
from .settings import Budget, ModelRun, SuiteSettings


def engine_graph_support(device: torch.device) -> tuple[dict, str]:
    """The engine's CUDA graphs as the Denoiser turns them on (``denoiser.cuda_graphs``), and what the suite says."""
    if device.type != "cuda":
        return {}, "graph replay: the engine's (denoiser.cuda_graphs), but graphs need a CUDA device"
    return {"cuda_graphs": "on"}, "graph replay: the engine's own (denoiser.cuda_graphs: on, make_step_graphs)"


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between order statistics; the value itself for one sample."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class LoopResult:
    images: int
    wall_s: float
    latencies_s: list[float]
    ticks: int
    rows: int
    tick_s: float
    failed: int
    latents: dict[int, torch.Tensor]  # request index -> its final latents [1, c, h, w] (when kept)
    pixels: dict[int, torch.Tensor]  # request index -> image [3, H, W] in [0, 1] (when kept)

    def summary(self, concurrency: int) -> dict:
        lat = self.latencies_s
        return {
            "concurrency": concurrency,
            "images": self.images,
            "failed": self.failed,
            "wall_s": round(self.wall_s, 4),
            "images_per_s": self.images / self.wall_s if self.wall_s else 0.0,
            "p50_s": percentile(lat, 50) if lat else None,
            "p95_s": percentile(lat, 95) if lat else None,
            "mean_tick_ms": 1000 * self.tick_s / self.ticks if self.ticks else None,
            "mean_rows_per_tick": self.rows / self.ticks if self.ticks else None,
        }


class ServedEngine:
    """One replica's engine over ``parts`` (its UNet is wrapped in place by the adapter slots)."""

    def __init__(
        self, parts: ModelParts, s: SuiteSettings, run: ModelRun, host_weights: list[dict], graph_kwargs: dict
    ):
        self.parts, self.run, self.s = parts, run, s
        self.sdxl = parts.info.sdxl
        self.host_weights = host_weights
        max_rows = max(64, 2 * max(run.concurrency))
        self.lora = MultiLoRAModel(
            parts.unet,
            SERVED_LORA.unet_target_modules,
            num_slots=s.adapters + 1,
            max_rank=SERVED_LORA.max_rank,
            deterministic=False,
            kernel=SERVED_LORA.kernel,
            max_rows=max_rows,
        )
        self._changed = threading.Event()
        self.residency = AdapterResidency(self.lora, self._fetch, on_change=self._changed.set)
        self.residency_error: str | None = None
        self.prompts = self._prompt_encoder()
        self.graph_kwargs = graph_kwargs
        self.step_graphs = None  # built (and captured) once, as a Denoiser replica does at start
        self.graphs_capture_s: float | None = None
        self.graphs_pool_bytes: int | None = None
        self.steps = self._step_scheduler(max_rows, self.residency)

    def _fetch(self, key: str) -> dict:
        return self.host_weights[int(key.removeprefix("style"))]

    def _fetch_to_device(self, key: str) -> dict:
        device = self.lora.device
        return {p: (A.to(device), B.to(device), a) for p, (A, B, a) in self._fetch(key).items()}

    def reset_residency(self, fetch=None) -> None:
        """Empty slots and a new residency whose fetch is ``fetch``; by default one that copies the weights to
        the device itself (the fallback where the slots refuse host tensors)."""
        self.residency.close()
        for slot in range(1, self.lora.num_slots):
            self.lora.clear(slot)
        self.residency = AdapterResidency(self.lora, fetch or self._fetch_to_device, on_change=self._changed.set)
        self.steps = self._step_scheduler(self.steps.max_rows_per_tick, self.residency)

    def _prompt_encoder(self):
        p = self.parts
        if not self.sdxl:
            return PromptEncoder(p.tokenizer, p.text_encoder, cache_size=0)
        first = PromptEncoder(p.tokenizer, p.text_encoder, cache_size=0, hidden_layer="penultimate")
        second = PromptEncoder(p.tokenizer_2, p.text_encoder_2, cache_size=0, hidden_layer="penultimate", pooled=True)
        return SDXLPromptEncoder(first, second, force_zeros_for_empty_prompt=p.info.force_zeros_for_empty_prompt)

    def _graphs(self):
        """The Denoiser's ``make_step_graphs``: the native size captured at every row bucket this run uses,
        widths 0 and 16 (the adapters' rank); timed, and its memory measured."""
        setting = self.graph_kwargs.get("cuda_graphs")
        if setting is None:
            return None
        if self.step_graphs is None:
            cuda = self.lora.device.type == "cuda"
            if cuda:
                torch.cuda.synchronize()
            before = torch.cuda.memory_allocated() if cuda else 0
            start = time.perf_counter()
            self.step_graphs = make_step_graphs(
                self.parts.unet,
                self.lora,
                setting,
                max_rows=2 * max(self.run.concurrency),
                native_latent_side=self.run.size_px // self.parts.info.vae_scale_factor,
                widths=(0, self.s.rank),
            )
            if cuda:
                torch.cuda.synchronize()
            self.graphs_capture_s = time.perf_counter() - start
            self.graphs_pool_bytes = torch.cuda.memory_allocated() - before if cuda else None
        return self.step_graphs

    def _step_scheduler(self, max_rows: int, residency) -> StepScheduler:
        info = self.parts.info
        return StepScheduler(
            self.parts.unet,
            SchedulerFactory(info.scheduler_class, info.scheduler_config),
            vae_scale_factor=info.vae_scale_factor,
            max_rows_per_tick=max_rows,
            max_queued=4096,
            lora=self.lora,
            residency=residency,
            step_graphs=self._graphs(),
        )

    # -- adapters ---------------------------------------------------------------------------

    def make_resident(self, k: int, timeout_s: float = 60.0) -> float:
        """Milliseconds from asking the residency for adapter ``k`` to its weights in the slots (synchronised)."""
        key = adapter_name(k)
        self._changed.clear()
        start = time.perf_counter()
        self.residency.want([[key]])
        while (state := self.residency.state(key)) is not State.READY:
            if state is State.FAILED or state is None:
                raise RuntimeError(f"adapter {key} did not become resident (state {state})")
            if not self._changed.wait(timeout_s):
                raise TimeoutError(f"adapter {key} not resident after {timeout_s:.0f} s")
            self._changed.clear()
        if self.lora.device.type == "cuda":
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - start)

    def load_directly(self) -> None:
        """The fallback where residency failed: every adapter copied into slot k + 1, requests routed by slot."""
        self.residency.close()
        device = self.lora.device
        for k, weights in enumerate(self.host_weights):
            self.lora.load(k + 1, {p: (A.to(device), B.to(device), a) for p, (A, B, a) in weights.items()})
        self.steps = self._step_scheduler(self.steps.max_rows_per_tick, None)
        self.residency = None

    def routing(self, k: int) -> tuple:
        """A request's ``adapters`` for adapter ``k``: its residency key, or its slot without residency."""
        return ((adapter_name(k), 1.0),) if self.residency is not None else ((k + 1, 1.0),)

    # -- requests ---------------------------------------------------------------------------

    def submit(self, requests: list[Request]) -> dict[int, Request]:
        """Encode the prompts in one batch (as the TextEncoder does), queue the images: ``{job id: request}``."""
        size = self.run.size_px
        if self.sdxl:
            encoded = self.prompts.encode_prompt_pairs([r.prompt for r in requests], [""] * len(requests))
            time_ids, negative_time_ids = MicroConditioning().time_ids(size, size)
            conditioning = [
                {
                    "prompt_embeds": e.prompt_embeds,
                    "negative_prompt_embeds": e.negative_prompt_embeds,
                    "pooled_prompt_embeds": e.pooled_prompt_embeds,
                    "negative_pooled_prompt_embeds": e.negative_pooled_prompt_embeds,
                    "add_time_ids": time_ids,
                    "negative_add_time_ids": negative_time_ids,
                }
                for e in encoded
            ]
        else:
            texts = [t for r in requests for t in (r.prompt, "")]
            embeds = self.prompts.encode_prompt(texts)
            conditioning = [
                {"prompt_embeds": embeds[2 * i], "negative_prompt_embeds": embeds[2 * i + 1]}
                for i in range(len(requests))
            ]
        owners = {}
        for r, cond in zip(requests, conditioning, strict=True):
            req = DenoiseRequest(
                height=size,
                width=size,
                steps=self.run.steps,
                guidance_scale=self.run.guidance_scale,
                seed=r.seed,
                scheduler=self.s.scheduler,
                adapters=self.routing(r.adapter),
                **cond,
            )
            (job,) = self.steps.submit([req])
            owners[job.id] = r
        return owners

    def closed_loop(
        self, requests: list[Request], concurrency: int, budget: Budget | None = None, keep: bool = False
    ) -> LoopResult:
        """``concurrency`` requests in flight until ``requests`` run out (or ``budget`` does: then it drains).

        A request's latency runs from its submission (prompt encoding included) to its decoded image.
        """
        todo = deque(requests)
        ticks0, rows0, tick_s0 = self.steps.ticks_run, self.steps.rows_run, self.steps.tick_seconds
        submitted: dict[int, float] = {}
        latencies, latents, pixels = [], {}, {}
        failed = done = 0
        start = time.perf_counter()
        end = start

        def refill(n: int) -> dict[int, Request]:
            batch = [todo.popleft() for _ in range(min(n, len(todo)))]
            if not batch:
                return {}
            now = time.perf_counter()
            for r in batch:
                submitted[r.index] = now
            return self.submit(batch)

        owners = refill(concurrency)
        while not self.steps.idle:
            finished = self.steps.tick()
            if not finished:
                continue
            ok = [j for j in finished if j.error is None]
            failed += len(finished) - len(ok)
            if ok:
                images = decode(self.parts.vae, torch.cat([j.x_t for j in ok]))  # [n, 3, H, W] on the host
                end = time.perf_counter()
                for j, image in zip(ok, images, strict=True):
                    r = owners[j.id]
                    latencies.append(end - submitted[r.index])
                    if keep:
                        latents[r.index], pixels[r.index] = j.x_t.float().cpu(), image
            done += len(ok)
            for j in finished:
                owners.pop(j.id)
            if budget is None or not budget.expired:
                owners.update(refill(len(finished)))
        return LoopResult(
            images=done,
            wall_s=end - start,
            latencies_s=latencies,
            ticks=self.steps.ticks_run - ticks0,
            rows=self.steps.rows_run - rows0,
            tick_s=self.steps.tick_seconds - tick_s0,
            failed=failed,
            latents=latents,
            pixels=pixels,
        )


def _failure(engine: ServedEngine, k: int, e: Exception) -> str:
    """Why adapter ``k`` did not load: the residency's recorded error where it kept one."""
    entry = engine.residency._entries.get(adapter_name(k)) if engine.residency is not None else None
    cause = getattr(entry, "error", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else f"{type(e).__name__}: {e}"


def residency_timings(engine: ServedEngine, count: int) -> dict:
    """Adapters 0..count-1 made resident one after the other from host memory (empty slots at the start).

    Where the slots refuse the host tensors the registry's cache would hand them, the error is recorded
    and the residency is retried with a fetch that copies to the device first; where that fails too, the
    adapters are loaded into the slots directly and the requests routed by slot.
    """
    out: dict = {}
    times: list[float] = []

    def load_all() -> None:
        times.clear()
        for k in range(count):
            try:
                times.append(engine.make_resident(k))
            except Exception as e:
                raise RuntimeError(_failure(engine, k, e)) from e

    try:
        load_all()
    except RuntimeError as e:  # reported; the suite goes on with a fallback
        out["host_weights_error"] = engine.residency_error = str(e)
        engine.reset_residency()
        try:
            load_all()
        except RuntimeError as e2:
            out["error"] = str(e2)
            engine.load_directly()
            out["fallback"] = "slots loaded directly with lora.load; requests routed by slot, no residency"
            return out
        out["note"] = "fetch copies the weights to the device (the slots refused host tensors)"
    r = engine.residency
    pinned = any(A.is_pinned() for w in engine.host_weights[:1] for A, _, _ in w.values())
    if pinned:
        out["pageable"] = pageable_residency(engine, count)
    return {
        **out,
        "host_memory": "pinned" if pinned else "pageable",
        "adapters": count,
        "median_ms": statistics.median(times),
        "max_ms": max(times),
        "each_ms": [round(t, 3) for t in times],
        "loader_mean_ms": 1000 * r.load_seconds / r.loads if r.loads else None,
        "page_bytes": engine.lora.page_bytes,
        "adapter_bytes": engine.lora.page_bytes * engine.s.rank,
    }


def pageable_residency(engine: ServedEngine, count: int) -> dict:
    """The same loads from pageable (unpinned) host copies, for comparison; the pinned residency is restored."""
    pageable = [{p: (A.clone(), B.clone(), a) for p, (A, B, a) in w.items()} for w in engine.host_weights]
    engine.reset_residency(lambda key: pageable[int(key.removeprefix("style"))])
    times = [engine.make_resident(k) for k in range(count)]
    engine.reset_residency(engine._fetch)
    for k in range(count):
        engine.make_resident(k)
    return {"median_ms": statistics.median(times), "max_ms": max(times), "each_ms": [round(t, 3) for t in times]}
