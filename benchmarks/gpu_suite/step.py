"""(a)/(d) one UNet step alone, and (f) CUDA graph vs eager over a whole denoising run.

The step functions are bench_multi_lora_gpu.py's (``step_inputs``, ``median_ms``,
``GraphStep``); the multi-LoRA UNet is the served engine's own (its slots, its
kernel objects, adapters resident through ``AdapterResidency``).
"""

from __future__ import annotations

import torch

from benchmarks.bench_multi_lora_gpu import GraphStep, median_ms, step_inputs
from deployments.engine.schedulers import SchedulerFactory

from .models import adapter_name
from .served import ServedEngine
from .settings import Budget, ModelRun, SuiteSettings

NO_CUDA = "CUDA graphs need a CUDA device"
TOKENS = 77


def slot_of(engine: ServedEngine, k: int) -> int:
    """The slot adapter ``k`` sits in (the residency placed it; without one, slot k + 1)."""
    if engine.residency is None:
        return k + 1
    return engine.residency.resident()[adapter_name(k)]


def mixed_routing(engine: ServedEngine, rows: int, adapters: int, shift: int = 0, weight: float = 1.0) -> list:
    """Each image's two CFG rows with one adapter, images cycling over the adapters (a 2-row step has one)."""
    return [((slot_of(engine, (i // 2 + shift) % adapters), weight),) for i in range(rows)]


def graph_memory(capture) -> tuple[object, int]:
    """``capture()``'s result and the bytes its graph pool keeps allocated."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    graph = capture()
    torch.cuda.synchronize()
    return graph, torch.cuda.memory_allocated() - before


def step_part(base_unet, engine: ServedEngine, run: ModelRun, s: SuiteSettings, budget: Budget, log) -> dict:
    """Per row count: base vs the mixed step under each kernel, eager and replayed from a CUDA graph."""
    device = engine.lora.device
    dtype = next(base_unet.parameters()).dtype
    cuda = device.type == "cuda"
    config = dict(base_unet.config)
    latent = run.size_px // engine.parts.info.vae_scale_factor
    lora, served_kernel = engine.lora, engine.lora.kernel.name
    per_rows = 4 + (2 if cuda else 0)  # timed measurements per row count
    out: dict = {
        "latent": latent,
        "served_kernel": served_kernel,
        "lora_layers": len(lora.layers),
        "graph": None if cuda else NO_CUDA,
        "rows": {},
    }
    for i, rows in enumerate(run.step_rows):
        x, t, context, added = step_inputs(config, rows, latent, TOKENS, device, dtype)
        kwargs = {} if added is None else {"added_cond_kwargs": added}
        routing = mixed_routing(engine, rows, s.adapters)

        def step(unet, x=x, t=t, context=context, kwargs=kwargs):
            return unet(x, t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]

        def mixed(routing=routing, step=step):
            with lora.routed(routing):
                return step(engine.parts.unet)

        def timed(fn, measurements_left: int) -> float:
            share = budget.share(measurements_left)
            return median_ms(fn, s.iters, s.warmup, cuda=cuda, budget_s=share)

        left = per_rows * (len(run.step_rows) - i)
        r: dict = {"base_ms": timed(lambda step=step: step(base_unet), left)}
        for kernel in ("grouped", "gather"):
            lora.use_kernel(kernel)
            left -= 1
            r[f"mixed_{kernel}_ms"] = timed(mixed, left)
        lora.use_kernel(served_kernel)
        r["mixed_served_ms"] = r[f"mixed_{served_kernel}_ms"] if served_kernel in ("grouped", "gather") else None
        with torch.inference_mode():
            r["adapter_effect_max_abs"] = (mixed().float() - step(base_unet).float()).abs().max().item()
        if cuda:
            r.update(_graphs(engine, base_unet, (x, t, context, added), routing, s, budget, left - 1))
        out["rows"][str(rows)] = r
        log(
            f"  step {rows} rows: base {r['base_ms']:.2f} ms, grouped {r['mixed_grouped_ms']:.2f}, "
            f"gather {r['mixed_gather_ms']:.2f}"
            + (
                f", graph base {r['base_graph_ms']:.2f}, mixed {r['mixed_graph_ms']:.2f}"
                if "mixed_graph_ms" in r
                else ""
            )
        )
    return out


def _graphs(engine: ServedEngine, base_unet, inputs, routing, s: SuiteSettings, budget: Budget, left: int) -> dict:
    """Base and mixed (gather kernel) steps captured and replayed; the mixed graph rerouted and checked."""
    x, t, context, added = inputs
    lora, served_kernel = engine.lora, engine.lora.kernel.name
    r: dict = {}
    try:
        with torch.inference_mode():
            graph, r["base_graph_pool_bytes"] = graph_memory(lambda: GraphStep(base_unet, x, t, context, added))
            r["base_graph_ms"] = median_ms(graph.replay, s.iters, s.warmup, cuda=True, budget_s=budget.share(left + 1))
            del graph
            lora.use_kernel("gather")  # reads only the routing buffers: replays any routing written there
            graph, r["mixed_graph_pool_bytes"] = graph_memory(
                lambda: GraphStep(engine.parts.unet, x, t, context, added, routed=lora.routed(routing))
            )
            r["mixed_graph_ms"] = median_ms(graph.replay, s.iters, s.warmup, cuda=True, budget_s=budget.share(left))
            kwargs = {} if added is None else {"added_cond_kwargs": added}
            other = mixed_routing(engine, x.shape[0], s.adapters, shift=3, weight=0.5)
            with lora.routed(other):
                eager = engine.parts.unet(x, t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]
            lora.routing_buffers.write(other, lora.state.pages, width=lora.routing_width(routing))  # the captured width
            r["graph_rerouted_vs_eager_max_abs"] = (graph.replay().float() - eager.float()).abs().max().item()
            del graph
    except Exception as e:  # noqa: BLE001 - a failed capture is reported; the eager figures stand
        r["graph_error"] = f"{type(e).__name__}: {e}"
        torch.cuda.synchronize()
    finally:
        lora.use_kernel(served_kernel)
    return r


def graph_vs_eager_latents(engine: ServedEngine, run: ModelRun, s: SuiteSettings, images: int = 8) -> dict:
    """A whole denoising run (DPM++ 2M, guidance, ``images`` images with mixed adapters) stepped eagerly,
    then by replaying one captured graph of the mixed step: max abs difference of the final latents."""
    device = engine.lora.device
    if device.type != "cuda":
        return {"skipped": NO_CUDA}
    dtype = engine.steps.dtype
    unet, lora = engine.parts.unet, engine.lora
    config = dict(unet.config)
    latent = run.size_px // engine.parts.info.vae_scale_factor
    rows = 2 * images
    x_T, _, context, added = step_inputs(config, rows, latent, TOKENS, device, dtype, seed=5)
    x_T = x_T[:images]  # [images, c, h, w]; rows: (uncond images, cond images), as diffusers concatenates
    routing = [((slot_of(engine, i % images % s.adapters), 1.0),) for i in range(rows)]
    kwargs = {} if added is None else {"added_cond_kwargs": added}
    factory = SchedulerFactory(engine.parts.info.scheduler_class, engine.parts.info.scheduler_config)
    served_kernel = lora.kernel.name
    lora.use_kernel("gather")

    def denoise(eps_of) -> torch.Tensor:
        scheduler = factory.create(s.scheduler)
        scheduler.set_timesteps(run.steps, device=device)
        x = x_T * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([x] * 2), t)
            eps_uncond, eps_text = eps_of(x_in, t.expand(rows)).chunk(2)
            eps = eps_uncond + run.guidance_scale * (eps_text - eps_uncond)
            x = scheduler.step(eps, t, x, return_dict=False)[0]
        return x.float()

    def eager(x_in, t):
        with lora.routed(routing):
            return unet(x_in, t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]

    try:
        with torch.inference_mode():
            t0 = factory.create(s.scheduler)
            t0.set_timesteps(run.steps, device=device)
            x0 = x_T.repeat(2, 1, 1, 1)
            graph = GraphStep(unet, x0, t0.timesteps[0].expand(rows), context, added, routed=lora.routed(routing))

            def replayed(x_in, t):
                graph.x.copy_(x_in)
                graph.t.copy_(t)
                return graph.replay().clone()

            width = lora.routing_width(routing)  # what the graph was captured at
            lora.routing_buffers.write(routing, lora.state.pages, width=width)
            by_eager = denoise(eager)
            lora.routing_buffers.write(routing, lora.state.pages, width=width)
            by_graph = denoise(replayed)
        diff = (by_graph - by_eager).abs().max().item()
        return {
            "images": images,
            "steps": run.steps,
            "latents_max_abs": diff,
            "latents_scale": by_eager.abs().max().item(),
            "finite": bool(torch.isfinite(by_eager).all() and torch.isfinite(by_graph).all()),
        }
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        lora.use_kernel(served_kernel)
