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

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Apply batch-invariant kernels where configured (see ``batch_invariance``)."""
        return make_batch_invariant(module) if self.deterministic else module


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
    return Runtime(info=info, device=device, dtype=dtype, deterministic=deterministic)
