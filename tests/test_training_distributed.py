"""`lorafleet train --num-workers 2`: Ray Train's TorchTrainer, two CPU workers (DDP over gloo) on a local Ray
instance bound to 127.0.0.1, started and stopped by the command itself, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from lora_registry.config import RegistryConfig, open_registry
from training import TrainingConfig, prepare, train, training_settings
from training.checkpoints import checkpoint_dirs

LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))
REDS = [(255, 0, 0), (230, 20, 20), (200, 0, 30), (255, 40, 0)]
COMMON = {"steps": 4, "checkpoint_every": 2, "resolution": 64, "rank": 4, "learning_rate": 1e-2, "batch_size": 1}


def test_two_ray_train_workers_train_what_one_process_accumulating_two_passes_trains(tmp_path, cache_dir, tiny_dir):
    data = tmp_path / "red"
    data.mkdir()
    for i, colour in enumerate(REDS):
        Image.new("RGB", (64, 64), colour).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a red square")
    out, registry_dir = tmp_path / "ddp", tmp_path / "registry"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["LORAFLEET_CACHE_DIR"] = str(cache_dir)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items()]
    command = [LORAFLEET, "train", str(data), "--output-dir", str(out), "--num-workers", "2", *flags]
    command += ["--cpus-per-worker", "1", "--name", "red-ddp", "--registry", str(registry_dir), "--quiet", "--json"]
    r = subprocess.run(command, capture_output=True, text=True, timeout=480, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "in 2 Ray Train workers" in r.stderr
    result = json.loads(r.stdout)

    # Ray Train stored rank 0's checkpoints where a single-process run keeps them.
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == ["step-00000002", "step-00000004"]
    manifest = result["manifest"]
    assert (manifest["name"], manifest["version"], manifest["sha256"]) == ("red-ddp", 1, result["sha256"])
    registry = open_registry(RegistryConfig(uri=str(registry_dir)), caches=False)
    settings = training_settings(registry.resolve("red-ddp"))
    assert (settings["world_size"], settings["batch_size"], settings["steps"]) == (2, 1, 4)

    # The same samples in one process: 2 passes of 1 per step, gradients summed (DDP averages the two
    # workers' gradients: the same sum, halved). One intra-op thread, as each 1-CPU Ray worker has, so
    # the kernels add in the same order and the weights agree bit for bit.
    reference = TrainingConfig(
        data_dir=str(data),
        output_dir=str(tmp_path / "reference"),
        cache_dir=str(cache_dir),
        gradient_accumulation_steps=2,
        **COMMON,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = train(prepare(reference), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert result["record"]["final_loss"] == expected.record["final_loss"]
    assert json.loads((out / "training.json").read_text())["losses"] == expected.losses
    assert Path(result["adapter_file"]).read_bytes() == expected.adapter_file.read_bytes()
