"""``builtin:tiny-sd``: the embedded default model (and ``builtin:tiny-sd-inpaint``, ``builtin:tiny-sdxl``,
``builtin:tiny-sdxl-inpaint``).

A small model with Stable Diffusion 1.x's architecture and classes
(``UNet2DConditionModel`` with SD1's block layout, ``AutoencoderKL`` with a
scale factor of 8, ``CLIPTextModel`` and ``CLIPTokenizer`` over the real
49,408-token CLIP vocabulary, SD1.5's ``PNDMScheduler`` configuration), with
random weights from a fixed seed. Nothing is downloaded: ``write_builtin``
writes it out as an ordinary diffusers directory, which the server then loads
through the same loader as any real checkpoint.

``builtin:tiny-sd-inpaint`` is the same architecture with a 9-channel UNet
input, as Stable Diffusion's inpainting checkpoints have (latents, mask,
masked-image latents), built from the same seed: its weights are its own.

``builtin:tiny-sdxl`` is Stable Diffusion XL's architecture at a small size: two text encoders
(``CLIPTextModel``, CLIP-L-shaped with quick-GELU, and ``CLIPTextModelWithProjection``,
bigG-shaped with GELU and a text projection, whose tokenizer pads with ``!`` as SDXL's
``tokenizer_2`` does), a UNet with SDXL's three-level block layout, linear projections and
``addition_embed_type: text_time`` micro-conditioning, a VAE with SDXL's scaling factor and
``force_upcast``, SDXL's ``EulerDiscreteScheduler`` configuration, and
``force_zeros_for_empty_prompt``. Its native size is 256 px (``sample_size`` 32) so that it runs on
two CPU cores; a real SDXL checkpoint's is 1024 px (``sample_size`` 128), read from its config.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

BUILTIN_PREFIX = "builtin:"
BUILTIN_SEED = 20_240_601

# SD1.x's block layout, with narrow channels so it runs on two CPU cores.
TINY_SD = {
    "unet": {
        # Default resolution: sample_size * 8 = 256 px (SD1.5: 64 -> 512 px).
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64, 64, 64],
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "cross_attention_dim": 64,
        "norm_num_groups": 32,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [32, 32, 64, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": 0.18215,
    },
    "text_encoder": {
        "vocab_size": 49_408,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 64,
        "bos_token_id": 49_406,
        "eos_token_id": 49_407,
        "pad_token_id": 49_407,
    },
    # Stable Diffusion 1.5's scheduler configuration.
    "scheduler": {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    },
    # Keys of SD1.5's scheduler_config.json that PNDM ignores but DDIM and others read.
    "scheduler_extra": {"clip_sample": False},
}

# SD-inpainting's layout: the UNet also reads the mask (1 channel) and the masked image's latents (4).
TINY_SD_INPAINT = {**TINY_SD, "unet": {**TINY_SD["unet"], "in_channels": 9}}

# SDXL's layout (stabilityai/stable-diffusion-xl-base-1.0), narrow. Real SDXL: block_out_channels
# [320, 640, 1280], transformer_layers_per_block [1, 2, 10], attention_head_dim [5, 10, 20],
# addition_time_embed_dim 256, cross_attention_dim 2048 = 768 + 1280, pooled 1280.
_TINY_SDXL_TE1 = {
    "vocab_size": 49_408,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
    "bos_token_id": 49_406,
    "eos_token_id": 49_407,
    "pad_token_id": 49_407,
}
_TINY_SDXL_TE2 = {
    **_TINY_SDXL_TE1,
    "hidden_size": 96,
    "intermediate_size": 384,
    "num_attention_heads": 4,
    "hidden_act": "gelu",
    "projection_dim": 96,
    "pad_token_id": 0,  # "!": SDXL's tokenizer_2 pads with it
}
TINY_SDXL = {
    "pipeline": "StableDiffusionXLPipeline",
    "unet": {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 1, 2],
        "attention_head_dim": [2, 4, 4],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 16,
        "projection_class_embeddings_input_dim": 96 + 6 * 16,  # pooled text embeds + 6 time ids
        "cross_attention_dim": 64 + 96,  # both encoders' penultimate states, concatenated
        "norm_num_groups": 32,
    },
    "vae": {**TINY_SD["vae"], "scaling_factor": 0.13025, "force_upcast": True},
    "text_encoder": _TINY_SDXL_TE1,
    "text_encoder_2": _TINY_SDXL_TE2,
    # stable-diffusion-xl-base-1.0's scheduler_config.json.
    "scheduler_class": "EulerDiscreteScheduler",
    "scheduler": {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "interpolation_type": "linear",
        "prediction_type": "epsilon",
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "use_karras_sigmas": False,
    },
    "scheduler_extra": {
        "clip_sample": False,
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
    },
}
TINY_SDXL_INPAINT = {
    **TINY_SDXL,
    "pipeline": "StableDiffusionXLInpaintPipeline",
    "unet": {**TINY_SDXL["unet"], "in_channels": 9},
}

BUILTIN_MODELS = {
    "tiny-sd": TINY_SD,
    "tiny-sd-inpaint": TINY_SD_INPAINT,
    "tiny-sdxl": TINY_SDXL,
    "tiny-sdxl-inpaint": TINY_SDXL_INPAINT,
}


def builtin_name(uri: str) -> str:
    """``"builtin:tiny-sd"`` -> ``"tiny-sd"``, with a clear error for unknown names."""
    name = uri.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {uri!r}; known: {sorted(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)}")
    return name


def write_builtin(uri: str, directory: str | Path) -> Path:
    """Build a builtin model from its config and fixed seed; save it as a diffusers directory.

    The directory is written under a temporary name and renamed into place, so
    a reader never sees half a model. Returns the directory.
    """
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .clip_vocab import build_clip_tokenizer, write_vocab_files

    name = builtin_name(uri)
    spec = BUILTIN_MODELS[name]
    xl = "text_encoder_2" in spec
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(BUILTIN_SEED)
            unet = UNet2DConditionModel(**spec["unet"])
            vae = AutoencoderKL(**spec["vae"])
            text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"])) if xl else None
        unet.save_pretrained(staging / "unet")
        vae.save_pretrained(staging / "vae")
        text_encoder.save_pretrained(staging / "text_encoder")
        context = spec["text_encoder"]["max_position_embeddings"]
        build_clip_tokenizer(model_max_length=context).save_pretrained(staging / "tokenizer")
        write_vocab_files(staging / "tokenizer")
        if text_encoder_2 is not None:
            text_encoder_2.save_pretrained(staging / "text_encoder_2")
            build_clip_tokenizer(model_max_length=context, pad_token="!").save_pretrained(staging / "tokenizer_2")
            write_vocab_files(staging / "tokenizer_2")
        scheduler_class = spec.get("scheduler_class", "PNDMScheduler")
        getattr(diffusers, scheduler_class)(**spec["scheduler"]).save_pretrained(staging / "scheduler")
        config_path = staging / "scheduler" / "scheduler_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **spec["scheduler_extra"]}, indent=2))
        model_index = {
            "_class_name": spec.get("pipeline", "StableDiffusionPipeline"),
            "_diffusers_version": "0.42.1",
            "_lorafleet_builtin": name,
            "feature_extractor": [None, None],
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        if xl:
            model_index |= {
                "force_zeros_for_empty_prompt": True,
                "image_encoder": [None, None],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
            }
        else:
            model_index |= {"requires_safety_checker": False, "safety_checker": [None, None]}
        (staging / "model_index.json").write_text(json.dumps(dict(sorted(model_index.items())), indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


# -- IP-Adapter (issue 22) ---------------------------------------------------------------------------------------

# A tiny CLIP vision encoder (``CLIPVisionModelWithProjection``) and IP-Adapter weights for every builtin model,
# plain and "plus", in a directory of their own laid out as h94/IP-Adapter's ``models/`` folder
# (``write_builtin_ip_adapter``). The models' own directories and weights are untouched.
TINY_IP_ADAPTER = {
    "image_encoder": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        "projection_dim": 48,
        "hidden_act": "gelu",
    },
    # The "plus" resampler (diffusers' IPAdapterPlusImageProjection; its attention heads are 64 wide).
    "plus": {"hidden_dims": 64, "heads": 1, "num_queries": 8, "depth": 4},
}
BUILTIN_IP_ADAPTERS = {name: TINY_IP_ADAPTER for name in BUILTIN_MODELS}
IP_ADAPTER_FILES = {"plain": "ip-adapter.safetensors", "plus": "ip-adapter-plus.safetensors"}
IP_ADAPTER_SEED = BUILTIN_SEED + 22  # its own stream


def ip_adapter_state(spec: dict, unet, variant: str) -> dict[str, dict[str, torch.Tensor]]:
    """Random IP-Adapter weights for ``unet`` in the original (h94) format that diffusers' ``load_ip_adapter``
    converts: ``{"image_proj": {...}, "ip_adapter": {"1.to_k_ip.weight": ..., ...}}``. Call under a seed."""
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    from .ip_adapter import cross_attention_layers

    enc = spec["image_encoder"]
    cross = unet.config.cross_attention_dim
    if variant == "plain":
        proj = ImageProjection(
            cross_attention_dim=cross, image_embed_dim=enc["projection_dim"], num_image_text_embeds=4
        )
        image_proj = {k.replace("image_embeds", "proj"): v for k, v in proj.state_dict().items()}
    else:
        plus = spec["plus"]
        proj = IPAdapterPlusImageProjection(
            embed_dims=enc["hidden_size"],
            output_dims=cross,
            hidden_dims=plus["hidden_dims"],
            depth=plus["depth"],
            heads=plus["heads"],
            num_queries=plus["num_queries"],
        )
        image_proj = _plus_to_original(proj.state_dict())
    for t in image_proj.values():  # LayerNorms start at (1, 0): make every parameter count
        if t.ndim == 1:
            t.add_(0.1 * torch.randn_like(t))
    ip = {}
    for _, attn, key_id in cross_attention_layers(unet):
        for role in ("to_k_ip", "to_v_ip"):
            linear = torch.nn.Linear(attn.cross_attention_dim, attn.inner_dim, bias=False)
            ip[f"{key_id}.{role}.weight"] = linear.weight.detach().clone()
    return {"image_proj": {k: v.detach().clone().contiguous() for k, v in image_proj.items()}, "ip_adapter": ip}


def _plus_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' ``IPAdapterPlusImageProjection`` keys back to the resampler's original ones (the inverse of
    ``_convert_ip_adapter_image_proj_to_diffusers``' plus branch: to_k and to_v concatenated as to_kv)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "layers":
            out[key] = value
            continue
        i, rest = parts[1], ".".join(parts[2:])
        if rest.startswith("ln0."):
            out[f"layers.{i}.0.norm1.{rest[4:]}"] = value
        elif rest.startswith("ln1."):
            out[f"layers.{i}.0.norm2.{rest[4:]}"] = value
        elif rest.startswith("attn.to_q."):
            out[f"layers.{i}.0.to_q.{rest[10:]}"] = value
        elif rest.startswith("attn.to_k."):
            v = state[key.replace("attn.to_k.", "attn.to_v.")]
            out[f"layers.{i}.0.to_kv.{rest[10:]}"] = torch.cat([value, v])
        elif rest.startswith("attn.to_v."):
            continue
        elif rest.startswith("attn.to_out.0."):
            out[f"layers.{i}.0.to_out.{rest[14:]}"] = value
        elif rest.startswith("ff.0."):
            out[f"layers.{i}.1.0.{rest[5:]}"] = value
        elif rest.startswith("ff.1.net.0.proj."):
            out[f"layers.{i}.1.1.{rest[16:]}"] = value
        elif rest.startswith("ff.1.net.2."):
            out[f"layers.{i}.1.3.{rest[11:]}"] = value
        else:
            raise ValueError(f"unexpected resampler key {key!r}")
    return out


def save_ip_adapter_file(state: dict[str, dict[str, torch.Tensor]], path: str | Path) -> Path:
    """Write ``{"image_proj", "ip_adapter"}`` as one ``.safetensors`` file with prefixed keys (diffusers' format)."""
    import safetensors.torch

    flat = {f"{part}.{k}": v.contiguous() for part in ("image_proj", "ip_adapter") for k, v in state[part].items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(flat, str(path))
    return path


def write_builtin_ip_adapter(uri: str, directory: str | Path) -> Path:
    """The builtin model's IP-Adapter: ``directory/image_encoder`` and one weights file per variant
    (``IP_ADAPTER_FILES``), from a fixed seed; written under a temporary name and renamed into place."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    name = builtin_name(uri)
    spec = BUILTIN_IP_ADAPTERS[name]
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        with torch.device("meta"):  # the layout only: which cross-attention layers, of what widths
            unet = UNet2DConditionModel(**BUILTIN_MODELS[name]["unet"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(IP_ADAPTER_SEED)
            encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**spec["image_encoder"]))
            states = {variant: ip_adapter_state(spec, unet, variant) for variant in IP_ADAPTER_FILES}
        encoder.save_pretrained(staging / "image_encoder")
        for variant, file_name in IP_ADAPTER_FILES.items():
            save_ip_adapter_file(states[variant], staging / file_name)
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
