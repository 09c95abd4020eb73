"""(g) ``model.compile: regional``: compile time, the compiled step against eager, and no recompile on new adapters.

A fresh UNet of the run's architecture (random weights) with the served adapter slots and the gather kernel,
8 adapters resident: the mixed step eagerly, then ``compile_regions`` (diffusers' ``compile_repeated_blocks``)
and the first call timed as the compile, then the compiled step, then another mix of adapters (other slots,
other weights) with ``torch.compiler.set_stance("fail_on_recompile")``: any recompile is an error.
"""

from __future__ import annotations

import json
import time

import torch

from benchmarks.bench_multi_lora_gpu import median_ms, step_inputs
from deployments.engine.multi_lora import MultiLoRAModel
from deployments.engine.runtime import compile_regions

from .models import SERVED_LORA, host_adapters, model_dir
from .settings import Budget, ModelRun, SuiteSettings

ROWS = 16


def compile_part(run: ModelRun, s: SuiteSettings, device: torch.device, dtype: torch.dtype, budget: Budget) -> dict:
    from diffusers import UNet2DConditionModel
    from torch._dynamo.utils import counters

    cuda = device.type == "cuda"
    backend = "inductor" if cuda else "eager"  # the CPU smoke checks the recompile rule, not inductor's speed
    config = json.loads((model_dir(run.source) / "unet" / "config.json").read_text())
    with torch.random.fork_rng(), torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    host = host_adapters(unet, s.adapters, s.rank, dtype)  # before the slots wrap the projections
    lora = MultiLoRAModel(
        unet, SERVED_LORA.unet_target_modules, num_slots=s.adapters + 1, max_rank=SERVED_LORA.max_rank, kernel="gather"
    )
    for k, weights in enumerate(host):
        lora.load(k + 1, weights)
    latent = run.size_px // (2 ** (len(config["block_out_channels"]) - 1))
    x, t, context, added = step_inputs(config, ROWS, latent, 77, device, dtype)
    kwargs = {} if added is None else {"added_cond_kwargs": added}
    first_mix = [((i // 2 % s.adapters + 1, 1.0),) for i in range(ROWS)]
    other_mix = [((((i // 2 + 3) % s.adapters) + 1, 0.5),) for i in range(ROWS)]

    def step(mix):
        with torch.inference_mode(), lora.routed(mix):
            return unet(x, t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]

    out: dict = {"backend": backend, "rows": ROWS, "latent": latent}
    out["eager_ms"] = median_ms(lambda: step(first_mix), s.iters, s.warmup, cuda=cuda, budget_s=budget.share(3))
    eager_other = step(other_mix).float()
    torch._dynamo.reset()
    try:
        compile_regions(unet, "regional", backend=backend)
        start = time.perf_counter()
        step(first_mix)
        if cuda:
            torch.cuda.synchronize()
        out["compile_s"] = time.perf_counter() - start
        out["compiled_graphs"] = counters["stats"]["unique_graphs"]
        out["compiled_ms"] = median_ms(lambda: step(first_mix), s.iters, s.warmup, cuda=cuda, budget_s=budget.share(2))
        torch.compiler.set_stance("fail_on_recompile")
        try:
            compiled_other = step(other_mix).float()
            out["recompiled_on_new_adapters"] = False
            out["compiled_vs_eager_max_abs"] = (compiled_other - eager_other).abs().max().item()
        except Exception as e:  # noqa: BLE001 - the rule broken is the finding
            out["recompiled_on_new_adapters"] = True
            out["recompile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        torch.compiler.set_stance("default")
        torch._dynamo.reset()
    out["compiled_vs_eager_speed"] = out["eager_ms"] / out["compiled_ms"] if out.get("compiled_ms") else None
    return out
