"""Precision and kernel settings (#19 item 2) that the CPU can check: TF32 only for float32 on CUDA and not in
deterministic mode, channels_last only on CUDA, attention through PyTorch's SDPA where the batch-invariant
kernels are off, the VAE kept in float32 where its config says ``force_upcast``."""

import torch

from deployments.engine import models
from deployments.engine.config import ModelConfig
from deployments.engine.runtime import Runtime, prepare_runtime, resolve_tf32

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_tf32_is_for_float32_on_cuda_and_auto_leaves_it_off_in_deterministic_mode():
    assert resolve_tf32("auto", CUDA, torch.float32, deterministic=False) is True
    assert resolve_tf32("auto", CUDA, torch.float32, deterministic=True) is False
    assert resolve_tf32("on", CUDA, torch.float32, deterministic=True) is True
    assert resolve_tf32("off", CUDA, torch.float32, deterministic=False) is False
    assert resolve_tf32("on", CUDA, torch.float16, deterministic=False) is False  # half precision: nothing to do
    assert resolve_tf32("on", CPU, torch.float32, deterministic=False) is False


def test_the_cpu_runtime_changes_no_global_precision_setting(cache_dir, tiny_dir):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    rt = prepare_runtime(ModelConfig(uri="builtin:tiny-sd", cache_dir=str(cache_dir), tf32="on", channels_last=True))
    assert (rt.device.type, rt.tf32) == ("cpu", False)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_channels_last_applies_on_cuda_only(tiny):
    conv = torch.nn.Conv2d(4, 4, 3)
    rt = Runtime(info=tiny["info"], device=CPU, dtype=torch.float32, deterministic=False, channels_last=True)
    out = rt.prepare(conv)
    assert out is conv and conv.weight.is_contiguous()  # unchanged on the CPU


def test_attention_runs_through_sdpa_when_not_batch_invariant(tiny_dir):
    unet = models.load_unet(tiny_dir, CPU, torch.float32)
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_a_force_upcast_vae_stays_float32_on_a_half_precision_server(tiny_sdxl_dir):
    vae = models.load_vae(tiny_sdxl_dir, CPU, torch.float16)
    assert vae.config.force_upcast and next(vae.parameters()).dtype == torch.float32
