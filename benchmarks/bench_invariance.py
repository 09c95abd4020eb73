"""What batch invariance costs on the CPU: UNet forwards with and without the invariant kernels.

    python benchmarks/bench_invariance.py [--full-batches 2 8] [--repeats 3] [--json out.json]

Two architectures, random weights from their configs: the embedded ``builtin:tiny-sd`` (at 64 and
256 px, as tests and ``make serve`` run it) and the full-size Stable Diffusion 1.5 UNet (320-1280
channels, 8 heads, 768-wide cross-attention; at 256 px so that a forward of 8 rows fits in seconds
on two cores). For each batch of rows (a row is one latent; an image with guidance is two):

- **stock**: diffusers' modules as they come (PyTorch's kernels, SDPA attention);
- **invariant**: ``make_batch_invariant`` (what the server runs on the CPU), measured after a
  first call, which also runs the one-time checks of every new shape (reported separately).

Each figure is the median of ``--repeats`` timed forwards, stock and invariant alternating. Prints a
Markdown table; ``--json`` writes the raw figures. Run it with the ISA settings of
``tests/isa_matrix.py`` (for example MKL's Intel kernels on an AMD CPU) to see their cost there.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deployments.engine import batch_invariance, models  # noqa: E402
from deployments.engine.batch_invariance import make_batch_invariant  # noqa: E402

SD15_UNET = {  # diffusers' UNet2DConditionModel defaults are SD1.x's layout; these are SD1.5's sizes
    "sample_size": 64,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


def tiny_unet() -> tuple[torch.nn.Module, int]:
    directory = models.resolve_model_dir("builtin:tiny-sd", os.environ.get("LORAFLEET_CACHE_DIR") or tempfile.mkdtemp())
    return models.load_unet(directory, torch.device("cpu"), torch.float32), 64


def sd15_unet() -> tuple[torch.nn.Module, int]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD15_UNET).eval(), 768


@torch.inference_mode()
def measure(unet, hidden: int, rows: int, latent: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 4, latent, latent, generator=g)
    t = torch.linspace(999, 1, rows)
    c = torch.randn(rows, 77, hidden, generator=g)
    stock = unet
    invariant = make_batch_invariant(copy.deepcopy(unet))

    def forward(model) -> float:
        start = time.perf_counter()
        model(x, t, encoder_hidden_states=c)
        return time.perf_counter() - start

    forward(stock)  # warm-up
    batch_invariance._checked.clear()
    first = forward(invariant)  # the one-time checks of this batch's shapes
    times = {"stock": [], "invariant": []}
    for _ in range(repeats):
        times["stock"].append(forward(stock))
        times["invariant"].append(forward(invariant))
    med = {k: statistics.median(v) for k, v in times.items()}
    fallbacks = sum(1 for ok in batch_invariance._checked.values() if not ok)
    return {
        "rows": rows,
        "latent": latent,
        "stock_ms": 1000 * med["stock"],
        "invariant_ms": 1000 * med["invariant"],
        "cost": med["invariant"] / med["stock"],
        "first_call_ms": 1000 * first,
        "checks": len(batch_invariance._checked),
        "checks_failed": fallbacks,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny-batches", type=int, nargs="+", default=[2, 8, 16])
    p.add_argument("--full-batches", type=int, nargs="+", default=[2, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    results = []
    tiny, tiny_hidden = tiny_unet()
    for latent in (8, 32):
        for rows in args.tiny_batches:
            r = {"model": "builtin:tiny-sd", **measure(tiny, tiny_hidden, rows, latent, args.repeats)}
            results.append(r)
            print(r, flush=True)
    full, full_hidden = sd15_unet()
    for rows in args.full_batches:
        r = {"model": "SD1.5 UNet (full size)", **measure(full, full_hidden, rows, 32, args.repeats)}
        results.append(r)
        print(r, flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\nMachine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads); "
        f"1-min load average {load:.1f} at the end. Median of {args.repeats} forwards.\n"
    )
    print("| UNet | image | rows | stock ms | invariant ms | cost | first call ms (checks) | checks failed |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['model']} | {r['latent'] * 8} px | {r['rows']} | {r['stock_ms']:.0f} | {r['invariant_ms']:.0f} "
            f"| {r['cost']:.2f}x | {r['first_call_ms']:.0f} ({r['checks']}) | {r['checks_failed']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
