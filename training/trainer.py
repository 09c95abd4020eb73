"""The training loop: plain PyTorch, no Ray (``distributed`` runs the same ``Trainer`` on each worker).

One step, as in diffusers' ``train_text_to_image_lora.py`` (SDXL: ``train_text_to_image_lora_sdxl.py``)::

    z_0  = (mean + std * n) * scaling_factor         VAE posterior sample of the image (frozen VAE)
    x_t  = sqrt(abar_t) * z_0 + sqrt(1 - abar_t) * eps      t ~ U{0, T-1}, eps ~ N(0, I)  (DDPMScheduler)
    loss = || unet(x_t, t, cond(caption)) - eps ||^2      (v-prediction models: target get_velocity)

``cond`` is the model kind's conditioning (``conditioning.py``): CLIP's last
hidden state for SD 1.x/2.x; for SDXL both encoders' penultimate states, the
second's pooled embedding and the image's size and crop as time ids.

AdamW updates the LoRA weights only. Every random draw for a sample (flip,
posterior noise, eps, t) comes from a generator seeded by (seed, sample id),
and sample ids are a function of the step (``data.sample_ids``), so a run
resumed from a checkpoint, or spread over N workers, computes what one
uninterrupted process computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from deployments.engine import models

from . import checkpoints
from .checkpoints import compatible, restore_checkpoint
from .conditioning import strategy_for
from .config import TrainingConfig, TrainingInputError
from .data import CaptionedImages, derive_seed, sample_ids
from .lora import LoRAModel

StepCallback = Callable[[int, float], None]  # (steps done, loss of that step)


class Trainer:
    """One process's share of a training run: the model, the optimizer and the step counter.

    ``wrap(module, find_unused_parameters=...)`` wraps each trained module for data parallelism
    (``ray.train.torch.prepare_model``: DDP, which averages gradients across the ``world_size``
    workers); ``find_unused_parameters`` is true for a text encoder whose last layer the
    conditioning does not read (SDXL's first).
    """

    def __init__(
        self,
        config: TrainingConfig,
        model_dir: Path,
        dataset: CaptionedImages,
        record: dict,
        *,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        wrap: Callable[..., torch.nn.Module] | None = None,
    ):
        from diffusers import DDPMScheduler

        self.config = config
        self.dataset = dataset
        self.record = record
        self.device = device
        self.rank, self.world_size = rank, world_size
        info = models.read_model_info(config.base_model, model_dir)
        self.model = LoRAModel(model_dir, config, device, kind=info.kind)
        self.noise_scheduler = DDPMScheduler.from_config(info.scheduler_config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        vae_config = self.model.vae.config
        self.scaling_factor = vae_config.scaling_factor
        self.shift_factor = vae_config.get("shift_factor")
        self.params = self.model.parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        strategy = strategy_for(info.kind)
        self.unet = wrap(self.model.unet, find_unused_parameters=False) if wrap else self.model.unet
        text_encoders = dict(self.model.text_encoders)
        if wrap and config.train_text_encoder:
            text_encoders = {
                part: wrap(encoder, find_unused_parameters=part in strategy.PARTLY_USED)
                for part, encoder in text_encoders.items()
            }
        self.text_encoders = text_encoders  # DDP-wrapped when trained under Ray Train
        self.conditioning = strategy(
            self.model.tokenizers, text_encoders, trainable=config.train_text_encoder, device=device
        )
        self.step = 0  # optimizer steps done
        self.losses: list[float] = []  # per step, averaged over the workers

    # -- one step ------------------------------------------------------------------------------

    def loss(self, ids: list[int]) -> torch.Tensor:
        """The denoising loss of the samples with these global ids (gradients flow into the LoRA weights)."""
        seed = self.config.seed
        index = [self.dataset.index(i, seed) for i in ids]
        generators = [torch.Generator().manual_seed(derive_seed(seed, "sample", i)) for i in ids]
        pixels = self.dataset.pixels[index].float().div(127.5).sub(1)  # [b, 3, H, W] in [-1, 1]
        if self.config.random_flip:
            flip = [bool(torch.rand((), generator=g) < 0.5) for g in generators]
            pixels = torch.stack([p.flip(-1) if f else p for p, f in zip(pixels, flip, strict=True)])
        with torch.no_grad():
            posterior = self.model.vae.encode(pixels.to(self.device)).latent_dist
        shape = posterior.mean.shape[1:]  # [c, h, w]

        def normal() -> torch.Tensor:  # one draw per sample, from that sample's generator, on the CPU
            return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)

        z_0 = posterior.mean + posterior.std * normal()
        if self.shift_factor is not None:
            z_0 = z_0 - self.shift_factor
        z_0 = z_0 * self.scaling_factor  # [b, c, h, w]
        eps = normal()
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        t = torch.stack([torch.randint(0, num_timesteps, (), generator=g) for g in generators]).to(self.device)
        x_t = self.noise_scheduler.add_noise(z_0, eps, t)
        geometry = [self.dataset.geometry[i] for i in index] if self.dataset.geometry else []
        cond = self.conditioning([self.dataset.captions[i] for i in index], geometry, self.dataset.resolution)
        pred = self.unet(
            x_t, t, encoder_hidden_states=cond.encoder_hidden_states, added_cond_kwargs=cond.added_cond_kwargs,
            return_dict=False,
        )[0]  # fmt: skip
        target = eps if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(z_0, eps, t)
        return F.mse_loss(pred.float(), target.float())

    def train_step(self) -> float:
        """One optimizer step on this worker's share of the step's samples; returns the loss averaged over all."""
        cfg = self.config
        passes = cfg.gradient_accumulation_steps
        total = torch.zeros((), device=self.device)
        for micro in range(passes):
            ids = sample_ids(self.step, self.rank, self.world_size, cfg.batch_size, passes, micro)
            # DDP averages gradients across workers in the last pass's backward only.
            with self._no_sync() if micro < passes - 1 else contextlib.nullcontext():
                loss = self.loss(ids) / passes
                loss.backward()
            total += loss.detach()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world_size > 1:
            torch.distributed.all_reduce(total)
            total = total / self.world_size
        self.step += 1
        self.losses.append(float(total))
        return self.losses[-1]

    def _no_sync(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for module in (self.unet, *self.text_encoders.values()):
            if isinstance(module, torch.nn.parallel.DistributedDataParallel):
                stack.enter_context(module.no_sync())
        return stack

    @torch.no_grad()
    def evaluate(self, ids: list[int]) -> float:
        """The loss on fixed samples (same noise and timesteps every call), without a step."""
        return float(self.loss(ids))

    # -- checkpoints ---------------------------------------------------------------------------

    def write_checkpoint(self, directory: Path) -> None:
        checkpoints.write_checkpoint(
            directory, self.model, self.optimizer, step=self.step, losses=self.losses, record=self.record
        )

    def restore(self, directory: Path) -> None:
        """Continue from a checkpoint of a run with the same settings, base model and data."""
        state = restore_checkpoint(directory, self.model, self.optimizer)
        problems = compatible(self.record, state["record"])
        if problems:
            raise TrainingInputError(f"checkpoint {directory} is from a different run: {'; '.join(problems)}")
        self.step = state["step"]
        self.losses = list(state["losses"])
