"""What every replica does first: find the model on disk, pick device, dtype and kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import models
from .batch_invariance import make_batch_invariant
from .config import ModelConfig


@dataclass(frozen=True)
class Runtime:
    info: models.ModelInfo
    device: torch.device
    dtype: torch.dtype
    deterministic: bool
    tf32: bool = False  # TensorFloat-32 products for float32 on CUDA (set process-wide by prepare_runtime)
    channels_last: bool = False
    compile: str = "none"  # model.compile
    compile_backend: str = "inductor"

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Apply batch-invariant kernels where configured (see ``batch_invariance``), and channels_last on CUDA
        where asked."""
        if self.channels_last and self.device.type == "cuda":
            module = module.to(memory_format=torch.channels_last)
        return make_batch_invariant(module) if self.deterministic else module

    def compile_unet(self, unet: torch.nn.Module) -> torch.nn.Module:
        """``model.compile: regional``: the UNet's repeated blocks compiled in place, after the multi-LoRA layers
        wrap its projections (so the LoRA path is compiled with them). Returns ``unet``."""
        return compile_regions(unet, self.compile, self.compile_backend)


def prepare_runtime(config: ModelConfig) -> Runtime:
    device = models.resolve_device(config.device)
    dtype = models.resolve_dtype(config.dtype, device)
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    directory = models.resolve_model_dir(config.uri, config.cache_dir)
    info = models.read_model_info(config.uri, directory)
    if config.name is not None:
        info = models.ModelInfo(**{**info.__dict__, "name": config.name})
    if config.deterministic == "auto":
        deterministic = device.type == "cpu"
    else:
        deterministic = config.deterministic == "on"
    if deterministic and config.compile != "none":
        raise ValueError(
            f"model.compile: {config.compile} needs model.deterministic off (auto is on for the CPU): "
            "compiled kernels are not batch-invariant"
        )
    tf32 = resolve_tf32(config.tf32, device, dtype, deterministic)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return Runtime(
        info=info,
        device=device,
        dtype=dtype,
        deterministic=deterministic,
        tf32=tf32,
        channels_last=config.channels_last,
        compile=config.compile,
        compile_backend=config.compile_backend,
    )


def compile_regions(unet: torch.nn.Module, setting: str, backend: str = "inductor") -> torch.nn.Module:
    """``regional``: ``torch.compile`` each of the UNet's repeated transformer blocks (diffusers'
    ``compile_repeated_blocks``: one compiled code per block shape, a fraction of a whole-model compile).

    The multi-LoRA layers inside the blocks read their routing from preallocated buffers and decide their path
    from one bool (``LoRAState.active``), so a new mix of adapters is new data, not a new graph: no recompile.
    ``none``: unchanged.
    """
    if setting == "none":
        return unet
    if setting != "regional":
        raise ValueError(f"model.compile must be none or regional, got {setting!r}")
    unet.compile_repeated_blocks(backend=backend, fullgraph=True)
    return unet


def resolve_tf32(setting: str, device: torch.device, dtype: torch.dtype, deterministic: bool) -> bool:
    """``model.tf32``: TensorFloat-32 only on CUDA, only for float32 weights; ``auto`` not in deterministic mode.

    >>> cuda, cpu = torch.device("cuda"), torch.device("cpu")
    >>> resolve_tf32("auto", cuda, torch.float32, False), resolve_tf32("auto", cuda, torch.float32, True)
    (True, False)
    >>> resolve_tf32("on", cpu, torch.float32, False), resolve_tf32("on", cuda, torch.float16, False)
    (False, False)
    """
    if device.type != "cuda" or dtype != torch.float32 or setting == "off":
        return False
    return setting == "on" or not deterministic
