"""Shared fixtures: the embedded default model, written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = Path(os.environ.get("LORAFLEET_TEST_CACHE") or tmp_path_factory.mktemp("lorafleet-cache"))
    os.environ["LORAFLEET_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(cache_dir) -> Path:
    """``builtin:tiny-sd`` written out as an ordinary diffusers directory."""
    from deployments.engine.models import resolve_model_dir

    return resolve_model_dir("builtin:tiny-sd", cache_dir)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """The tiny model's parts, loaded through the same directory loader real checkpoints use."""
    from deployments.engine import models

    cpu = torch.device("cpu")
    return {
        "info": models.read_model_info("builtin:tiny-sd", tiny_dir),
        "tokenizer": models.load_tokenizer(tiny_dir),
        "text_encoder": models.load_text_encoder(tiny_dir, cpu, torch.float32),
        "unet": models.load_unet(tiny_dir, cpu, torch.float32),
        "vae": models.load_vae(tiny_dir, cpu, torch.float32),
    }
