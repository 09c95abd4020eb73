"""Train a LoRA style from a folder of captioned images, and register it for serving.

>>> config = TrainingConfig(data_dir="styles/red", output_dir="runs/red", rank=4, steps=500)  # doctest: +SKIP
>>> plan = prepare(config)            # every check, before any step: model, data, resolution, checkpoint
>>> trained = train(plan)             # here, or on Ray Train with config.num_workers > 0; resumes if it can
>>> registry = open_target_registry(None, plan.spec)
>>> register_adapter(registry, trained, name="red")

Sits beside ``deployments.engine`` (it loads models through
``deployments.engine.models`` and registers through ``lora_registry``);
only the ``lorafleet`` command imports it. See ``docs/training.md``.
"""

from .config import TrainingConfig, TrainingInputError
from .export import (
    TrainedAdapter,
    check_registration,
    open_target_registry,
    register_adapter,
    training_settings,
)
from .plan import TrainingPlan, prepare
from .train import train
from .trainer import Trainer

__all__ = [
    "TrainedAdapter",
    "Trainer",
    "TrainingConfig",
    "TrainingInputError",
    "TrainingPlan",
    "check_registration",
    "open_target_registry",
    "prepare",
    "register_adapter",
    "train",
    "training_settings",
]
