"""Checkpoints: ``<output-dir>/checkpoints/step-00000500/``, complete or absent.

A checkpoint directory holds::

    pytorch_lora_weights.safetensors   the LoRA weights (diffusers layout; loads in diffusers as is)
    optimizer.pt                       AdamW state (torch.save of tensors; loaded with weights_only=True)
    state.json                         step, per-step losses, the run's record, sha256 of the two files

Nothing else is needed to continue exactly: every random draw of step ``n`` is
derived from the seed and ``n`` (see ``data.derive_seed``), so there is no
generator state to carry. A single process writes a checkpoint into a hidden
staging directory and renames it into place; under Ray Train, rank 0 hands the
same directory to ``ray.train.report``, which copies it to storage. A reader
trusts a checkpoint only if ``state.json`` exists and the files match their
hashes, so a half-copied one is skipped in favour of the one before.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

from .lora import LORA_FILE, LoRAModel

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
_STEP_RE = re.compile(r"^step-(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_checkpoint(
    directory: Path, model: LoRAModel, optimizer: torch.optim.Optimizer, *, step: int, losses: list[float], record: dict
) -> None:
    """Write a checkpoint's files into ``directory`` (``state.json`` last)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    files = {name: _sha256(directory / name) for name in (LORA_FILE, OPTIMIZER_FILE)}
    state = {"step": step, "losses": losses, "record": record, "files": files}
    (directory / STATE_FILE).write_text(json.dumps(state))


def save_checkpoint(root: Path, step: int, write, keep: int) -> Path:
    """Atomically create ``root/step-N`` with ``write(staging_dir)``; keep the newest ``keep`` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint is an ordinary directory
        write(staging)
        if final.exists():  # rerun of a step already saved: swap, never leave no checkpoint
            old = final.rename(root / f".{final.name}.old-{uuid.uuid4().hex}")
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for stale in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def checkpoint_dirs(root: Path) -> list[Path]:
    """``step-N`` directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def read_checkpoint(directory: Path) -> dict | None:
    """The checkpoint's state, or ``None`` if it is incomplete or damaged."""
    directory = Path(directory)
    try:
        state = json.loads((directory / STATE_FILE).read_text())
        files = state["files"]
        if set(files) != {LORA_FILE, OPTIMIZER_FILE}:
            return None
        if any(_sha256(directory / name) != digest for name, digest in files.items()):
            return None
        if not isinstance(state["step"], int) or len(state["losses"]) != state["step"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state


def latest_checkpoint(root: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint under ``root`` and its state, if any."""
    for directory in reversed(checkpoint_dirs(root)):
        state = read_checkpoint(directory)
        if state is not None:
            return directory, state
    return None


def remove_staging(root: Path) -> None:
    """Remove staging directories a killed run left behind (call before a run starts, not during)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(".step-"):
                shutil.rmtree(p, ignore_errors=True)


def compatible(record: dict, checkpoint_record: dict) -> list[str]:
    """What differs between this run's record and a checkpoint's: ``["rank: 8 (checkpoint: 4)", ...]``."""
    problems = []
    for section, key in (("base_model", "fingerprint"), ("dataset", "fingerprint")):
        ours, theirs = record[section][key], checkpoint_record.get(section, {}).get(key)
        if ours != theirs:
            problems.append(f"{section} {key}: {ours} (checkpoint: {theirs})")
    ours, theirs = record["settings"], checkpoint_record.get("settings", {})
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key) != theirs.get(key):
            problems.append(f"{key}: {ours.get(key)!r} (checkpoint: {theirs.get(key)!r})")
    return problems


def restore_checkpoint(directory: Path, model: LoRAModel, optimizer: torch.optim.Optimizer) -> dict:
    """Load a checkpoint's weights and optimizer state; returns its state (``step``, ``losses``, ``record``)."""
    state = read_checkpoint(directory)
    if state is None:
        raise ValueError(f"checkpoint {str(directory)!r} is incomplete or damaged")
    model.load(Path(directory) / LORA_FILE)
    optimizer.load_state_dict(torch.load(Path(directory) / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    return state
