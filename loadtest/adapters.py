"""Synthetic LoRA adapters for the base model, made without training, and their registration.

The registry validates every key against the served model's modules and
shapes, so the adapters are generated from the model's own ``BaseModelSpec``
(read from its ``config.json`` files on the meta device; no weights needed).
They are diffusers-format files (``unet.<module>.lora_A.weight`` /
``.lora_B.weight``; alpha = rank, diffusers' convention), which both lorafleet's
registry and diffusers' ``load_lora_weights`` (the baseline) take as they are.

>>> files = write_adapters(model_dir, Path("/tmp/lt"), names=["lt-style-000"])   # doctest: +SKIP
>>> register_adapters("http://127.0.0.1:8000", "admin-token", files)              # doctest: +SKIP

With several base models (``--models``), each model's adapters are built from its own
directory and registered with ``model=<name>``: adapters belong to one base model.
"""

from __future__ import annotations

import math
from pathlib import Path

import safetensors.torch
import torch

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def synthetic_lora(
    spec, *, seed: int, rank: int = 4, targets: tuple[str, ...] = UNET_ATTENTION, strength: float = 0.5
) -> dict[str, torch.Tensor]:
    """diffusers-format state dict: random A/B for every UNet module ending in one of ``targets``.

    A ~ N(0, 1/in_features) keeps ``A x`` at the scale of ``x``; B ~ N(0, (strength/rank)^2)
    makes the update ``B A x`` about ``strength/sqrt(rank)`` of the activation: visible in
    the image, far from blowing it up.
    """
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in sorted(spec.modules.items()):
        component, _, path = name.partition(".")
        if component != "unet" or not any(path.endswith("." + t) for t in targets):
            continue
        fan_in = math.prod(shape.lora_a_shape(rank)[1:])
        # A: [rank, in_features(, kh, kw)], B: [out_features, rank(, 1, 1)]
        a = torch.randn(shape.lora_a_shape(rank), generator=g) / math.sqrt(fan_in)
        b = torch.randn(shape.lora_b_shape(rank), generator=g) * (strength / rank)
        state[f"unet.{path}.lora_A.weight"] = a.contiguous()
        state[f"unet.{path}.lora_B.weight"] = b.contiguous()
    if not state:
        raise ValueError(f"the base model has no UNet module ending in {targets}")
    return state


def write_adapters(model_dir: Path, directory: Path, names: list[str], rank: int = 4, seed: int = 0) -> dict[str, Path]:
    """Write one ``<name>.safetensors`` per name (seeded by position) and return name -> path."""
    from lora_registry.base_model import base_model_spec_from_dir

    spec = base_model_spec_from_dir(Path(model_dir))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate(names):
        path = directory / f"{name}.safetensors"
        safetensors.torch.save_file(synthetic_lora(spec, seed=seed * 100_003 + i, rank=rank), str(path))
        out[name] = path
    return out


def register_adapters(
    url: str, admin_token: str, files: dict[str, Path], timeout_s: float = 120.0, model: str | None = None
) -> list[dict]:
    """``POST /v1/adapters`` for each file (the admin API), for base ``model`` (None: the server's default
    model); returns the manifests. Raises on any failure."""
    import requests

    manifests = []
    with requests.Session() as session:
        for name, path in files.items():
            with open(path, "rb") as f:
                r = session.post(
                    url.rstrip("/") + "/v1/adapters",
                    files={"file": (path.name, f)},
                    data={
                        "name": name,
                        "tags": "loadtest",
                        "description": "synthetic load-test adapter",
                        **({"model": model} if model is not None else {}),
                    },
                    headers={"Authorization": f"Bearer {admin_token}"},
                    timeout=timeout_s,
                )
            if r.status_code != 201:
                raise RuntimeError(f"registering adapter {name!r} failed: HTTP {r.status_code}: {r.text[:500]}")
            manifests.append(r.json())
    return manifests
