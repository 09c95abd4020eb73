"""Runs the parts in order, each against its budget, and writes ``suite.json`` and ``suite.md``.

    python -m benchmarks.gpu_suite [--out DIR] [--smoke]

A part that fails is recorded with its error and the next one runs: a GPU
host lent once must give every figure it can.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from .baselines import Pipelines, diffusers_part, served_vs_diffusers
from .compiled import compile_part
from .ip_adapter import ip_adapter_part
from .models import Request, draw_requests, host_adapters, load_model
from .report import markdown, targets
from .served import ServedEngine, engine_graph_support, residency_timings
from .settings import SUITE_LIMIT_S, Budget, ModelRun, SuiteSettings
from .step import graph_vs_eager_latents, step_part

DEFAULT_OUT = ".lorafleet/gpu-suite"
PARTS = (
    "step",
    "correctness",
    "engine",
    "diffusers",
    "sdxl",
    "ip_adapter",
    "compile",
)  # budgeted parts, in the order they run
NO_CUDA_MEMORY = "CPU run: no CUDA allocator to measure"


class Suite:
    def __init__(self, s: SuiteSettings, out: Path | None = None):
        self.s = s
        self.out = out
        self.parts: dict = {}
        self.device = torch.device(s.device)
        self.dtype = getattr(torch, s.dtype)
        self.start = time.perf_counter()
        self.memory: dict = {} if self.device.type == "cuda" else {"cuda": NO_CUDA_MEMORY}
        self.graph_kwargs, self.graph_support = engine_graph_support(self.device)

    def save_partial(self) -> None:
        """What is measured so far into ``suite.partial.json``: a run cut off by its host still gives figures."""
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        partial = {"parts": self.parts, "memory": self.memory, "wall_s": time.perf_counter() - self.start}
        (self.out / "suite.partial.json").write_text(json.dumps(partial, indent=2, default=str))

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", flush=True)

    def budget(self, name: str) -> Budget | None:
        """The part's budget, cut so that the parts after it keep theirs within 8 minutes; None: no time left."""
        later = sum(self.s.budgets_s[p] for p in PARTS[PARTS.index(name) + 1 :])
        seconds = self.s.budgets_s[name]
        if not self.s.smoke:
            seconds = min(seconds, SUITE_LIMIT_S - 15 - (time.perf_counter() - self.start) - later)
        return Budget(seconds) if seconds > 0 else None

    @contextlib.contextmanager
    def measured(self, name: str):
        """(e): peak and still-held CUDA memory over a block (nothing on the CPU)."""
        if self.device.type != "cuda":
            yield
            return
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        try:
            yield
        finally:
            torch.cuda.synchronize()
            self.memory[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated()
            self.memory[f"{name}_held_bytes"] = torch.cuda.memory_allocated() - before

    def attempt(self, label: str, fn, *args, **kwargs) -> dict:
        """``fn``'s figures, or ``{"error": ...}`` (with the traceback printed): the suite goes on."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self.log(f"{label} failed: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stdout)
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            self.save_partial()

    # -- one architecture ---------------------------------------------------------------------

    def prepare(self, run: ModelRun, label: str, with_diffusers: bool):
        """The model, its adapters in host memory, UNet copies for diffusers, and the engine over the original."""
        with self.measured(f"{label}_model"):
            parts = load_model(run.source, self.device, self.dtype)
        host = host_adapters(parts.unet, self.s.adapters, self.s.rank, self.dtype, pin=self.device.type == "cuda")
        plain = copy.deepcopy(parts.unet)  # the base step, and diffusers' pipelines: unwrapped copies
        peft = copy.deepcopy(parts.unet) if with_diffusers else None
        with self.measured(f"{label}_slots"):
            engine = ServedEngine(parts, self.s, run, host, self.graph_kwargs)
        lora = engine.lora
        self.memory[f"{label}_slot_pages_bytes"] = lora.page_bytes * lora.total_pages
        self.memory[f"{label}_rank16_adapter_bytes"] = lora.page_bytes * self.s.rank
        self.log(f"{label}: {run.source} ready ({len(lora.layers)} LoRA layers, {lora.total_pages} pages)")
        if engine.step_graphs is not None:
            graphs = engine.step_graphs
            self.memory[f"{label}_graphs_pool_bytes"] = engine.graphs_pool_bytes
            self.memory[f"{label}_graphs_captured"] = graphs.captured
            self.memory[f"{label}_graphs_capture_s"] = engine.graphs_capture_s
            self.log(f"{label}: {graphs.captured} step graphs captured in {engine.graphs_capture_s:.1f} s")
        return parts, host, plain, peft, engine

    def rewarm(self, engine: ServedEngine, label: str) -> None:
        """The adapters made layers carry LoRA: capture the engine's steps again, as a replica does once loaded."""
        if engine.step_graphs is None:
            return
        start = time.perf_counter()
        shapes = engine.step_graphs.rewarm()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = self.memory[f"{label}_graphs_rewarm_s"] = time.perf_counter() - start
        self.log(f"{label}: {shapes} step graphs captured again for the adapters' layout in {seconds:.1f} s")

    def engine_levels(self, engine: ServedEngine, run: ModelRun, budget: Budget, seed: int) -> dict:
        """(b): a warm-up, then one closed loop per concurrency level, each with an equal share of the budget."""
        engine.closed_loop(draw_requests(2, self.s.adapters, self.s.zipf_s, seed + 50_000, "warm-up: "), 2)
        levels = []
        for i, c in enumerate(run.concurrency):
            requests = draw_requests(run.requests_at(c), self.s.adapters, self.s.zipf_s, seed + 1000 * c)
            result = engine.closed_loop(requests, c, Budget(budget.share(len(run.concurrency) - i)))
            levels.append(result.summary(c))
            lv = levels[-1]
            self.log(
                f"  engine, {c} in flight: {lv['images_per_s']:.2f} images/s, p50 {lv['p50_s']:.3f} s, "
                f"p95 {lv['p95_s']:.3f} s ({lv['images']} images, {lv['failed']} failed)"
            )
        return {"levels": levels, "graph_support": self.graph_support}

    def sd_parts(self, parts_out: dict) -> None:
        s, run = self.s, self.s.sd
        parts, host, plain, peft, engine = self.prepare(run, "sd", with_diffusers=True)
        engine_out: dict = {}
        parts_out["b_engine"] = engine_out  # filled as it goes: suite.partial.json shows what is measured
        with self.measured("residency"):
            engine_out["residency"] = self.attempt("residency", residency_timings, engine, s.adapters)
        res = engine_out["residency"]
        self.log(f"residency: median {res['median_ms']:.2f} ms" if "median_ms" in res else f"residency: {res}")
        self.rewarm(engine, "sd")

        budget = self.budget("step")
        if budget is None:
            parts_out["a_step"] = {"skipped": "out of time"}
        else:
            self.log(f"(a) step alone, {budget.seconds:.0f} s")
            with self.measured("step"):
                parts_out["a_step"] = self.attempt("(a)", step_part, plain, engine, run, s, budget, self.log)

        correctness: dict = {"graph_support": self.graph_support}
        parts_out["f_correctness"] = correctness
        budget = self.budget("correctness")
        self.log("(f) graph vs eager latents")
        with self.measured("graph_vs_eager"):
            correctness["graph_vs_eager"] = (
                {"skipped": "out of time"}
                if budget is None
                else self.attempt("(f) graph", graph_vs_eager_latents, engine, run, s)
            )
        if self.graph_kwargs:
            correctness["engine_graphs_vs_eager"] = self.attempt("(f) engine graphs", engine_graphs_vs_eager, engine)

        budget = self.budget("engine")
        if budget is None:
            engine_out["skipped"] = "out of time"
        else:
            self.log(f"(b) engine end to end, {budget.seconds:.0f} s")
            with self.measured("engine"):
                engine_out.update(self.attempt("(b)", self.engine_levels, engine, run, budget, seed=0))

        budget = self.budget("diffusers")
        pipes = None
        if budget is None:
            parts_out["c_diffusers"] = {"skipped": "out of time"}
        else:
            self.log(f"(c) diffusers, {budget.seconds:.0f} s")
            with self.measured("diffusers"):
                pipes = self.attempt("(c) pipelines", Pipelines, parts, plain, peft, host, s)
                if isinstance(pipes, dict):
                    parts_out["c_diffusers"], pipes = pipes, None
                else:
                    requests = draw_requests(2 * s.adapters, s.adapters, s.zipf_s, seed=7)
                    parts_out["c_diffusers"] = self.attempt(
                        "(c)", diffusers_part, pipes, requests, run, s, budget, self.log
                    )
        if pipes is None:
            correctness["served_vs_diffusers"] = {"skipped": "diffusers' pipelines were not built"}
        else:
            self.log("(f) served vs diffusers")
            check = [Request(0, "check: a lighthouse", 0, seed=11), Request(1, "check: a red fox", 3, seed=12)]
            correctness["served_vs_diffusers"] = self.attempt(
                "(f) served vs diffusers", served_vs_diffusers, engine, pipes, check, run
            )
        if engine.residency is not None:
            engine.residency.close()

    def sdxl_part(self) -> dict:
        s, run = self.s, self.s.sdxl
        budget = self.budget("sdxl")
        if budget is None:
            return {"skipped": "out of time"}
        self.log(f"(d) SDXL, {budget.seconds:.0f} s")
        _, _, plain, _, engine = self.prepare(run, "sdxl", with_diffusers=False)
        out: dict = {"residency": self.attempt("(d) residency", residency_timings, engine, s.adapters)}
        self.rewarm(engine, "sdxl")
        step_budget = Budget(budget.seconds * 0.4)
        with self.measured("sdxl_step"):
            out["step"] = self.attempt("(d) step", step_part, plain, engine, run, s, step_budget, self.log)
        del plain
        with self.measured("sdxl_engine"):
            out["engine"] = self.attempt("(d) engine", self.engine_levels, engine, run, budget, seed=100)
        if engine.residency is not None:
            engine.residency.close()
        return out

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def engine_graphs_vs_eager(engine: ServedEngine) -> dict:
    """With the engine's own CUDA graphs: the same requests through a graph-replaying and an eager scheduler."""
    from .models import draw_requests as draw

    check = draw(4, engine.s.adapters, engine.s.zipf_s, seed=13, prefix="graphs: ")
    graphed = engine.closed_loop(check, len(check), keep=True)
    kwargs, engine.graph_kwargs = engine.graph_kwargs, {}
    graphs_steps = engine.steps
    engine.steps = engine._step_scheduler(graphs_steps.max_rows_per_tick, engine.residency)
    try:
        eager = engine.closed_loop(check, len(check), keep=True)
    finally:
        engine.steps, engine.graph_kwargs = graphs_steps, kwargs
    graphs = engine.step_graphs
    diffs = [(graphed.latents[r.index] - eager.latents[r.index]).abs().max().item() for r in check]
    return {
        "images": len(check),
        "latents_max_abs": max(diffs),
        "graphs": len(graphs.entries),
        "captured": graphs.captured,
        "widths": sorted({shape.width for shape in graphs.entries}),
        "eager_calls": graphs.eager_calls,
    }


def imported_distributions() -> list[str]:
    """The installed distributions whose modules the run imported: what a GPU host must have (or the bundle)."""
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    tops = {name.partition(".")[0] for name in sys.modules}
    return sorted({dist for top in tops for dist in owners.get(top, [])})


def machine(device: torch.device) -> dict:
    def version(name: str) -> str | None:
        try:
            return __import__(name).__version__
        except ImportError:
            return None

    cpu = platform.processor() or platform.machine()
    return {
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({cpu})",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "peft": version("peft"),
    }


def run_suite(s: SuiteSettings, out: Path | None = None) -> dict:
    """Every part, in order; the result that ``suite.json`` holds (and, as it goes, ``suite.partial.json``)."""
    suite = Suite(s, out)
    suite.log(f"lorafleet GPU suite ({'CPU smoke' if s.smoke else 'CUDA'}); {suite.graph_support}")
    parts = suite.parts
    suite.attempt("SD1.5 parts", suite.sd_parts, parts)
    for key, reason in (("a_step", "not run"), ("b_engine", "not run"), ("c_diffusers", "not run")):
        parts.setdefault(key, {"error": reason})
    parts.setdefault("f_correctness", {"error": "not run"})
    suite.free()
    parts["d_sdxl"] = suite.attempt("(d)", suite.sdxl_part)
    suite.free()
    budget = suite.budget("ip_adapter")
    if budget is None:
        parts["h_ip_adapter"] = {"skipped": "out of time"}
    else:
        suite.log(f"(h) IP-Adapter rows and the image encoder, {budget.seconds:.0f} s")
        parts["h_ip_adapter"] = suite.attempt("(h)", ip_adapter_part, s.sd, s, suite.device, suite.dtype, budget)
        for t in parts["h_ip_adapter"].get("mixed", {}).get("ticks", []):
            suite.log(f"  {t['image_rows']} image rows of 16: {t['tick_ms']:.2f} ms ({t['vs_0_image_rows']:.3f}x)")
        suite.free()
    budget = suite.budget("compile")
    if budget is None:
        parts["g_compile"] = {"skipped": "out of time"}
    else:
        suite.log(f"(g) regional compile, {budget.seconds:.0f} s")
        parts["g_compile"] = suite.attempt("(g)", compile_part, s.sd, s, suite.device, suite.dtype, budget)
        g = parts["g_compile"]
        if "compile_s" in g:
            suite.log(
                f"  compile {g['compile_s']:.1f} s ({g['backend']}), eager {g['eager_ms']:.2f} ms, compiled "
                f"{g.get('compiled_ms', float('nan')):.2f} ms, "
                f"recompiled on new adapters: {g.get('recompiled_on_new_adapters')}"
            )
        suite.free()
    parts["e_memory"] = dict(suite.memory)
    result = {
        "settings": asdict(s),
        "machine": machine(suite.device),
        "graph_support": suite.graph_support,
        "parts": parts,
        "wall_s": time.perf_counter() - suite.start,
        "ray_imported": "ray" in sys.modules,
        "imported_distributions": imported_distributions(),
    }
    result["targets"] = targets(result)
    suite.log(f"done in {result['wall_s']:.1f} s")
    return result


def quiet() -> None:
    """diffusers' and transformers' per-call notices (a CPU generator for CUDA latents, peft's re-adds)."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="lorafleet's prepared GPU suite (#19): JSON and Markdown into --out")
    p.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or DEFAULT_OUT), help=f"default $OUT or {DEFAULT_OUT}"
    )
    p.add_argument("--smoke", action="store_true", help="the whole suite on the CPU with the tiny builtin models")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke (make gpu-suite SMOKE=1) to check the suite on the CPU")
    if args.smoke:
        torch.set_num_threads(1)  # a shared CPU's other load makes multi-threaded OpenMP spin and stall
    quiet()
    s = SuiteSettings.smoke_run() if args.smoke else SuiteSettings.full()
    result = run_suite(s, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "suite.json").write_text(json.dumps(result, indent=2, default=str))
    report = markdown(result)
    (args.out / "suite.md").write_text(report)
    print()
    print(report, flush=True)
    print(f"wrote {args.out / 'suite.json'} and {args.out / 'suite.md'}", flush=True)
