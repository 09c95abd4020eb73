"""What an adapter must fit: the LoRA-targetable modules of the base model and their shapes.

The registry validates every upload against a ``BaseModelSpec`` and records its
``fingerprint`` in the manifest. The spec lists every ``nn.Linear`` and
``nn.Conv2d`` of the UNet (component ``"unet"``), the CLIP text encoder
(component ``"text_encoder"``) and, for SDXL, the second text encoder
(``"text_encoder_2"``, a ``CLIPTextModelWithProjection``; its ``text_projection``
is a Linear like any other) under canonical names::

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj
    text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj
    text_encoder_2.text_projection

Text-encoder names always carry ``text_model.``, as in transformers 4 and in
every published LoRA file, even where the installed transformers flattens
``CLIPTextModel`` (5.x drops the ``text_model`` attribute): canonical adapters
stay valid across transformers upgrades. ``get_module`` maps a canonical name
back onto a live model either way.

Callers pass loaded models (``base_model_spec``) or a diffusers directory
(``base_model_spec_from_dir``, which builds the models on the meta device from
their ``config.json``: no weights are read).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from .ldm_names import ldm_unet_names

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
TEXT_MODEL_PREFIX = "text_model."
# Text-encoder modules outside ``text_model`` (CLIPTextModelWithProjection's projection): never prefixed.
OUTSIDE_TEXT_MODEL = ("text_projection",)
# kohya / A1111 name prefixes of each text encoder: SD1.x files say lora_te_ (some tools lora_te1_),
# SDXL files lora_te1_ and lora_te2_.
KOHYA_TEXT_PREFIXES = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


@dataclass(frozen=True)
class ModuleShape:
    """A LoRA-targetable module: ``linear`` (``kernel_size == ()``) or ``conv2d``."""

    kind: str
    in_features: int  # Conv2d: in_channels
    out_features: int  # Conv2d: out_channels
    kernel_size: tuple[int, ...] = ()

    def lora_a_shape(self, rank: int) -> tuple[int, ...]:
        # linear: [r, in_features]; conv2d: [r, in_channels, kh, kw]
        return (rank, self.in_features, *self.kernel_size)

    def lora_b_shape(self, rank: int) -> tuple[int, ...]:
        # linear: [out_features, r]; conv2d: [out_channels, r, 1, 1]
        return (self.out_features, rank) if self.kind == "linear" else (self.out_features, rank, 1, 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel_size)


@dataclass(frozen=True)
class BaseModelSpec:
    """``family`` (``"sd1"``, ``"sd2"`` or ``"sdxl"``) and ``modules``: canonical name -> ``ModuleShape``.

    ``name`` (e.g. ``"tiny-sdxl"``) only labels the model in error messages; like ``family`` it does not
    decide what fits (the modules do), and unlike ``family`` it is not part of the fingerprint.
    """

    family: str
    modules: Mapping[str, ModuleShape]
    name: str = field(default="", compare=False)

    @property
    def label(self) -> str:
        """``"SDXL (tiny-sdxl)"``: the family's display name and the model's name, for messages."""
        family = FAMILY_NAMES.get(self.family, self.family)
        return f"{family} ({self.name})" if self.name else family

    @cached_property
    def fingerprint(self) -> str:
        """A stable hash of the family and every targetable module's name, kind and shape."""
        rows = [
            [name, s.kind, s.in_features, s.out_features, list(s.kernel_size)]
            for name, s in sorted(self.modules.items())
        ]
        blob = json.dumps([self.family, rows], separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    @cached_property
    def kohya_names(self) -> dict[str, str]:
        """kohya / A1111 LoRA names -> canonical names.

        kohya writes a prefix plus the module path with every ``.`` replaced by
        ``_``: ``lora_unet_`` for the UNet, ``lora_te_`` / ``lora_te1_`` for the
        (first) text encoder and ``lora_te2_`` for SDXL's second. Building this
        table from the real module names makes the reverse mapping exact (no
        string guessing); a text-encoder name is reachable with and without
        ``text_model_``. A UNet module is reachable by its diffusers name and by
        its LDM name (``lora_unet_input_blocks_4_1_...``, see ``ldm_names``), on
        every family: kohya-ss sd-scripts writes SDXL files the LDM way, and
        other tools (LyCORIS, A1111 extractions, merges of original checkpoints)
        write SD1.x/SD2.x files that way too.
        """
        table: dict[str, str] = {}
        ambiguous: set[str] = set()
        ldm = self.ldm_unet_names
        for name in self.modules:
            component, _, path = name.partition(".")
            if component == "unet":
                paths = [path, ldm[path]] if path in ldm else [path]
                aliases = [f"lora_unet_{p.replace('.', '_')}" for p in paths]
            else:
                inner = path.startswith(TEXT_MODEL_PREFIX)
                short = path.removeprefix(TEXT_MODEL_PREFIX).replace(".", "_")
                middles = ("text_model_", "") if inner else ("",)
                aliases = [f"{p}{q}{short}" for p in KOHYA_TEXT_PREFIXES[component] for q in middles]
            for alias in aliases:
                if alias in table and table[alias] != name:
                    ambiguous.add(alias)
                table[alias] = name
        for alias in ambiguous:
            del table[alias]
        return table

    @cached_property
    def ldm_unet_names(self) -> dict[str, str]:
        """UNet module path -> its LDM (SGM) path, e.g. ``down_blocks.1.attentions.0.proj_in`` ->
        ``input_blocks.4.1.proj_in``; paths without the ``unet.`` prefix. See ``ldm_names``."""
        return ldm_unet_names(spec_modules_for(self, "unet"))

    def describe(self) -> dict:
        return {"family": self.family, "fingerprint": self.fingerprint, "modules": len(self.modules)}


def _module_shape(module: nn.Module) -> ModuleShape | None:
    if isinstance(module, nn.Linear):
        return ModuleShape("linear", module.in_features, module.out_features)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return None  # LoRA over grouped convolutions is not supported
        return ModuleShape("conv2d", module.in_channels, module.out_channels, tuple(module.kernel_size))
    return None


def component_modules(component: str, model: nn.Module) -> dict[str, ModuleShape]:
    """Canonical name -> shape for one component's Linear / Conv2d modules."""
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    add_text_model = component in TEXT_COMPONENTS and not hasattr(model, "text_model")
    out = {}
    for path, module in model.named_modules():
        shape = _module_shape(module)
        if shape is None:
            continue
        if add_text_model and path not in OUTSIDE_TEXT_MODEL:
            path = TEXT_MODEL_PREFIX + path
        out[f"{component}.{path}"] = shape
    return out


def infer_family(unet_config: Mapping, has_text_encoder_2: bool = False) -> str:
    """``"sdxl"`` for a UNet with SDXL's added conditioning (``addition_embed_type: text_time``) or a second
    text encoder, ``"sd2"`` for 1024-wide cross attention, else ``"sd1"``."""
    if unet_config.get("addition_embed_type") == "text_time" or has_text_encoder_2:
        return "sdxl"
    return "sd2" if unet_config.get("cross_attention_dim") == 1024 else "sd1"


def base_model_spec(
    unet: nn.Module,
    text_encoder: nn.Module | None = None,
    family: str | None = None,
    *,
    text_encoder_2: nn.Module | None = None,
    name: str = "",
) -> BaseModelSpec:
    """Spec of loaded (or meta-device) models; ``family`` defaults to ``infer_family`` of the UNet's config."""
    modules = component_modules("unet", unet)
    for component, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None:
            modules.update(component_modules(component, model))
    if family is None:
        family = infer_family(dict(getattr(unet, "config", {})), text_encoder_2 is not None)
    return BaseModelSpec(family=family, modules=modules, name=name)


def base_model_spec_from_configs(
    unet_config: dict,
    text_encoder_config: dict | None = None,
    family: str | None = None,
    *,
    text_encoder_2_config: dict | None = None,
    name: str = "",
) -> BaseModelSpec:
    """Spec from a ``UNet2DConditionModel`` config and ``CLIPTextConfig`` dicts, built on the meta device
    (``text_encoder_2_config``: SDXL's ``CLIPTextModelWithProjection``)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        text_encoder = text_encoder_2 = None
        if text_encoder_config is not None:
            text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config))
        if text_encoder_2_config is not None:
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_encoder_2_config))
    if family is None:
        family = infer_family(unet_config, text_encoder_2 is not None)
    return base_model_spec(unet, text_encoder, family, text_encoder_2=text_encoder_2, name=name)


def _read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def base_model_spec_from_dir(model_dir: str | Path, family: str | None = None) -> BaseModelSpec:
    """Spec of a diffusers model directory, from the ``config.json`` of ``unet``, ``text_encoder`` and (SDXL)
    ``text_encoder_2`` only.

    ``family`` defaults to ``infer_family``: ``"sdxl"`` for SDXL's UNet, ``"sd2"`` for 1024-wide cross
    attention, else ``"sd1"``. The spec's ``name`` is the builtin model's name (``tiny-sdxl``) or the
    directory's.
    """
    model_dir = Path(model_dir)
    unet_config = _read_config(model_dir / "unet" / "config.json")
    if unet_config is None:
        raise ValueError(
            f"{str(model_dir)!r} is not a diffusers model directory: {model_dir / 'unet' / 'config.json'} is missing"
        )
    index_path = model_dir / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    return base_model_spec_from_configs(
        unet_config,
        _read_config(model_dir / "text_encoder" / "config.json"),
        family,
        text_encoder_2_config=_read_config(model_dir / "text_encoder_2" / "config.json"),
        name=index.get("_lorafleet_builtin") or model_dir.name,
    )


def get_module(model: nn.Module, component_path: str) -> nn.Module:
    """The live module for a canonical path within one component.

    ``component_path`` is the name without its component prefix, e.g.
    ``text_model.encoder.layers.0.self_attn.q_proj``; the ``text_model.``
    prefix is dropped for a flattened ``CLIPTextModel``.
    """
    if component_path.startswith(TEXT_MODEL_PREFIX) and not hasattr(model, "text_model"):
        component_path = component_path.removeprefix(TEXT_MODEL_PREFIX)
    return model.get_submodule(component_path)


def spec_modules_for(spec: BaseModelSpec, component: str) -> dict[str, ModuleShape]:
    prefix = component + "."
    return {name[len(prefix) :]: shape for name, shape in spec.modules.items() if name.startswith(prefix)}
