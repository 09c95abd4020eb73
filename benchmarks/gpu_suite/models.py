"""The models the suite runs, built without a download, and the adapters and requests it serves."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from deployments.engine import models
from deployments.engine.config import LoRAConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "deployments" / "engine" / "configs"
UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")  # where the adapters have weights (style LoRAs' usual targets)
SERVED_LORA = LoRAConfig()  # the slots as the server ships them: every UNet Linear/Conv2d, max_rank 128
SUBJECTS = ["a lighthouse", "a red fox", "a castle", "a teapot", "a mountain lake", "a robot", "a sailboat", "a cat"]


@dataclass
class ModelParts:
    """One model's modules on the run's device (the VAE in float32 where its config forces an upcast)."""

    info: models.ModelInfo
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    tokenizer_2: object | None = None
    text_encoder_2: torch.nn.Module | None = None
    random_weights: bool = True


def model_dir(source: str) -> Path:
    """``configs:sd15`` -> the shipped config directory (no weights); ``builtin:tiny-sd`` -> its built directory."""
    if source.startswith("configs:"):
        directory = CONFIGS / source.removeprefix("configs:")
        if not (directory / "model_index.json").is_file():
            raise ValueError(f"{source}: no shipped config at {directory}")
        return directory
    return models.resolve_model_dir(source)


def load_model(source: str, device: torch.device, dtype: torch.dtype) -> ModelParts:
    """A builtin model's saved weights, or random weights from a shipped config, built on ``device``.

    Random weights are drawn on the device itself (SDXL's UNet has 2.6 B parameters) from a fixed seed.
    """
    directory = model_dir(source)
    info = models.read_model_info(source, directory)
    if (directory / "unet" / "config.json").is_file() and any((directory / "unet").glob("*.safetensors")):
        parts = ModelParts(
            info,
            models.load_tokenizer(directory),
            models.load_text_encoder(directory, device, dtype),
            models.load_unet(directory, device, dtype),
            models.load_vae(directory, device, dtype),
            random_weights=False,
        )
        if info.sdxl:
            parts.tokenizer_2 = models.load_tokenizer(directory, "tokenizer_2")
            parts.text_encoder_2 = models.load_text_encoder(directory, device, dtype, "text_encoder_2")
        return parts
    return _random_model(directory, info, device, dtype)


def _random_model(directory: Path, info: models.ModelInfo, device: torch.device, dtype: torch.dtype) -> ModelParts:
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from deployments.engine.clip_vocab import build_clip_tokenizer

    def config(part: str) -> dict:
        return json.loads((directory / part / "config.json").read_text())

    def ready(module: torch.nn.Module, part_dtype: torch.dtype) -> torch.nn.Module:
        return module.to(device=device, dtype=part_dtype).eval().requires_grad_(False)

    vae_config = config("vae")
    # models.load_vae's rule: SD's VAE overflows in float16, so it stays float32 where its config says so.
    vae_dtype = torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", True) else dtype
    with torch.random.fork_rng(), torch.device(device):
        torch.manual_seed(0)
        unet = ready(UNet2DConditionModel.from_config(config("unet")), dtype)
        vae = ready(AutoencoderKL.from_config(vae_config), vae_dtype)
        te_config = CLIPTextConfig(**config("text_encoder"))
        text_encoder = ready(CLIPTextModel(te_config), dtype)
        text_encoder_2 = None
        if info.sdxl:
            text_encoder_2 = ready(CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2"))), dtype)
    context = te_config.max_position_embeddings
    parts = ModelParts(info, build_clip_tokenizer(context), text_encoder, unet, vae)
    if info.sdxl:
        parts.tokenizer_2 = build_clip_tokenizer(context, pad_token="!")  # SDXL's tokenizer_2 pads with "!"
        parts.text_encoder_2 = text_encoder_2
    return parts


def host_adapters(unet: torch.nn.Module, count: int, rank: int, dtype: torch.dtype, pin: bool = False) -> list[dict]:
    """``count`` rank-``rank`` adapters ``{module path: (A [r, in], B [out, r], alpha)}`` on the UNet's
    attention projections, in host memory (as the registry's cache hands them to ``AdapterResidency``).

    Small B (the adapters move the image without blowing up random weights); alpha = r, as peft's default.
    """
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        weights = {}
        for path, module in unet.named_modules():
            if not isinstance(module, torch.nn.Linear) or not any(path.endswith("." + t) for t in UNET_ATTN):
                continue
            A = torch.randn((rank, module.in_features), generator=g) / module.in_features**0.5  # [r, in]
            B = torch.randn((module.out_features, rank), generator=g) / rank**0.5 * 0.1  # [out, r]
            A, B = A.to(dtype), B.to(dtype)
            if pin:  # a GPU replica's host cache: page-locked, so copies to the slots run asynchronously
                A, B = A.pin_memory(), B.pin_memory()
            weights[path] = (A, B, float(rank))
        out.append(weights)
    return out


@dataclass(frozen=True)
class Request:
    index: int
    prompt: str
    adapter: int  # 0-based index into the adapters
    seed: int


def draw_requests(count: int, adapters: int, zipf_s: float, seed: int, prefix: str = "") -> list[Request]:
    """Adapter k (0-based) with probability proportional to (k + 1) ** -zipf_s; distinct prompts (no cache hits)."""
    rng = random.Random(seed)
    popularity = [(k + 1) ** -zipf_s for k in range(adapters)]
    return [
        Request(
            i,
            f"{prefix}{SUBJECTS[i % len(SUBJECTS)]}, picture {i}",
            rng.choices(range(adapters), popularity)[0],
            seed + i,
        )
        for i in range(count)
    ]


def adapter_name(k: int) -> str:
    return f"style{k}"
