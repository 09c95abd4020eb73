"""``lorafleet train``'s loop: ``run_local`` trains in this process, ``train`` picks it or Ray Train.

The arithmetic of a step is ``trainer.Trainer``'s (see its module); ``distributed`` runs the same
``Trainer`` on each Ray Train worker.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from deployments.engine import models

from .checkpoints import checkpoint_name, remove_staging, save_checkpoint
from .trainer import StepCallback, Trainer

# For tests: the in-process loop sends itself SIGINT right after this step (and its checkpoint, if due),
# so an interrupt lands at a step the test chooses instead of racing the progress bar.
INTERRUPT_AT_STEP_ENV = "LORAFLEET_TRAIN_INTERRUPT_AT_STEP"


def _interrupt_at_step() -> int | None:
    """The step named by ``$LORAFLEET_TRAIN_INTERRUPT_AT_STEP``, or ``None`` when it is unset or empty."""
    value = os.environ.get(INTERRUPT_AT_STEP_ENV, "")
    if value == "":
        return None
    try:
        step = int(value)
    except ValueError as e:
        raise ValueError(f"{INTERRUPT_AT_STEP_ENV}={value!r} is not a step number") from e
    if step < 1:
        raise ValueError(f"{INTERRUPT_AT_STEP_ENV}={value!r} must be a step >= 1")
    return step


def run_local(plan, *, progress: bool = True, on_step: StepCallback | None = None) -> Path:
    """Train in this process from ``plan`` (``plan.prepare``); returns the final checkpoint's directory.

    ``on_step(step, loss)`` runs after each step (and after its checkpoint, if one is due).

    With ``$LORAFLEET_TRAIN_INTERRUPT_AT_STEP=N`` set (a test seam; unset in production), the loop
    sends this process SIGINT right after step ``N``, its checkpoint and ``on_step``: exactly what a
    Ctrl-C landing there does (Python's default handler raises ``KeyboardInterrupt``; ``lorafleet
    train`` exits 130). Only the in-process loop honours it, not Ray Train workers.
    """
    from tqdm import tqdm

    interrupt_at = _interrupt_at_step()
    config = plan.config
    device = models.resolve_device(config.device)
    trainer = Trainer(config, plan.model_dir, plan.dataset, plan.record, device=device)
    root = plan.checkpoint_root
    remove_staging(root)
    if plan.resume_from is not None:
        trainer.restore(plan.resume_from)
    final = plan.resume_from
    with tqdm(
        total=config.steps, initial=trainer.step, desc="train", unit="step", file=sys.stderr, disable=not progress
    ) as bar:
        while trainer.step < config.steps:
            loss = trainer.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if trainer.step % config.checkpoint_every == 0 or trainer.step == config.steps:
                final = save_checkpoint(root, trainer.step, trainer.write_checkpoint, config.checkpoints_to_keep)
            if on_step is not None:
                on_step(trainer.step, loss)
            if trainer.step == interrupt_at:
                signal.raise_signal(signal.SIGINT)  # the handler runs before raise_signal returns
    if final is None or final.name != checkpoint_name(config.steps):
        raise RuntimeError(f"training stopped at step {trainer.step} without a final checkpoint")
    return final


def train(
    plan,
    *,
    progress: bool = True,
    on_step: StepCallback | None = None,
    ray_address: str | None = None,
    cpus_per_worker: float = 1.0,
    use_gpu: bool | None = None,
    max_failures: int = 0,
):
    """Run a prepared plan to its last step (here, or on Ray when ``num_workers > 0``) and export the adapter.

    Returns an ``export.TrainedAdapter``; register it with ``export.register_adapter``.
    """
    from .export import export_adapter

    if plan.config.num_workers == 0:
        final = run_local(plan, progress=progress, on_step=on_step)
    else:
        if on_step is not None:
            raise ValueError("on_step is only available when training in this process (num_workers=0)")
        if _interrupt_at_step() is not None:
            raise ValueError(f"{INTERRUPT_AT_STEP_ENV} is only honoured when training in this process (num_workers=0)")
        from .distributed import run_distributed

        final = run_distributed(
            plan,
            address=ray_address,
            cpus_per_worker=cpus_per_worker,
            use_gpu=use_gpu,
            max_failures=max_failures,
            progress=progress,
        )
    return export_adapter(plan, final)
