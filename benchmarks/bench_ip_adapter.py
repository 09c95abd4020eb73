"""IP-Adapter on the CPU (issue 22): the cost of image rows in a mixed batch, and the image encoder's throughput.

    python benchmarks/bench_ip_adapter.py                       # both parts, tiny-sd and full-size SD1.5
    python benchmarks/bench_ip_adapter.py --part mixed --model sd15 --size 256 --ticks 2
    python benchmarks/bench_ip_adapter.py --part encoder --encoder vit-h --json out.json

(a) ``mixed``: one ``StepScheduler`` tick (the UNet forward and the scheduler steps) on the Ray-free engine, with
``--rows`` UNet rows (``rows / 2`` text-to-image requests with guidance), of which 0, 2, 4, ... rows belong to
requests with a reference image (``--image-rows``; a request's two rows both read its image tokens). Each count
runs on the same UNet with the IP-Adapter installed (``IPAdapterModel``), after ``--warmup`` ticks, ``--ticks``
timed; "off" is the same batch on the UNet without IP-Adapter (the server without ``model.ip_adapter``). The
ratio is each count's median tick (and its fastest, the least disturbed by load from elsewhere) against that of 0
image rows, in the same run; the counts run ``--rounds`` times interleaved, so that load from other processes
falls on all of them alike.

Models: ``builtin:tiny-sd`` (its builtin IP-Adapter weights); ``sd15``: SD1.5's UNet architecture with random
weights (860M parameters) and plain IP-Adapter weights for it built under a seed (``builtin.ip_adapter_state``,
ViT-H's 1024-wide image embeddings). Random prompt and image embeddings: no text or image encoder runs in this
part. Kernels: the server's on the CPU (deterministic, batch-invariant) unless ``--stock``. Check: the rows
without an image end each run with latents bit-identical to the run without IP-Adapter (the image term is added
to image rows only), and the image rows' latents differ from it.

(b) ``encoder``: the ImageEncoder's engine (``StyleImageEncoder``: ``CLIPImageProcessor`` + CLIP vision model,
rowwise in deterministic mode) on 256x256 images: images/s at batch 1 and 8 with every image new (cache misses),
then the same images again (cache hits: the digest LRU). Encoders: ``tiny`` (the builtin models' tiny CLIP vision
model), ``vit-h``: ViT-H/14's architecture (IP-Adapter SD1.5's ``image_encoder``, 632M parameters) with random
weights. Check: a hit returns the very embeddings of the miss.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_multi_lora_gpu import SD15_UNET  # noqa: E402  (runwayml SD1.5's unet/config.json)
from deployments.engine import models  # noqa: E402
from deployments.engine.batch_invariance import make_batch_invariant  # noqa: E402
from deployments.engine.ip_adapter import IPAdapterModel, IPAdapterWeights, resolve_ip_adapter_dir  # noqa: E402
from deployments.engine.schedulers import SchedulerFactory  # noqa: E402
from deployments.engine.step_scheduler import DenoiseRequest, StepScheduler  # noqa: E402

# h94/IP-Adapter's models/image_encoder (OpenCLIP ViT-H/14 as a CLIPVisionModelWithProjection).
VIT_H = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
}
SD15_IP_SPEC = {"image_encoder": VIT_H}  # plain: ImageProjection(1024 -> 4 tokens x 768), as ip-adapter_sd15
SEED = 22


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFLEET_CACHE_DIR") or Path(tempfile.gettempdir()) / "lorafleet-bench-cache")


# -- (a) image rows in a mixed batch ------------------------------------------------------------------------


def build_model(model: str, stock: bool):
    """``(unet, weights, scheduler factory, vae scale factor)`` for ``builtin:tiny-sd`` or ``sd15``."""
    if model == "sd15":
        from diffusers import DDIMScheduler, UNet2DConditionModel

        from deployments.engine.builtin import ip_adapter_state

        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET).eval().requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            state = ip_adapter_state(SD15_IP_SPEC, unet, "plain")
        sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        factory = SchedulerFactory("DDIMScheduler", dict(sched.config))
        scale_factor = 8
    else:
        directory = models.resolve_model_dir(model, cache_dir())
        info = models.read_model_info(model, directory)
        unet = models.load_unet(directory, torch.device("cpu"), torch.float32)
        from deployments.engine.ip_adapter import read_ip_adapter_file

        state = read_ip_adapter_file(resolve_ip_adapter_dir(model, cache_dir()) / "ip-adapter.safetensors")
        factory = SchedulerFactory(info.scheduler_class, info.scheduler_config)
        scale_factor = info.vae_scale_factor
    if not stock:
        unet = make_batch_invariant(unet)
    return unet, IPAdapterWeights.load(state, unet), factory, scale_factor


def mixed_requests(unet, weights, rows: int, image_rows: int, size: int, steps: int) -> list[DenoiseRequest]:
    """``rows / 2`` requests with guidance, the first ``image_rows / 2`` with a reference image's embeddings."""
    g = torch.Generator().manual_seed(0)
    hidden = unet.config.cross_attention_dim
    out = []
    for i in range(rows // 2):
        prompt, negative = torch.randn(77, hidden, generator=g), torch.randn(77, hidden, generator=g)
        embeds = torch.randn(weights.embed_dim, generator=g)  # drawn for every request: the same prompts each run
        image = {"ip_adapter_embeds": embeds, "ip_adapter_scale": 0.6} if i < image_rows // 2 else {}
        out.append(DenoiseRequest(prompt, negative, size, size, steps, 7.5, seed=i, scheduler="ddim", **image))
    return out


def run_mixed(
    model: str,
    rows: int,
    image_rows: list[int],
    size: int,
    warmup: int,
    ticks: int,
    stock: bool = False,
    rounds: int = 1,
) -> dict:
    """Each image-row count (and "off") ``rounds`` times, interleaved, so that load from elsewhere falls on all."""
    unet, weights, factory, scale_factor = build_model(model, stock)
    plain_processors = dict(unet.attn_processors)
    ip = IPAdapterModel(unet, weights, max_rows=rows)
    steps_per_job = warmup + ticks + 1  # nobody finishes while timed
    counts = ["off", *image_rows]
    tick_s = {c: [] for c in counts}
    identical = {c: True for c in counts}
    moved = {c: True for c in counts}
    for _ in range(rounds):
        plain_latents = None
        for count in counts:
            if count == "off":
                unet.set_attn_processor(dict(plain_processors))  # the UNet's own processors: no IP-Adapter
            else:
                ip.install()
            n_images = 0 if count == "off" else count
            steps = StepScheduler(
                unet,
                factory,
                vae_scale_factor=scale_factor,
                max_rows_per_tick=rows,
                max_queued=rows,
                ip_adapter=None if count == "off" else ip,
            )
            jobs = steps.submit(mixed_requests(unet, weights, rows, n_images, size, steps_per_job))
            for _ in range(warmup):
                steps.tick()
            assert sum(j.rows for j in steps.active) == rows, "every row in the batch"
            for _ in range(ticks):
                t0 = time.perf_counter()
                steps.tick()
                tick_s[count].append(time.perf_counter() - t0)
            latents = [j.x_t.clone() for j in jobs]
            if count == "off":
                plain_latents = latents
            without = range(n_images // 2, rows // 2)  # the requests without an image
            identical[count] &= all(torch.equal(latents[i], plain_latents[i]) for i in without)
            # the image rows do change: a bench whose images had no effect would time nothing
            moved[count] &= all(not torch.equal(latents[i], plain_latents[i]) for i in range(n_images // 2))
    median = {c: 1000 * statistics.median(tick_s[c]) for c in counts}
    best = {c: 1000 * min(tick_s[c]) for c in counts}  # the least disturbed tick: robust to load from elsewhere
    base = median[image_rows[0]]
    results = [
        {
            "image_rows": c,
            "tick_ms": median[c],
            "ratio": median[c] / base,
            "min_tick_ms": best[c],
            "min_ratio": best[c] / best[image_rows[0]],
            "plain_rows_identical": identical[c],
            "image_rows_moved": moved[c],
            "ticks_timed": len(tick_s[c]),
        }
        for c in counts
    ]
    return {
        "model": model,
        "rows": rows,
        "size": size,
        "rounds": rounds,
        "kernels": "stock" if stock else "batch-invariant",
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "ip_layers": len(weights.layers),
        "ip_tokens": weights.num_tokens,
        "results": results,
    }


# -- (b) the image encoder ------------------------------------------------------------------------------


def build_encoder(which: str, rowwise: bool = True):
    from deployments.engine.image_encoder import StyleImageEncoder, load_image_encoder

    if which == "vit-h":
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        torch.manual_seed(SEED)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H)).eval().requires_grad_(False)
        side = VIT_H["image_size"]
        processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    else:
        directory = resolve_ip_adapter_dir("builtin:tiny-sd", cache_dir()) / "image_encoder"
        encoder, processor = load_image_encoder(directory, torch.device("cpu"), torch.float32)
    return StyleImageEncoder(encoder, processor, variant="plain", cache_size=1024, rowwise=rowwise)


def run_encoder(which: str, batches: list[int], reps: int, side: int = 256) -> dict:
    enc = build_encoder(which)
    rng = np.random.default_rng(0)
    params = sum(p.numel() for p in enc.encoder.parameters())
    enc.encode_images([_image(rng, side)])  # warm-up (allocations, first-call paths)
    results = []
    for batch in batches:
        miss_s, hit_s, same = [], [], True
        for _ in range(reps):
            images = [_image(rng, side) for _ in range(batch)]  # new pixels: new digests
            t0 = time.perf_counter()
            first = enc.encode_images(images)
            miss_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            again = enc.encode_images(images)
            hit_s.append(time.perf_counter() - t0)
            same = same and all(a[0] is b[0] for a, b in zip(first, again, strict=True))
        miss, hit = statistics.median(miss_s), statistics.median(hit_s)
        results.append(
            {
                "batch": batch,
                "miss_ms": 1000 * miss,
                "miss_images_per_s": batch / miss,
                "hit_ms": 1000 * hit,
                "hit_images_per_s": batch / hit,
                "hit_returns_the_miss_embeddings": same,
            }
        )
    return {"encoder": which, "parameters": params, "image_side": side, "reps": reps, "results": results, **enc.stats()}


def _image(rng, side: int) -> tuple[str, np.ndarray]:
    from graph.style_inputs import image_digest

    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    return image_digest(pixels), pixels


# -- main ----------------------------------------------------------------------------------------------------


def machine() -> dict:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": name,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["mixed", "encoder", "both"], default="both")
    parser.add_argument("--model", action="append", help="builtin:tiny-sd and/or sd15 (default: both)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--image-rows", default="0,2,4,8", help="comma-separated; the first is the baseline")
    parser.add_argument("--size", type=int, default=None, help="default: 64 for tiny-sd, 256 for sd15")
    parser.add_argument("--warmup", type=int, default=None, help="default: 2 for tiny-sd, 1 for sd15")
    parser.add_argument("--ticks", type=int, default=None, help="per round; default: 5 for tiny-sd, 2 for sd15")
    parser.add_argument("--rounds", type=int, default=None, help="default: 4 for tiny-sd, 2 for sd15")
    parser.add_argument("--stock", action="store_true", help="stock PyTorch kernels instead of batch-invariant ones")
    parser.add_argument("--encoder", action="append", help="tiny and/or vit-h (default: both)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--reps", type=int, default=None, help="default: 5 for tiny, 1 for vit-h")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = {"machine": machine(), "mixed": [], "encoder": []}
    if args.part in ("mixed", "both"):
        image_rows = [int(x) for x in args.image_rows.split(",")]
        for model in args.model or ["builtin:tiny-sd", "sd15"]:
            full = model == "sd15"
            size = args.size or (256 if full else 64)
            ticks = args.ticks or (2 if full else 5)
            rounds = args.rounds or (2 if full else 4)
            warmup = args.warmup if args.warmup is not None else (1 if full else 2)
            res = run_mixed(model, args.rows, image_rows, size, warmup, ticks, args.stock, rounds)
            out["mixed"].append(res)
            for r in res["results"]:
                print(
                    f"| {model} | {size} | {args.rows} | {r['image_rows']} | {r['tick_ms']:.1f} | {r['ratio']:.3f} | "
                    f"{r['min_tick_ms']:.1f} | {r['min_ratio']:.3f} | {r['plain_rows_identical']} | "
                    f"{r['image_rows_moved']} |",
                    flush=True,
                )
    if args.part in ("encoder", "both"):
        batches = [int(x) for x in args.batches.split(",")]
        for which in args.encoder or ["tiny", "vit-h"]:
            res = run_encoder(which, batches, args.reps or (5 if which == "tiny" else 1))
            out["encoder"].append(res)
            for r in res["results"]:
                print(
                    f"| {which} | {r['batch']} | {r['miss_ms']:.1f} | {r['miss_images_per_s']:.2f} | "
                    f"{r['hit_ms']:.3f} | {r['hit_images_per_s']:.0f} | {r['hit_returns_the_miss_embeddings']} |",
                    flush=True,
                )
    out["machine"]["load_average_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
