"""One tick of the step scheduler on the CPU: the UNet forward and everything else (scheduler steps).

    python benchmarks/bench_scheduler_step.py [--model builtin:tiny-sd] [--rows 16] [--ticks 20] [--json out.json]
    python benchmarks/bench_scheduler_step.py --model builtin:tiny-sdxl

``rows / 2`` text-to-image requests with guidance (two UNet rows each), 64x64,
their schedulers cycling DDIM, Euler, Euler a and DPM++ 2M, with step counts
spread so that the rows of a tick sit at different steps of different schedules.
Random prompt embeddings (no text encoder: only the tick is timed). The UNet runs
with the kernels the server ships on the CPU (deterministic mode) unless
``--stock``. After ``--warmup`` ticks, ``--ticks`` ticks are timed: the whole
tick, the UNet forward inside it (forward hooks), and the rest (inputs, guidance,
scheduler steps); then the same ticks again under ``HostSyncCounter``, which
counts the calls that would wait for a GPU.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deployments.engine import models  # noqa: E402
from deployments.engine.batch_invariance import make_batch_invariant  # noqa: E402
from deployments.engine.host_syncs import HostSyncCounter  # noqa: E402
from deployments.engine.schedulers import SchedulerFactory  # noqa: E402
from deployments.engine.step_scheduler import DenoiseRequest, StepScheduler  # noqa: E402

SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m")


def build(model: str, rows: int, stock: bool) -> StepScheduler:
    cache = Path(os.environ.get("LORAFLEET_CACHE_DIR") or Path(tempfile.gettempdir()) / "lorafleet-bench-cache")
    model_dir = models.resolve_model_dir(model, cache)
    info = models.read_model_info(model, model_dir)
    unet = models.load_unet(model_dir, torch.device("cpu"), torch.float32)
    if not stock:
        unet = make_batch_invariant(unet)
    return StepScheduler(
        unet,
        SchedulerFactory(info.scheduler_class, info.scheduler_config),
        vae_scale_factor=info.vae_scale_factor,
        max_rows_per_tick=rows,
        max_queued=rows,
    )


def requests(steps: StepScheduler, images: int, max_steps: int) -> list[DenoiseRequest]:
    g = torch.Generator().manual_seed(0)
    cfg = steps.unet.config
    hidden = cfg.cross_attention_dim
    out = []
    for i in range(images):
        kwargs = {}
        if steps.text_time:
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kwargs = {
                "pooled_prompt_embeds": torch.randn(pooled, generator=g),
                "negative_pooled_prompt_embeds": torch.randn(pooled, generator=g),
                "add_time_ids": (64, 64, 0, 0, 64, 64),
                "negative_add_time_ids": (64, 64, 0, 0, 64, 64),
            }
        out.append(
            DenoiseRequest(
                torch.randn(77, hidden, generator=g),
                torch.randn(77, hidden, generator=g),
                64,
                64,
                max_steps - 3 * i,  # rows of a tick at different steps of different schedules
                7.5,
                seed=i,
                scheduler=SCHEDULERS[i % len(SCHEDULERS)],
                **kwargs,
            )
        )
    return out


def run(model: str, rows: int, warmup: int, ticks: int, stock: bool) -> dict:
    steps = build(model, rows, stock)
    images = rows // 2
    max_steps = warmup + 2 * ticks + 3 * images + 2  # nobody finishes while timed
    steps.submit(requests(steps, images, max_steps))
    unet_s: list[float] = []
    started: list[float] = []
    steps.unet.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    steps.unet.register_forward_hook(lambda *_: unet_s.append(time.perf_counter() - started[-1]))
    for _ in range(warmup):
        steps.tick()
    assert sum(j.rows for j in steps.active) == rows, "every row in the batch"
    unet_s.clear()
    tick_s = []
    for _ in range(ticks):
        t0 = time.perf_counter()
        steps.tick()
        tick_s.append(time.perf_counter() - t0)
    rest = [t - u for t, u in zip(tick_s, unet_s, strict=True)]
    unet_ms = 1000 * statistics.median(unet_s)
    syncs = []
    for _ in range(ticks):
        with HostSyncCounter() as counter:
            steps.tick()
        syncs.append(len(counter.calls))
    return {
        "model": model,
        "rows": rows,
        "ticks": ticks,
        "kernels": "stock" if stock else "batch-invariant",
        "tick_ms": 1000 * statistics.median(tick_s),
        "unet_ms": unet_ms,
        "rest_ms": 1000 * statistics.median(rest),
        "host_syncs_per_tick": statistics.mean(syncs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-sd")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ticks", type=int, default=20)
    parser.add_argument("--stock", action="store_true", help="stock PyTorch kernels instead of batch-invariant ones")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    result = run(args.model, args.rows, args.warmup, args.ticks, args.stock)
    result.update(
        machine=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        load_average=os.getloadavg(),
        torch=torch.__version__,
    )
    print(
        f"| {result['model']} | {result['rows']} | {result['kernels']} | {result['tick_ms']:.1f} | "
        f"{result['unet_ms']:.1f} | {result['rest_ms']:.2f} | {result['host_syncs_per_tick']:.1f} |"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
