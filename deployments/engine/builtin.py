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
