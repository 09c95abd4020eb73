"""(h) IP-Adapter (issue 22): the cost of image rows in a mixed tick, and the image encoder's throughput.

The served engine's tick (``StepScheduler.tick``: the UNet forward and the scheduler steps) at ``ROWS`` rows,
of which 0, 4, 8 and 16 belong to requests with a reference image, on a UNet of the run's architecture (random
weights) with plain IP-Adapter weights built for it under a seed (``builtin.ip_adapter_state``: SD1.5's
ViT-H-wide image embeddings; the CPU smoke reads the builtin model's tiny weights), against the same batch on
the UNet without IP-Adapter ("off"). Ticks with image rows run eager (never from a captured step graph), so
every count here is eager: the ratio is the image term's own cost. Random prompt and image embeddings.

Then the ImageEncoder's engine (``StyleImageEncoder``) on ViT-H/14's architecture (IP-Adapter SD1.5's
``image_encoder``; the smoke: the builtin tiny encoder), 256 px images: images/s at batch 1, 8 and 32, every
image new (cache misses), batched and row by row (the deterministic mode's way), and the same images again
(cache hits).

Checks: rows without an image equal the run without IP-Adapter exactly; image rows move.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import torch

from benchmarks.bench_ip_adapter import VIT_H, mixed_requests
from deployments.engine.ip_adapter import IPAdapterModel, IPAdapterWeights
from deployments.engine.schedulers import SchedulerFactory
from deployments.engine.step_scheduler import StepScheduler

from .models import model_dir
from .settings import Budget, ModelRun, SuiteSettings

ROWS = 16
IMAGE_ROWS = (0, 4, 8, 16)
ENCODER_BATCHES = (1, 8, 32)
SEED = 22


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _weights(run: ModelRun, unet) -> IPAdapterWeights:
    from deployments.engine.builtin import ip_adapter_state
    from deployments.engine.ip_adapter import read_ip_adapter_file, resolve_ip_adapter_dir

    if run.source.startswith("builtin:"):
        return IPAdapterWeights.load(
            read_ip_adapter_file(resolve_ip_adapter_dir(run.source) / "ip-adapter.safetensors"), unet
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        state = ip_adapter_state({"image_encoder": VIT_H}, unet, "plain")  # built on the CPU, in float32
    return IPAdapterWeights.load(state, unet)


def mixed_ticks(run: ModelRun, s: SuiteSettings, device, dtype, budget: Budget) -> dict:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    config = json.loads((model_dir(run.source) / "unet" / "config.json").read_text())
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    weights = _weights(run, unet)
    plain = dict(unet.attn_processors)
    ip = IPAdapterModel(unet, weights, max_rows=ROWS)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    factory = SchedulerFactory("DDIMScheduler", dict(sched.config))
    scale = 2 ** (len(config["block_out_channels"]) - 1)
    counts = ["off", *IMAGE_ROWS]
    warmup, ticks = s.warmup, max(1, s.iters // 2)
    steps_per_job = warmup + ticks + 1
    per_count = budget.share(len(counts))
    out = {"rows": ROWS, "size_px": run.size_px, "ip_layers": len(weights.layers), "ip_tokens": weights.num_tokens}
    medians, plain_latents, identical, moved = {}, None, True, True
    for count in counts:
        if count == "off":
            unet.set_attn_processor(dict(plain))
        else:
            ip.install()
        n = 0 if count == "off" else count
        steps = StepScheduler(
            unet,
            factory,
            vae_scale_factor=scale,
            max_rows_per_tick=ROWS,
            max_queued=ROWS,
            ip_adapter=None if count == "off" else ip,
        )
        jobs = steps.submit(mixed_requests(unet, weights, ROWS, n, run.size_px, steps_per_job))  # moved at admission
        began = time.perf_counter()
        for _ in range(warmup):
            steps.tick()
        _sync(device)
        times = []
        for k in range(ticks):
            if k and time.perf_counter() - began > per_count:
                break
            t0 = time.perf_counter()
            steps.tick()
            _sync(device)
            times.append(1000 * (time.perf_counter() - t0))
        medians[count] = float(np.median(times))
        latents = [j.x_t.float().clone() for j in jobs]
        if count == "off":
            plain_latents = latents
        identical &= all(torch.equal(latents[i], plain_latents[i]) for i in range(n // 2, ROWS // 2))
        moved &= all(not torch.equal(latents[i], plain_latents[i]) for i in range(n // 2))
    base = medians[0]
    out["ticks"] = [{"image_rows": c, "tick_ms": medians[c], "vs_0_image_rows": medians[c] / base} for c in counts]
    out["plain_rows_identical"] = identical
    out["image_rows_moved"] = moved
    del unet, ip, weights
    return out


def encoder_throughput(run: ModelRun, s: SuiteSettings, device, dtype, budget: Budget) -> dict:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from deployments.engine.image_encoder import StyleImageEncoder, load_image_encoder
    from deployments.engine.ip_adapter import resolve_ip_adapter_dir

    if run.source.startswith("builtin:"):
        which = "tiny"
        encoder, processor = load_image_encoder(resolve_ip_adapter_dir(run.source) / "image_encoder", device, dtype)
    else:
        which = "vit-h"
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(SEED)
            encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H)).to(dtype).eval().requires_grad_(False)
        side = VIT_H["image_size"]
        processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    rng = np.random.default_rng(0)

    def image():
        pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        return hashlib.sha256(pixels.tobytes()).hexdigest(), pixels

    out = {"encoder": which, "parameters": sum(p.numel() for p in encoder.parameters()), "results": []}
    for rowwise in (False, True):
        enc = StyleImageEncoder(encoder, processor, variant="plain", cache_size=4096, rowwise=rowwise)
        enc.encode_images([image()])  # warm-up
        _sync(device)
        for batch in ENCODER_BATCHES:
            if budget.expired and out["results"]:
                break
            images = [image() for _ in range(batch)]
            t0 = time.perf_counter()
            first = enc.encode_images(images)
            _sync(device)
            miss = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = enc.encode_images(images)
            hit = time.perf_counter() - t0
            out["results"].append(
                {
                    "rowwise": rowwise,
                    "batch": batch,
                    "miss_images_per_s": batch / miss,
                    "hit_images_per_s": batch / hit,
                    "hit_is_the_miss": all(a[0] is b[0] for a, b in zip(first, again, strict=True)),
                }
            )
    return out


def ip_adapter_part(run: ModelRun, s: SuiteSettings, device: torch.device, dtype: torch.dtype, budget: Budget) -> dict:
    out = {"mixed": mixed_ticks(run, s, device, dtype, Budget(budget.share(2)))}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out["encoder"] = encoder_throughput(run, s, device, dtype, budget)
    return out
