"""Everything checked before the first training step: model, resolution, targets, data, checkpoint.

SD 1.x/2.x and SDXL text-to-image pipelines are accepted (``PIPELINE_PARTS``); inpainting UNets are not.

``prepare(config)`` either returns a ``TrainingPlan`` or raises a
``TrainingInputError`` that names the problem; it loads no weights (module
shapes come from the configs on the meta device) but decodes every image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from deployments.engine import models
from lora_registry.base_model import BaseModelSpec, base_model_spec_from_dir, spec_modules_for

from .checkpoints import CHECKPOINTS_DIR, compatible, latest_checkpoint
from .conditioning import strategy_for
from .config import TrainingConfig, TrainingInputError
from .data import CaptionedImages, load_dataset

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class TrainingPlan:
    config: TrainingConfig
    model_dir: Path
    spec: BaseModelSpec  # the base model's LoRA-targetable modules and fingerprint
    resolution: int
    dataset: CaptionedImages
    record: dict  # base model, data and settings: stored in checkpoints, training.json and the registry
    resume_from: Path | None  # the newest complete checkpoint in output_dir, if any

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir).expanduser()

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / CHECKPOINTS_DIR


# The classes of each pipeline kind's parts (model_index.json), as diffusers' training scripts load them.
PIPELINE_PARTS = {
    "sd1": {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"},
    "sdxl": {
        "unet": "UNet2DConditionModel",
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "CLIPTextModelWithProjection",
    },
}


def resolve_base_model(uri: str, cache_dir: str | None) -> Path:
    """The base model's local diffusers directory; a ``TrainingInputError`` unless it is an SD1/SD2 or SDXL
    text-to-image pipeline."""
    try:
        model_dir = models.resolve_model_dir(uri, cache_dir)
    except (ValueError, OSError) as e:
        raise TrainingInputError(f"base model {uri!r}: {e}") from e
    index = json.loads((model_dir / "model_index.json").read_text())
    kind = "sdxl" if "text_encoder_2" in index else "sd1"
    expected = PIPELINE_PARTS[kind]
    wrong = {k: index.get(k, [None, None])[1] for k, v in expected.items() if index.get(k, [None, None])[1] != v}
    if wrong:
        raise TrainingInputError(
            f"base model {uri!r} is not a Stable Diffusion 1.x/2.x pipeline nor an SDXL one "
            f"(expected {PIPELINE_PARTS['sd1']} or {PIPELINE_PARTS['sdxl']}; found {wrong})"
        )
    try:
        info = models.read_model_info(uri, model_dir)
    except (ValueError, OSError, KeyError) as e:
        raise TrainingInputError(f"base model {uri!r}: {e}") from e
    if info.kind != kind:  # e.g. one text encoder but a UNet with SDXL's text_time conditioning
        raise TrainingInputError(
            f"base model {uri!r} is inconsistent: model_index.json describes an {kind} pipeline, "
            f"its UNet config an {info.kind} one"
        )
    if info.inpainting:
        raise TrainingInputError(
            f"base model {uri!r} is an inpainting model (UNet in_channels {info.unet_in_channels}); "
            "train on its text-to-image base"
        )
    return model_dir


def _check_targets(spec: BaseModelSpec, component: str, targets: tuple[str, ...], option: str) -> None:
    paths = spec_modules_for(spec, component)
    if not paths:  # the registry validates adapters against the spec: it could not take this component's LoRA
        raise TrainingInputError(
            f"{option}: the registry's spec of this base model has no {component} modules, so it cannot register "
            f"a {component} LoRA; train without --train-text-encoder"
        )
    missing = [t for t in targets if not any(p == t or p.endswith("." + t) for p in paths)]
    if missing:
        examples = sorted({p.rsplit(".", 1)[-1] for p in paths})[:12]
        raise TrainingInputError(
            f"{option}: {missing} match no Linear/Conv2d module of the {component} (module names end with, "
            f"e.g., {examples})"
        )


def prepare(config: TrainingConfig) -> TrainingPlan:
    model_dir = resolve_base_model(config.base_model, config.cache_dir)
    info = models.read_model_info(config.base_model, model_dir)
    unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
    prediction_type = info.scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise TrainingInputError(
            f"base model {config.base_model!r}: prediction_type {prediction_type!r} is not supported "
            f"({', '.join(SUPPORTED_PREDICTION_TYPES)})"
        )
    resolution = info.default_side if config.resolution is None else config.resolution
    # The UNet halves the latent once per down block but the last; a side it cannot halve evenly breaks the skips.
    multiple = info.vae_scale_factor * 2 ** (len(unet_config["down_block_types"]) - 1)
    if resolution % multiple:
        raise TrainingInputError(
            f"resolution {resolution} does not suit base model {config.base_model!r}: it must be a multiple of "
            f"{multiple} (VAE factor {info.vae_scale_factor} x the UNet's downsamplings)"
        )
    spec = base_model_spec_from_dir(model_dir)
    _check_targets(spec, "unet", config.target_modules, "target_modules")
    if config.train_text_encoder:
        for part in strategy_for(info.kind).TEXT_ENCODERS:
            _check_targets(spec, part, config.text_encoder_target_modules, "text_encoder_target_modules")
    dataset = load_dataset(config.data_dir, resolution)
    record = {
        "base_model": {"uri": config.base_model, "family": spec.family, "fingerprint": spec.fingerprint},
        "dataset": {"images": len(dataset), "fingerprint": dataset.fingerprint},
        "settings": config.settings(resolution=resolution),
    }
    plan = TrainingPlan(config, model_dir, spec, resolution, dataset, record, resume_from=None)
    latest = latest_checkpoint(plan.checkpoint_root)
    if latest is None:
        return plan
    directory, state = latest
    problems = compatible(record, state["record"])
    if problems:
        raise TrainingInputError(
            f"{plan.output_dir} holds checkpoints of a different run ({'; '.join(problems)}); "
            "use another --output-dir, or the same settings to resume"
        )
    if state["step"] > config.steps:
        raise TrainingInputError(
            f"the newest checkpoint ({directory.name}) is past steps={config.steps}; ask for at least {state['step']}"
        )
    return TrainingPlan(config, model_dir, spec, resolution, dataset, record, resume_from=directory)
