"""Which model family an adapter was made for, to refuse one made for another base with a clear message.

An SD1.5 LoRA uploaded to an SDXL server (or the reverse) fails the ordinary
checks with hundreds of unknown keys or mismatched shapes. ``check_base_family``
turns that into one ``base_mismatch`` error naming both bases::

    this adapter is for SD1.x (every key and shape fits SD1.5's modules) but the base model is SDXL (tiny-sdxl)

It compares the upload against reference architectures of each family
(``REFERENCE_MODELS``: SD1.5, SD2.1 and SDXL 1.0, built on the meta device
from their configs, no weights): a family whose reference takes every key and
shape is the adapter's family; failing that (adapters for small models such as
``builtin:tiny-sd``), the families whose module names take every key. The
signatures this relies on are structural: only SD1.x/SD2.x have attention in
``down_blocks.0`` and a fourth level (``up_blocks.3``), only SDXL has a second
text encoder (``lora_te2_``, ``text_encoder_2.``) and ten-deep transformers, LDM
block numbers differ (SD1.x/SD2.x's ``input_blocks_1_1`` is an attention, SDXL's a
resnet), and the cross attention is 768
(SD1.x), 1024 (SD2.x) or 2048 (SDXL) wide. It is consulted only for an upload
that does not fit the served base, and only claims a family other than the
base's, so it can never refuse an adapter that fits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from .base_model import FAMILY_NAMES, BaseModelSpec, base_model_spec_from_configs
from .errors import InvalidAdapterError
from .formats import plan_conversion
from .safetensors_io import SafetensorsHeader

BASE_MISMATCH = "base_mismatch"
_NO_RANK_LIMIT = 1 << 30

_CLIP_L = {  # openai/clip-vit-large-patch14's text model: SD1.x's encoder and SDXL's first
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
_OPEN_CLIP_H = {  # SD2.x's encoder (OpenCLIP ViT-H/14, 23 layers as diffusers ships it)
    **_CLIP_L,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
_OPEN_CLIP_BIG_G = {  # SDXL's second encoder (OpenCLIP ViT-bigG/14), with its text projection
    **_CLIP_L,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
_SD_UNET = {
    "sample_size": 64,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
}


@dataclass(frozen=True)
class ReferenceModel:
    """A family's reference architecture: the configs of its UNet and text encoders."""

    family: str
    name: str
    unet: Mapping
    text_encoder: Mapping
    text_encoder_2: Mapping | None = None


REFERENCE_MODELS = (
    ReferenceModel("sd1", "SD1.5", {**_SD_UNET, "cross_attention_dim": 768, "attention_head_dim": 8}, _CLIP_L),
    ReferenceModel(
        "sd2",
        "SD2.1",
        {**_SD_UNET, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True},
        _OPEN_CLIP_H,
    ),
    ReferenceModel(
        "sdxl",
        "SDXL 1.0",
        {  # stable-diffusion-xl-base-1.0's unet/config.json, the fields that shape modules
            "sample_size": 128,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320, 640, 1280],
            "layers_per_block": 2,
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        _CLIP_L,
        _OPEN_CLIP_BIG_G,
    ),
)


@cache
def reference_spec(family: str) -> BaseModelSpec:
    """The ``BaseModelSpec`` of ``family``'s reference model (built once per process, on the meta device)."""
    for ref in REFERENCE_MODELS:
        if ref.family == family:
            return base_model_spec_from_configs(
                dict(ref.unet),
                dict(ref.text_encoder),
                family,
                text_encoder_2_config=dict(ref.text_encoder_2) if ref.text_encoder_2 is not None else None,
                name=ref.name,
            )
    raise ValueError(f"no reference model for family {family!r}; known: {[r.family for r in REFERENCE_MODELS]}")


def adapter_families(
    header: SafetensorsHeader, adapter_config: dict | None = None, source_format: str | None = None
) -> tuple[tuple[str, ...], bool]:
    """The families whose reference model the adapter fits, and whether by shapes too (``True``) or by module
    names only (``False``, e.g. an adapter for a small test model of the family); ``()`` if none fits."""
    from .validation import check_shapes  # validation calls this module

    by_names = []
    by_shapes = []
    for ref in REFERENCE_MODELS:
        spec = reference_spec(ref.family)
        try:
            plan = plan_conversion(header.tensors, header.metadata, spec, adapter_config, source_format)
        except InvalidAdapterError:
            continue
        by_names.append(ref.family)
        try:
            check_shapes(header, plan, spec, _NO_RANK_LIMIT)
        except InvalidAdapterError:
            continue
        by_shapes.append(ref.family)
    if by_shapes:
        return tuple(by_shapes), True
    return tuple(by_names), False


def family_phrase(families: tuple[str, ...]) -> str:
    """``("sd1", "sd2")`` -> ``"SD1.x or SD2.x"``."""
    return " or ".join(FAMILY_NAMES.get(f, f) for f in families)


def check_base_family(
    header: SafetensorsHeader,
    spec: BaseModelSpec,
    cause: InvalidAdapterError,
    adapter_config: dict | None = None,
    source_format: str | None = None,
) -> None:
    """Raise ``InvalidAdapterError`` (code ``base_mismatch``, from ``cause``) if an upload that does not fit
    ``spec`` (``cause``: its ``unknown_modules`` / ``shape_mismatch`` error) fits another family's model;
    return if it fits no family, or may be for the base's own family (then ``cause`` says what is wrong)."""
    families, shapes_fit = adapter_families(header, adapter_config, source_format)
    if not families or spec.family in families:
        return
    if shapes_fit:
        names = " / ".join(reference_spec(f).name for f in families)
        why = f"every key and shape fits {names}'s modules"
    else:
        why = f"its module names fit {family_phrase(families)} models, not {FAMILY_NAMES.get(spec.family, spec.family)}"
    raise InvalidAdapterError(
        f"this adapter is for {family_phrase(families)} ({why}) but the base model is {spec.label}",
        code=BASE_MISMATCH,
        keys=cause.keys,
    ) from cause
