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
