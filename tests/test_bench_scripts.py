"""The benchmark scripts at tiny settings: their correctness checks hold (the timed runs are not tests)."""

import pytest

from benchmarks import bench_multi_lora as bench

# Two adapters in one batch: style1 (UNet and text encoder(s)) and style0 (UNet only). Two requests keep
# the test short: diffusers runs each alone, with and without its adapter, on batch-invariant kernels.
REQUESTS = [
    bench.Request(0, "a lighthouse, picture 0", 1, seed=0),
    bench.Request(1, "a red fox, picture 1", 0, seed=1),
]


@pytest.mark.parametrize("model", ["builtin:tiny-sd", "builtin:tiny-sdxl"])
def test_multi_lora_engine_equals_diffusers_and_peft(model, cache_dir, tmp_path):
    model_dir, info, spec, te2 = bench.open_model(model, cache_dir)
    _, guidance_scale = bench.MODELS[model]
    s = bench.Settings(
        model=model,
        images=len(REQUESTS),
        clients=len(REQUESTS),
        size=64,
        steps=2,
        guidance_scale=guidance_scale,
        rank=4,
        alpha=4.0,
        num_adapters=2,
        zipf_s=1.1,
        no_adapter_share=0.0,
        seed=0,
        text_encoder_2=te2,
    )
    adapters, canonical = bench.build_adapters(model_dir, info, spec, tmp_path, s)
    assert adapters[1].text_components == (("text_encoder", "text_encoder_2") if te2 else ("text_encoder",))
    assert adapters[0].text_components == ()
    fleet = bench.LoraFleetEngine(bench.load_parts(model_dir, info.sdxl), info, canonical, s, deterministic=True)
    assert all(routed == {1} for routed in fleet.text_adapters.values())  # every encoder's slots hold style1
    assert set(fleet.text_adapters) == ({"text_encoder", "text_encoder_2"} if info.sdxl else {"text_encoder"})
    images, _ = fleet.serve(REQUESTS, s.clients)
    scheduler = fleet.steps.schedulers.create("default")
    scheduler.set_timesteps(s.steps)
    assert fleet.steps.ticks_run == len(scheduler.timesteps)  # the requests shared every UNet forward

    pipe = bench.make_pipeline(bench.load_parts(model_dir, info.sdxl), info, adapters)
    counter = bench.MixedBatchCounter()
    with counter.watching():
        check = bench.check_equivalence(pipe, adapters, REQUESTS, s, images)
    assert counter.calls > 0  # (b) really took peft's mixed-batch path
    assert check["lorafleet_vs_diffusers"] <= 1e-4
    assert check["peft_mixed_vs_diffusers"] <= 1e-4
    assert check["adapter_effect"] > 1e-2  # the adapters move pixels: a wrong one could not pass


def test_gpu_bench_sdxl_config_is_sdxl_base():
    """The GPU suite's SDXL UNet is SDXL base's architecture (counted on the meta device: no memory, no time)."""
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks import bench_multi_lora_gpu as gpu

    with torch.device("meta"):
        unet = UNet2DConditionModel(**gpu.SDXL_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # stable-diffusion-xl-base-1.0's UNet
    assert unet.config.addition_embed_type == "text_time"


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_gpu_bench_smoke(model):
    """``bench_multi_lora_gpu.py --smoke``'s run on the CPU: the mixed step equals the sub-batches."""
    import torch

    from benchmarks import bench_multi_lora_gpu as gpu

    threads = torch.get_num_threads()
    try:
        s, unet_config = gpu.settings_for(model, smoke=True)
        res = gpu.run(s, unet_config)
    finally:
        torch.set_num_threads(threads)  # --smoke runs on one thread; the other tests keep theirs
    assert res["finite"]
    assert res["lora_layers"] > 0
    assert res["adapter_effect_max_abs"] > 1e-2
    # Batched and two-row CPU kernels round differently (up to ~3e-4 on the SD1.5-shaped UNet), so not 0;
    # a wrong adapter on any row would differ by about the adapters' effect.
    assert res["fleet_vs_subbatch_max_abs"] <= 0.01 * res["adapter_effect_max_abs"]


# -- #19: the prepared GPU suite --------------------------------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
# What the GPU host has (torch, transformers, peft, safetensors and their requirements), found in this venv.
GPU_HOST_ROOTS = ("torch", "transformers", "peft", "safetensors")


def _requirement_closure(roots) -> set[str]:
    """Distribution names (normalised) of ``roots`` and everything they require (extras aside)."""
    import importlib.metadata as md
    import re

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    seen: set[str] = set()
    stack = [norm(r) for r in roots]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue
        for req in requires:
            if ";" in req and "extra" in req.split(";", 1)[1]:
                continue
            stack.append(norm(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]))
    return seen


def _bundle() -> set[str]:
    """The wheels `make gpu-wheels` downloads (the Makefile's GPU_WHEEL_NAMES, at the lock's versions), normalised."""
    import re

    text = (ROOT / "Makefile").read_text()
    block = text.split("GPU_WHEEL_NAMES :=", 1)[1].split("\nlocked", 1)[0]
    return {re.sub(r"[-_.]+", "-", name).lower() for name in block.replace("\\", " ").split()}


def _gpu_host_site(directory):
    """A site directory with only what the GPU host has and the bundle brings: links to those distributions'
    files in this venv. A run on it with ``python -S`` sees no other installed package, as on that host."""
    import importlib.metadata as md
    import re

    allowed = _requirement_closure(GPU_HOST_ROOTS) | _bundle()
    directory.mkdir()
    for dist in md.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if name not in allowed or name == "lorafleet":
            continue
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            source, link = dist.locate_file(top), directory / top
            if source.exists() and not link.exists():
                link.symlink_to(source)
    return directory


def _on_gpu_host_site(site, code: str) -> list[str]:
    """``python -S`` with ``site`` and the repository on the path, nothing else installed: ``code``'s argv."""
    import sys

    prelude = f"import sys; sys.path[:0] = [{str(site)!r}, {str(ROOT)!r}]; "
    return [sys.executable, "-S", "-c", prelude + code]


def test_gpu_suite_imports_no_ray(tmp_path):
    """Every module of the suite imports on a site with only the GPU host's packages and the bundle, without Ray."""
    import subprocess

    site = _gpu_host_site(tmp_path / "site")
    code = "import benchmarks.gpu_suite.run; print('RAY' if 'ray' in sys.modules else 'NO-RAY')"
    proc = subprocess.run(_on_gpu_host_site(site, code), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "NO-RAY"
    assert {"diffusers", "pydantic", "pillow"} <= _bundle()  # the CLIP vocabulary is lorafleet's own package data


def test_gpu_suite_smoke(cache_dir, tmp_path):
    """`make gpu-suite SMOKE=1`'s run: every part (a)-(f) has figures, or an explicit reason where it needs CUDA."""
    import json
    import os
    import subprocess

    out = tmp_path / "suite"
    env = {**os.environ, "LORAFLEET_CACHE_DIR": str(cache_dir), "OUT": str(out)}
    # On a site with only the GPU host's packages and the bundle: the bundle is complete if this runs.
    site = _gpu_host_site(tmp_path / "site")
    code = "from benchmarks.gpu_suite.run import main; main(['--smoke'])"
    proc = subprocess.run(_on_gpu_host_site(site, code), cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((out / "suite.json").read_text())
    parts = result["parts"]
    assert set(parts) == {
        "a_step",
        "b_engine",
        "c_diffusers",
        "d_sdxl",
        "e_memory",
        "f_correctness",
        "g_compile",
        "h_ip_adapter",
    }
    assert not [k for k, v in parts.items() if "error" in v], {k: v.get("error") for k, v in parts.items()}

    def positive(x) -> bool:
        return isinstance(x, int | float) and x > 0

    # (a) and (d): every row count timed for the base step and both kernels; the adapters change the step's
    # output (a mixed step that ignored its routing would equal the base); graphs skipped with a reason on the CPU.
    for step, rows in ((parts["a_step"], {"2", "16", "32", "64"}), (parts["d_sdxl"]["step"], {"2", "16"})):
        assert set(step["rows"]) == rows
        assert step["graph"] == "CUDA graphs need a CUDA device"
        for r in step["rows"].values():
            assert all(positive(r[k]) for k in ("base_ms", "mixed_grouped_ms", "mixed_gather_ms", "mixed_served_ms"))
            assert r["adapter_effect_max_abs"] > 1e-3
    # (b) and (d): closed loops at each level, every image served; residency timed for the 8 adapters.
    for engine, levels in ((parts["b_engine"], [1, 8, 32]), (parts["d_sdxl"]["engine"], [1, 4])):
        assert [lv["concurrency"] for lv in engine["levels"]] == levels
        for lv in engine["levels"]:
            assert lv["images"] >= lv["concurrency"] and lv["failed"] == 0
            assert positive(lv["images_per_s"]) and 0 < lv["p50_s"] <= lv["p95_s"]
            assert lv["mean_rows_per_tick"] <= 2 * lv["concurrency"]
    residency = parts["b_engine"]["residency"]
    assert residency["adapters"] == 8 and len(residency["each_ms"]) == 8 and positive(residency["median_ms"])
    # (c): three diffusers systems, and peft's mixed batch really took the mixed path.
    diff = parts["c_diffusers"]
    assert set(diff) == {"one_per_call_lora", "batch_8_no_lora", "peft_mixed_8"}
    assert all(positive(d["images_per_s"]) and d["images"] >= 1 for d in diff.values())
    assert diff["peft_mixed_8"]["mixed_batch_forward_calls"] > 0
    # (e): slot memory computed everywhere; CUDA figures skipped with a reason.
    memory = parts["e_memory"]
    assert positive(memory["sd_slot_pages_bytes"]) and positive(memory["sdxl_rank16_adapter_bytes"])
    assert memory["cuda"] == "CPU run: no CUDA allocator to measure"
    # (f): served images equal diffusers' (fp32 on the CPU) far above what a missed adapter would give.
    f = parts["f_correctness"]
    assert f["graph_vs_eager"] == {"skipped": "CUDA graphs need a CUDA device"}
    served = f["served_vs_diffusers"]
    assert served["min_psnr_db"] >= 60
    assert served["max_psnr_vs_no_adapter_db"] < served["min_psnr_db"] - 20
    # (g): regional compile (the eager backend on the CPU) ran, and another adapter mix did not recompile.
    g = parts["g_compile"]
    assert g["backend"] == "eager" and positive(g["compile_s"]) and g["compiled_graphs"] > 0
    assert g["recompiled_on_new_adapters"] is False and g["compiled_vs_eager_max_abs"] == 0
    # (h): IP-Adapter's image rows: rows without an image equal IP-Adapter off exactly, image rows move; the
    # encoder's cache hit hands back the miss's embeddings.
    h = parts["h_ip_adapter"]
    assert [t["image_rows"] for t in h["mixed"]["ticks"]] == ["off", 0, 4, 8, 16]
    assert h["mixed"]["plain_rows_identical"] is True and h["mixed"]["image_rows_moved"] is True
    assert h["encoder"]["encoder"] == "tiny" and all(r["hit_is_the_miss"] for r in h["encoder"]["results"])
    assert {(r["rowwise"], r["batch"]) for r in h["encoder"]["results"]} >= {(False, 1), (True, 1)}
    # The targets: all four measured, each with a verdict; no Ray, nothing the GPU host lacks.
    assert len(result["targets"]) == 4
    assert all(isinstance(t["measured"], float) and isinstance(t["pass"], bool) for t in result["targets"])
    assert result["ray_imported"] is False
    report = (out / "suite.md").read_text()
    assert "| target | measured | verdict | how |" in report and report.count("PASS") + report.count("MISS") == 4


def test_ip_adapter_bench_smoke(cache_dir, monkeypatch):
    """``bench_ip_adapter.py`` at tiny settings (issue 22): rows without an image are bit-identical to the batch on
    the UNet without IP-Adapter, image rows move; the encoder's cache hits return the misses' embeddings."""
    from benchmarks import bench_ip_adapter as bench

    monkeypatch.setenv("LORAFLEET_CACHE_DIR", str(cache_dir))
    res = bench.run_mixed("builtin:tiny-sd", rows=4, image_rows=[0, 2, 4], size=64, warmup=1, ticks=1, rounds=1)
    assert [r["image_rows"] for r in res["results"]] == ["off", 0, 2, 4]
    assert all(r["plain_rows_identical"] and r["image_rows_moved"] for r in res["results"])
    assert res["results"][1]["ratio"] == 1.0 and all(r["tick_ms"] > 0 for r in res["results"])
    assert res["ip_tokens"] == 4 and res["ip_layers"] > 0
    enc = bench.run_encoder("tiny", batches=[1, 2], reps=1, side=64)
    assert [r["batch"] for r in enc["results"]] == [1, 2]
    assert all(r["hit_returns_the_miss_embeddings"] for r in enc["results"])
    assert (enc["cache_hits"], enc["encoded"]) == (3, 4)  # 1 warm-up + 3 new images encoded; each hit once
