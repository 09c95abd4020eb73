"""The settings of one training run, typed and checked before anything is loaded.

>>> TrainingConfig(data_dir="styles/red", output_dir="runs/red", rank=4, steps=200)   # doctest: +SKIP

``settings()`` is the part that decides the trained weights: it is recorded
with every checkpoint (a resumed run must match it), in ``training.json`` and
in the registered adapter's description.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# diffusers' train_text_to_image_lora.py adapts the UNet's attention projections.
DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class TrainingInputError(ValueError):
    """Bad training input (data, model, settings, registry), found before the first training step.

    The message names the file, setting or adapter at fault.
    """


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: str = Field(description="Folder of images with captions (.txt beside each image, or metadata.jsonl).")
    output_dir: str = Field(description="Checkpoints, the trained adapter and training.json go here.")
    base_model: str = Field("builtin:tiny-sd", description="Diffusers model URI: a directory, s3://..., builtin:...")
    cache_dir: str | None = Field(None, description="Model cache for s3:// and builtin: models.")
    rank: int = Field(4, ge=1, le=1024, description="LoRA rank r.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (scale alpha / r); default: the rank (scale 1).")
    target_modules: tuple[str, ...] = Field(
        DEFAULT_UNET_TARGETS, min_length=1, description="UNet module names (path suffixes) that get a LoRA."
    )
    train_text_encoder: bool = Field(False, description="Also train a LoRA on the text encoder.")
    text_encoder_target_modules: tuple[str, ...] = Field(
        DEFAULT_TEXT_ENCODER_TARGETS, min_length=1, description="Text-encoder module names, with train_text_encoder."
    )
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate (constant).")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; None: no clipping.")
    steps: int = Field(1000, ge=1, description="Optimizer steps in all (a resumed run counts its earlier steps).")
    batch_size: int = Field(1, ge=1, description="Images per forward pass on each worker.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Forward/backward passes per optimizer step (effective batch: this x batch x workers)."
    )
    resolution: int | None = Field(
        None, ge=8, description="Side of the square training images in pixels; default: the model's native size."
    )
    random_flip: bool = Field(False, description="Flip images horizontally at random.")
    seed: int = Field(0, ge=0, description="Seeds LoRA init, data order, noise and timesteps.")
    checkpoint_every: int = Field(500, ge=1, description="Save a checkpoint every this many steps (and at the end).")
    checkpoints_to_keep: int = Field(3, ge=1, description="Most recent checkpoints kept on disk.")
    num_workers: int = Field(0, ge=0, le=4096, description="0: train in this process; N: Ray Train, N workers.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Single-process device; auto = CUDA if any.")

    @field_validator("target_modules", "text_encoder_target_modules")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [name for name in value if not name or name != name.strip() or name.startswith(".")]
        if bad:
            raise ValueError(f"module names must be non-empty path suffixes such as 'to_q' or 'to_out.0', got {bad}")
        return tuple(dict.fromkeys(value))

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE's downsampling), got {value}")
        return value

    @property
    def lora_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else self.alpha

    @property
    def world_size(self) -> int:
        return max(1, self.num_workers)

    def settings(self, *, resolution: int) -> dict:
        """What decides the trained weights (besides the base model and the data); ``resolution`` resolved."""
        return {
            "rank": self.rank,
            "alpha": self.lora_alpha,
            "target_modules": list(self.target_modules),
            "text_encoder_target_modules": list(self.text_encoder_target_modules) if self.train_text_encoder else [],
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
            "batch_size": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "world_size": self.world_size,
            "resolution": resolution,
            "random_flip": self.random_flip,
            "seed": self.seed,
        }


def config_error(e: Exception) -> TrainingInputError:
    """A pydantic ``ValidationError`` as one line per field: ``rank: Input should be greater than or equal to 1``."""
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        lines = [f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors()]
        return TrainingInputError("; ".join(lines))
    return TrainingInputError(str(e))
