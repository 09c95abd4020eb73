"""Data-parallel training on a Ray cluster: Ray Train's ``TorchTrainer``, one worker per GPU (or CPU workers).

Every worker runs the same ``Trainer`` on its slice of each step's batch
(``data.sample_ids``: worker ``r`` of ``N`` takes the ``r``-th ``batch_size``
samples of the step), and ``ray.train.torch.prepare_model`` wraps the trained
modules in DDP, which averages the gradients (NCCL on GPUs, gloo on CPUs). So
N workers with ``batch_size`` b train what one process with ``N * b`` trains.

The driver decodes and checks the data (``plan.prepare``) and puts the pixels
in Ray's object store; workers load the base model themselves (each node's
model cache). Rank 0 writes checkpoints in the single-process format and hands
them to ``ray.train.report``, which stores them under
``<output-dir>/checkpoints/step-N`` (``RunConfig(storage_path=<output-dir>,
name="checkpoints")``): on a multi-node cluster ``--output-dir`` must be on
storage every node sees (NFS, a shared volume). Rerunning the same command
resumes from the newest checkpoint; ``max_failures`` lets Ray Train restart a
failed worker group from it without a rerun.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from .checkpoints import CHECKPOINTS_DIR, checkpoint_name, read_checkpoint, remove_staging
from .config import TrainingConfig


def _prepare_model(module, *, find_unused_parameters: bool):
    """``ray.train.torch.prepare_model`` (DDP); SDXL's first text encoder has a layer whose LoRA gets no gradient."""
    import ray.train.torch

    return ray.train.torch.prepare_model(
        module, parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters}
    )


def _train_worker(loop_config: dict) -> None:
    """``train_loop_per_worker``: runs on each Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm

    from .plan import resolve_base_model
    from .trainer import Trainer

    config = TrainingConfig(**loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    trainer = Trainer(
        config,
        resolve_base_model(config.base_model, config.cache_dir),
        ray.get(loop_config["dataset"]),
        loop_config["record"],
        device=ray.train.torch.get_device(),
        rank=rank,
        world_size=world_size,
        wrap=_prepare_model,
    )
    # A restart after a worker failure gets Ray's latest checkpoint; a rerun gets the one the driver found.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.restore(Path(directory))
    elif loop_config["resume_from"] is not None:
        trainer.restore(Path(loop_config["resume_from"]))

    def report(loss: float | None) -> None:
        # Every worker reports (it is a barrier); only rank 0 attaches the checkpoint.
        metrics = {"step": trainer.step, "loss": loss}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            trainer.write_checkpoint(Path(directory))
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=checkpoint_name(trainer.step),
            )

    bar = tqdm(desc="train", total=config.steps, unit="step") if rank == 0 and loop_config["progress"] else None
    if bar is not None:
        bar.n = trainer.step
    if trainer.step == config.steps:  # nothing left to do: report the final state so the result has it
        report(trainer.losses[-1] if trainer.losses else None)
    while trainer.step < config.steps:
        loss = trainer.train_step()
        if bar is not None:
            bar.set_description(f"train loss {loss:.4f}")
            bar.update(1)
        if trainer.step % config.checkpoint_every == 0 or trainer.step == config.steps:
            report(loss)
    if bar is not None:
        bar.close()


def run_distributed(
    plan,
    *,
    address: str | None = None,
    cpus_per_worker: float = 1.0,
    use_gpu: bool | None = None,
    max_failures: int = 0,
    progress: bool = True,
) -> Path:
    """Train with ``plan.config.num_workers`` Ray Train workers; returns the final checkpoint's directory.

    Connects to ``address`` (or ``$RAY_ADDRESS``, as inside a Ray job) if given; otherwise starts a
    local Ray instance on 127.0.0.1 for the run and stops it afterwards. ``use_gpu=None``: one GPU
    per worker if the cluster has GPUs.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = plan.config
    own_instance = not ray.is_initialized()
    if own_instance:
        if address is None and not os.environ.get("RAY_ADDRESS"):
            cpus = max(os.cpu_count() or 1, math.ceil(config.num_workers * cpus_per_worker))
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=cpus)
        else:
            ray.init(address=address)
    try:
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        remove_staging(plan.checkpoint_root)
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "config": config.model_dump(),
                "dataset": ray.put(plan.dataset),
                "record": plan.record,
                "resume_from": None if plan.resume_from is None else str(plan.resume_from.resolve()),
                "progress": progress,
            },
            scaling_config=ScalingConfig(
                num_workers=config.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
            ),
            run_config=RunConfig(
                name=CHECKPOINTS_DIR,
                storage_path=str(plan.output_dir.resolve()),
                checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoints_to_keep),
                failure_config=FailureConfig(max_failures=max_failures),
            ),
        )
        result = trainer.fit()
    finally:
        if own_instance:
            ray.shutdown()
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without reporting a checkpoint")
    final = Path(result.checkpoint.path)
    state = read_checkpoint(final)
    if state is None or state["step"] != config.steps:
        raise RuntimeError(f"Ray Train finished without a complete final checkpoint ({final})")
    return final
