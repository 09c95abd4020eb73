"""Multi-LoRA UNet step on a GPU: SD1.5's or SDXL's UNet (random weights, fp16), 16 CFG rows, 8 rank-16 adapters.

    PYTHONPATH=. python benchmarks/bench_multi_lora_gpu.py [--model sd15|sdxl] [--json out.json]
    PYTHONPATH=. python benchmarks/bench_multi_lora_gpu.py --smoke [--model sdxl]   # CPU, tiny config, < 1 min

Needs torch, diffusers (for ``UNet2DConditionModel``) and peft; no Ray, no
registry, nothing downloaded (the UNet is built from its config). ``--model
sd15`` (the default): one UNet step over 16 rows (8 images with guidance) at
64x64 latents (512 px), random ``encoder_hidden_states`` [16, 77, 768] and a
timestep per row. ``--model sdxl``: SDXL base's UNet (``[320, 640, 1280]``,
``transformer_layers_per_block`` ``[1, 2, 10]``, ``text_time`` added
conditions; 2.6 B parameters) at 128x128 latents (1024 px), context
[16, 77, 2048], and per row SDXL's ``added_cond_kwargs``: random pooled text
embeddings [16, 1280] and the time ids of a 1024x1024 image. Then:

1. **base**: the UNet alone.
2. **lorafleet**: ``MultiLoRAModel`` on ``to_q/to_k/to_v/to_out.0`` with 8
   different rank-16 adapters, 2 rows each (``deterministic=False``, as on CUDA).
3. **diffusers, one sub-batch per adapter**: the UNet with the same 8
   adapters as peft layers (``unet.add_adapter``), 8 forwards of 2 rows with
   ``unet.set_adapters([name])`` before each; the time is the whole loop.
4. **CUDA graphs**: the lorafleet 16-row step, the 16-row and the 2-row base
   step, captured once and replayed, against eager. ``MultiLoRAModel.routed``
   writes the routing into preallocated buffers; the gather kernel reads only
   those, so its graph replays whatever routing is written there later (same
   rows and depth), while the grouped kernel's per-slot loop is fixed at capture.
5. **Rerouting a captured graph**: the lorafleet graph (gather kernel) captured
   with one routing, replayed after another routing is written into the same
   buffers, checked against the eager step on that routing.

Per-step times are CUDA-event medians after warm-up (20 iterations, SDXL 10).
Prints a Markdown table with the ratios against the targets: lorafleet <=
1.10x the base step, >= 5x faster than the sub-batch loop. ``--smoke`` runs it
all on the CPU with a tiny UNet of the same family (8x8 latents, 2 iterations,
no CUDA graphs), to check the script runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from deployments.engine.multi_lora import MultiLoRAModel

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SMOKE_UNET = {
    **SD15_UNET,
    "sample_size": 8,
    "block_out_channels": [32, 64, 64, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
}
ROOT = Path(__file__).resolve().parent.parent
# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, as lorafleet ships it for single-file checkpoints.
SDXL_UNET = {
    k: v
    for k, v in json.loads((ROOT / "deployments/engine/configs/sdxl-base/unet/config.json").read_text()).items()
    if not k.startswith("_")
}
SMOKE_SDXL_UNET = {
    **SDXL_UNET,
    "sample_size": 8,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 4, 4],
    "cross_attention_dim": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}
# --model: (name in the report, full-size config, smoke config, latent size, default timed iterations).
MODELS = {
    "sd15": ("SD1.5", SD15_UNET, SMOKE_UNET, 64, 20),
    "sdxl": ("SDXL", SDXL_UNET, SMOKE_SDXL_UNET, 128, 10),
}


@dataclass(frozen=True)
class Settings:
    model: str  # a key of MODELS
    device: str
    dtype: str
    rows: int
    adapters: int
    rank: int
    latent: int
    tokens: int
    iters: int
    warmup: int
    cuda_graphs: bool


# -- timing ---------------------------------------------------------------------


def time_ms(fn, s: Settings) -> float:
    """Median milliseconds of ``fn()`` over ``s.iters`` runs after ``s.warmup``; CUDA events on the GPU."""
    return median_ms(fn, s.iters, s.warmup, cuda=s.device == "cuda")


def median_ms(fn, iters: int, warmup: int, *, cuda: bool, budget_s: float | None = None) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs after ``warmup`` (CUDA events when ``cuda``).

    ``budget_s``: stop timing once that many seconds have passed since the start (warm-up included),
    after one timed run at least: a time-boxed suite takes fewer iterations, never none.
    """
    began = time.perf_counter()

    def more(done: int) -> bool:
        return done < iters and (budget_s is None or done == 0 or time.perf_counter() - began < budget_s)

    for _ in range(warmup):
        fn()
    times: list[float] = []
    if cuda:
        torch.cuda.synchronize()
        while more(len(times)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        while more(len(times)):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


class GraphStep:
    """One UNet step captured as a CUDA graph over static input buffers; ``replay`` reruns it."""

    def __init__(self, unet, x, t, context, added=None, routed=None):
        self.x, self.t, self.context = x.clone(), t.clone(), context.clone()  # static inputs
        self.added = None if added is None else {k: v.clone() for k, v in added.items()}  # SDXL
        # Entering ``routed`` writes the routing into the model's preallocated buffers, before capture;
        # the graph holds their addresses (and, for the grouped kernel, the per-slot loop it unrolled).
        ctx = routed if routed is not None else contextlib.nullcontext()
        with ctx:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm up allocator and kernels off the capture stream
                    self._forward(unet)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._forward(unet)

    def _forward(self, unet):
        kwargs = {} if self.added is None else {"added_cond_kwargs": self.added}
        return unet(self.x, self.t, encoder_hidden_states=self.context, return_dict=False, **kwargs)[0]

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


# -- models ---------------------------------------------------------------------


def build_unet(config: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # random init straight on the device: SD1.5's 860M parameters
        unet = UNet2DConditionModel(**config)
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def added_conditions(unet_config: dict, rows: int, latent: int, g: torch.Generator) -> dict[str, torch.Tensor] | None:
    """SDXL's ``added_cond_kwargs`` for ``rows`` rows (None for other UNets): random pooled text
    embeddings and the time ids of a square image at the latent size (original size, crop (0, 0), target size)."""
    if unet_config.get("addition_embed_type") != "text_time":
        return None
    time_dim = unet_config["addition_time_embed_dim"]
    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * time_dim
    px = 8 * latent
    return {
        "text_embeds": torch.randn((rows, pooled), generator=g),  # [rows, pooled]
        "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * rows, dtype=torch.float32),  # [rows, 6]
    }


def step_inputs(
    unet_config: dict, rows: int, latent: int, tokens: int, device: torch.device, dtype: torch.dtype, seed: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """Random inputs of one UNet step over ``rows`` rows: ``(x_t, t, context, added_cond_kwargs or None)``."""
    g = torch.Generator().manual_seed(seed)
    shape = (rows, unet_config["in_channels"], latent, latent)  # [rows, c, h, w]
    x = torch.randn(shape, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (rows,), generator=g).to(device)  # [rows]: each row at its own step
    context = torch.randn((rows, tokens, unet_config["cross_attention_dim"]), generator=g).to(device, dtype)
    added = added_conditions(unet_config, rows, latent, g)
    if added is not None:
        added = {k: v.to(device, dtype) for k, v in added.items()}
    return x, t, context, added


def random_adapters(
    lora: MultiLoRAModel, count: int, rank: int, dtype: torch.dtype, *, only=None, device=None, seed: int = 1
) -> list[dict]:
    """``count`` adapters ``{module path: (A [r, in], B [out, r], alpha)}`` on every layer of ``lora``, or on
    the layers whose path ends in one of ``only``; on the slots' device, or ``device`` (e.g. host memory)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        weights = {}
        for path, layer in lora.layers.items():
            if only is not None and not any(path == o or path.endswith("." + o) for o in only):
                continue
            fan_in, fan_out = layer.lora_A[0].numel(), layer.out_features
            A = torch.randn((rank, *layer.a_shape), generator=g) / fan_in**0.5
            B = torch.randn((fan_out, rank), generator=g) / rank**0.5 * 0.1
            if len(layer.a_shape) == 3:  # a conv's B is [out, r, 1, 1]
                B = B[:, :, None, None]
            target = layer.lora_A.device if device is None else device
            weights[path] = (A.to(target, dtype), B.to(target, dtype), rank)
        out.append(weights)
    return out


def add_peft_adapters(unet, adapters: list[dict], rank: int, dtype: torch.dtype, targets=TARGETS) -> list[str]:
    """The same adapters as peft LoRA layers through diffusers' ``add_adapter``, weights copied in."""
    from peft import LoraConfig

    names = [f"adapter{k}" for k in range(len(adapters))]
    for name in names:
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False)
        unet.add_adapter(config, adapter_name=name)
    unet.to(dtype)  # peft may keep adapter weights in float32; diffusers' fp16 pipelines run them in fp16
    with torch.no_grad():
        for name, weights in zip(names, adapters, strict=True):
            for path, (A, B, _alpha) in weights.items():
                layer = unet.get_submodule(path)
                layer.lora_A[name].weight.copy_(A)
                layer.lora_B[name].weight.copy_(B)
    return names


# -- the run --------------------------------------------------------------------


def run(s: Settings, unet_config: dict) -> dict:
    device, dtype = torch.device(s.device), getattr(torch, s.dtype)
    base = build_unet(unet_config, device, dtype)
    x, t, context, added = step_inputs(unet_config, s.rows, s.latent, s.tokens, device, dtype)
    per = s.rows // s.adapters  # rows per adapter
    routing = [((1 + k // per, 1.0),) for k in range(s.rows)]  # rows 2k, 2k+1 -> slot k+1

    def added_rows(rows):
        return None if added is None else {k: v[rows] for k, v in added.items()}

    def step(unet, rows=slice(None)):
        kwargs = {} if added is None else {"added_cond_kwargs": added_rows(rows)}
        return unet(x[rows], t[rows], encoder_hidden_states=context[rows], return_dict=False, **kwargs)[0]

    res: dict = {}
    with torch.inference_mode():
        res["base_ms"] = time_ms(lambda: step(base), s)
        res["base_2row_ms"] = time_ms(lambda: step(base, slice(0, 2)), s)
        print(f"base: {res['base_ms']:.2f} ms / {s.rows} rows, {res['base_2row_ms']:.2f} ms / 2 rows", flush=True)

        fleet_unet = copy.deepcopy(base)
        lora = MultiLoRAModel(fleet_unet, TARGETS, num_slots=s.adapters + 1, max_rank=s.rank, deterministic=False)
        adapters = random_adapters(lora, s.adapters, s.rank, dtype)
        for k, weights in enumerate(adapters):
            lora.load(k + 1, weights)
        res["lora_layers"] = len(lora.layers)
        res["lorafleet_no_adapter_ms"] = time_ms(lambda: step(fleet_unet), s)

        def fleet_step():
            with lora.routed(routing):
                return step(fleet_unet)

        res["lorafleet_ms"] = time_ms(fleet_step, s)
        res["lorafleet_kernel"] = lora.kernel.name
        print(
            f"lorafleet ({lora.kernel.name} kernel): {res['lorafleet_ms']:.2f} ms ({len(lora.layers)} LoRA layers)",
            flush=True,
        )
        other = "grouped" if lora.kernel.name == "gather" else "gather"
        lora.use_kernel(other)

        def other_step():
            with lora.routed(routing):
                return step(fleet_unet)

        res["lorafleet_other_kernel_ms"] = time_ms(other_step, s)
        lora.use_kernel(res["lorafleet_kernel"])
        print(f"lorafleet ({other} kernel): {res['lorafleet_other_kernel_ms']:.2f} ms", flush=True)

        # Another routing, for the rerouted graph replay: rows in another order, with other weights.
        routing2 = [((1 + (k * 3) % s.adapters, 0.5),) for k in range(s.rows)]
        with lora.routed(routing2):
            eps_fleet2 = step(fleet_unet).float()

    peft_unet = copy.deepcopy(base)
    names = add_peft_adapters(peft_unet, adapters, s.rank, dtype)
    with torch.inference_mode():

        def sub_batches():
            out = []
            for k, name in enumerate(names):
                peft_unet.set_adapters([name], weights=[1.0])
                out.append(step(peft_unet, slice(k * per, (k + 1) * per)))
            return torch.cat(out)

        res["subbatch_ms"] = time_ms(sub_batches, s)
        peft_unet.set_adapters([names[0]], weights=[1.0])
        # The same 8 two-row forwards with no switching in between: the loop's cost without `set_adapters`.
        res["subbatch_forwards_only_ms"] = time_ms(
            lambda: [step(peft_unet, slice(k * per, (k + 1) * per)) for k in range(len(names))], s
        )
        t0 = time.perf_counter()
        for name in names:
            peft_unet.set_adapters([name], weights=[1.0])
        res["set_adapters_ms"] = 1000 * (time.perf_counter() - t0) / len(names)
        print(f"diffusers sub-batches: {res['subbatch_ms']:.2f} ms", flush=True)

        # Same adapters, same rows: lorafleet's mixed step must agree with the sub-batches.
        eps_fleet, eps_sub, eps_base = fleet_step().float(), sub_batches().float(), step(base).float()
        res["finite"] = bool(torch.isfinite(eps_fleet).all() and torch.isfinite(eps_sub).all())
        res["fleet_vs_subbatch_max_abs"] = (eps_fleet - eps_sub).abs().max().item()
        res["adapter_effect_max_abs"] = (eps_sub - eps_base).abs().max().item()

        if s.cuda_graphs:
            # A failed capture is reported, not fatal: the eager figures above still stand.
            res["graph_errors"] = {}
            two = slice(0, 2)
            captures = {
                "base_graph_ms": lambda: GraphStep(base, x, t, context, added),
                "base_2row_graph_ms": lambda: GraphStep(base, x[two], t[two], context[two], added_rows(two)),
                "lorafleet_graph_ms": lambda: GraphStep(fleet_unet, x, t, context, added, routed=lora.routed(routing)),
            }
            for key, capture in captures.items():
                try:
                    graph = capture()
                except Exception as e:  # noqa: BLE001
                    res["graph_errors"][key] = f"{type(e).__name__}: {e}"
                    print(f"CUDA graph capture failed for {key}: {e}", flush=True)
                    torch.cuda.synchronize()
                    continue
                res[key] = time_ms(graph.replay, s)
                if key == "lorafleet_graph_ms":
                    res["lorafleet_graph_vs_eager_max_abs"] = (graph.replay().float() - eps_fleet).abs().max().item()
                    if lora.kernel.name == "gather":
                        # Captured with ``routing``, replayed after ``routing2`` is written into the same buffers.
                        width = lora.routing_width(routing)  # the captured width
                        lora.routing_buffers.write(routing2, lora.state.pages, width=width)
                        res["lorafleet_graph_rerouted_max_abs"] = (
                            (graph.replay().float() - eps_fleet2).abs().max().item()
                        )
                        lora.routing_buffers.write(routing, lora.state.pages, width=width)
                del graph
    return res


def report(s: Settings, res: dict, unet_config: dict) -> None:
    dev = torch.cuda.get_device_name() if s.device == "cuda" else platform.processor() or platform.machine()
    name, full, _, _, _ = MODELS[s.model]
    which = name if unet_config is full else f"smoke ({name}-shaped)"
    print()
    print(
        f"Device: {dev}; torch {torch.__version__}, {s.dtype}. UNet: {which} "
        f"config {unet_config['block_out_channels']}, random weights; {s.rows} rows at {s.latent}x{s.latent} latents, "
        f"{s.tokens} tokens"
        + (", SDXL's added conditions per row" if "addition_embed_type" in unet_config else "")
        + f"; {s.adapters} rank-{s.rank} adapters on {'/'.join(TARGETS)} ({res['lora_layers']} layers), "
        f"{s.rows // s.adapters} rows each. Median of {s.iters} after {s.warmup} warm-up."
    )
    print()
    base, fleet, sub = res["base_ms"], res["lorafleet_ms"], res["subbatch_ms"]
    rows = [
        (f"(1) base UNet, {s.rows} rows", base),
        ("lorafleet layers, no adapter routed", res["lorafleet_no_adapter_ms"]),
        (
            f"(2) lorafleet ({res['lorafleet_kernel']} kernel), {s.adapters} adapters x {s.rows // s.adapters} rows",
            fleet,
        ),
        ("(2') lorafleet, the other multi-LoRA kernel", res["lorafleet_other_kernel_ms"]),
        (f"(3) diffusers, {s.adapters} sub-batches + `set_adapters`", sub),
        (f"(3) the same {s.adapters} two-row forwards, no switching", res["subbatch_forwards_only_ms"]),
    ]
    if "base_graph_ms" in res:
        rows.append((f"(4) base UNet, {s.rows} rows, CUDA graph", res["base_graph_ms"]))
    if "lorafleet_graph_ms" in res:
        rows.append(("(4) lorafleet, CUDA graph (one fixed routing)", res["lorafleet_graph_ms"]))
    print("| step | ms | vs base |")
    print("|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {ms / base:.2f}x |")
    print(f"| base UNet, 2 rows, eager | {res['base_2row_ms']:.2f} | |")
    if "base_2row_graph_ms" in res:
        print(f"| base UNet, 2 rows, CUDA graph | {res['base_2row_graph_ms']:.2f} | |")
    print()

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print("| target | measured | |")
    print("|---|---:|---|")
    print(f"| lorafleet <= 1.10x base (eager) | {fleet / base:.2f}x | {verdict(fleet / base <= 1.10)} |")
    print(f"| lorafleet >= 5x faster than sub-batches (eager) | {sub / fleet:.2f}x | {verdict(sub / fleet >= 5)} |")
    fg, bg, bg2 = (res.get(k) for k in ("lorafleet_graph_ms", "base_graph_ms", "base_2row_graph_ms"))
    if fg is not None and bg is not None:
        print(f"| lorafleet graph <= 1.10x base graph | {fg / bg:.2f}x | {verdict(fg / bg <= 1.10)} |")
        print(f"| lorafleet graph >= 5x faster than sub-batches (eager) | {sub / fg:.2f}x | {verdict(sub / fg >= 5)} |")
    gains = [
        (f"lorafleet {s.rows} rows", fleet, fg),
        (f"base {s.rows} rows", base, bg),
        ("base 2 rows", res["base_2row_ms"], bg2),
    ]
    for name, eager, graph in gains:
        if graph is not None:
            print(f"| CUDA graph gain, {name} (eager / replay) | {eager / graph:.2f}x | |")
    print()
    print(
        f"Check: max |eps| difference lorafleet vs sub-batches {res['fleet_vs_subbatch_max_abs']:.3g} "
        f"(adapters change eps by up to {res['adapter_effect_max_abs']:.3g}); outputs finite: {res['finite']}; "
        f"`set_adapters` costs {res['set_adapters_ms']:.2f} ms of host time per switch."
        + (
            f" Graph replay vs eager lorafleet: {res['lorafleet_graph_vs_eager_max_abs']:.3g}"
            + (
                f"; replayed after another routing was written: {res['lorafleet_graph_rerouted_max_abs']:.3g}."
                if "lorafleet_graph_rerouted_max_abs" in res
                else "."
            )
            if fg is not None
            else ""
        )
    )
    for key, error in res.get("graph_errors", {}).items():
        print(f"CUDA graph capture failed for {key.removesuffix('_ms')}: {error}")
    if s.device == "cpu":
        print("Smoke run on the CPU: the timings mean nothing; it only checks that the script runs.")


def quiet() -> None:
    """peft warns on every ``add_adapter`` after the first; diffusers on ``.to(dtype)`` of a model built here."""
    import warnings

    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")


def settings_for(model: str, smoke: bool, iters: int | None = None, cuda_graphs: bool = True) -> tuple[Settings, dict]:
    """The run's settings and UNet config: 16 rows, 8 rank-16 adapters, 77 tokens; fp16 on CUDA at the
    model's latent size, or (``smoke``) float32 on the CPU with the tiny config, 8x8 latents."""
    _, full, tiny, latent, default_iters = MODELS[model]
    if smoke:
        # One thread: a shared CPU's other load makes multi-threaded OpenMP spin and stall.
        torch.set_num_threads(1)
        s = Settings(model, "cpu", "float32", 16, 8, 16, 8, 77, iters or 2, 1, False)
    else:
        warmup = 5 if model == "sd15" else 3
        s = Settings(model, "cuda", "float16", 16, 8, 16, latent, 77, iters or default_iters, warmup, cuda_graphs)
    if s.rows % s.adapters:
        raise ValueError(f"rows ({s.rows}) must split evenly over the adapters ({s.adapters})")
    return s, tiny if smoke else full


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="sd15", help="the UNet's architecture")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny UNet, 2 iterations, no CUDA graphs")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 20, SDXL 10, smoke 2)")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA graph captures")
    p.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    args = p.parse_args()
    quiet()
    s, unet_config = settings_for(args.model, args.smoke, args.iters, not args.no_graphs)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke to check the script on the CPU")
    res = run(s, unet_config)
    report(s, res, unet_config)
    if args.json:
        args.json.write_text(json.dumps({"settings": asdict(s), "unet": unet_config, "results": res}, indent=2))


if __name__ == "__main__":
    main()
