"""From the final checkpoint to a served style: canonical file, ``training.json``, registration.

The checkpoint's diffusers-format LoRA file goes through the registry's own
converter (``prepare_adapter``), so the canonical ``adapter.safetensors``
written here is byte for byte the blob the registry stores when the same file
is registered.

Registration records the training settings in the manifest's ``training``
field (``training_settings(manifest)`` reads them back); ``training.json``
beside the adapter keeps the full record, per-step losses included.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_registry.base_model import BaseModelSpec
from lora_registry.config import RegistryConfig, default_registry_uri, open_registry
from lora_registry.errors import InvalidAdapterError
from lora_registry.manifest import Manifest, check_metadata, check_name, check_training
from lora_registry.registry import Registry
from lora_registry.validation import DEFAULT_MAX_RANK, prepare_adapter

from .checkpoints import read_checkpoint
from .config import TrainingInputError
from .lora import LORA_FILE

ADAPTER_FILE = "adapter.safetensors"  # canonical form (lorafleet.lora/1)
RECORD_FILE = "training.json"
FINAL_LOSS_STEPS = 10  # final_loss: the mean over this many last steps


@dataclass(frozen=True)
class TrainedAdapter:
    lora_file: Path  # diffusers layout (pytorch_lora_weights.safetensors), what gets registered
    adapter_file: Path  # canonical form
    sha256: str  # of the canonical file
    record: dict  # base model, data, settings, steps, final_loss
    losses: list[float]  # per step


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary output files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_adapter(plan, checkpoint_dir: Path) -> TrainedAdapter:
    """Write ``pytorch_lora_weights.safetensors``, ``adapter.safetensors`` and ``training.json`` to the output dir."""
    state = read_checkpoint(checkpoint_dir)
    if state is None:
        raise RuntimeError(f"final checkpoint {checkpoint_dir} is incomplete")
    data = (Path(checkpoint_dir) / LORA_FILE).read_bytes()
    prepared = prepare_adapter(data, plan.spec, max_rank=max(plan.config.rank, DEFAULT_MAX_RANK))
    losses = list(state["losses"])
    tail = losses[-FINAL_LOSS_STEPS:]
    record = {
        **state["record"],
        "steps": state["step"],
        "final_loss": float(f"{sum(tail) / len(tail):.6g}"),
        "adapter": {"file": ADAPTER_FILE, "sha256": prepared.sha256, "source_sha256": prepared.source_sha256},
    }
    out = plan.output_dir
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / LORA_FILE, data)
    _write_atomic(out / ADAPTER_FILE, prepared.blob)
    _write_atomic(out / RECORD_FILE, json.dumps({**record, "losses": losses}, indent=2).encode())
    return TrainedAdapter(out / LORA_FILE, out / ADAPTER_FILE, prepared.sha256, record, losses)


def training_record(record: dict) -> dict:
    """What the registered manifest's ``training`` field keeps: settings, data, steps, final loss."""
    return {
        "base_model": record["base_model"]["uri"],
        "base_fingerprint": record["base_model"]["fingerprint"],
        "images": record["dataset"]["images"],
        "dataset_fingerprint": record["dataset"]["fingerprint"][:16],
        "steps": record.get("steps"),
        "final_loss": record.get("final_loss"),
        **record["settings"],
    }


def training_settings(manifest: Manifest) -> dict | None:
    """The training record of a registered adapter (its manifest's ``training``); ``None`` if not trained here."""
    return manifest.training


def open_target_registry(uri: str | None, spec: BaseModelSpec, s3_endpoint_url: str | None = None) -> Registry:
    """The registry at ``uri`` (default ``$LORAFLEET_REGISTRY``), validating against ``spec``; no caches."""
    config = RegistryConfig(uri=uri or default_registry_uri(), s3_endpoint_url=s3_endpoint_url)
    return open_registry(config, base=spec, caches=False)


def check_registration(
    registry: Registry,
    plan,
    *,
    name: str,
    description: str = "",
    trigger_words: Sequence[str] = (),
    tags: Sequence[str] = (),
    server_spec: BaseModelSpec | None = None,
) -> None:
    """Before training: the registration that follows it will be accepted (name, metadata, rank, base model)."""
    try:
        check_name(name)
        check_metadata(description, list(trigger_words), list(tags))
    except InvalidAdapterError as e:
        raise TrainingInputError(e.message) from e
    try:
        check_training(training_record({**plan.record, "steps": plan.config.steps, "final_loss": 0.0}))
    except InvalidAdapterError as e:
        raise TrainingInputError(e.message) from e
    if plan.config.rank > registry.max_rank:
        raise TrainingInputError(f"rank {plan.config.rank} is above the registry's max_rank {registry.max_rank}")
    ours = plan.spec.fingerprint
    if server_spec is not None and server_spec.fingerprint != ours:
        raise TrainingInputError(
            f"base model {plan.config.base_model!r} (fingerprint {ours}) does not match the server's model "
            f"(fingerprint {server_spec.fingerprint}): the server would refuse the adapter"
        )
    for manifest in registry.versions(name):
        if manifest.base_model.fingerprint != ours:
            raise TrainingInputError(
                f"adapter {manifest.ref} is registered for another base model ({manifest.base_model.family}, "
                f"fingerprint {manifest.base_model.fingerprint}) than {plan.config.base_model!r} (fingerprint "
                f"{ours}); choose another --name, or train on that base model"
            )


def register_adapter(
    registry: Registry,
    trained: TrainedAdapter,
    *,
    name: str,
    description: str = "",
    trigger_words: Sequence[str] = (),
    tags: Sequence[str] = (),
) -> Manifest:
    """Register the trained file as the next version of ``name``, its settings in the manifest's ``training``."""
    manifest = registry.register(
        trained.lora_file,
        name=name,
        description=description,
        training=training_record(trained.record),
        trigger_words=list(trigger_words),
        tags=list(tags),
        source_format="diffusers",
    )
    if manifest.sha256 != trained.sha256:
        raise RuntimeError(f"{manifest.ref}: the registry's canonical blob differs from {trained.adapter_file}")
    return manifest
