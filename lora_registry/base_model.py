"""What an adapter must fit: the LoRA-targetable modules of the base model and their shapes.

The registry validates every upload against a ``BaseModelSpec`` and records its
``fingerprint`` in the manifest. The spec lists every ``nn.Linear`` and
``nn.Conv2d`` of the UNet (component ``"unet"``) and the CLIP text encoder
(component ``"text_encoder"``) under canonical names::

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj

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
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

COMPONENTS = ("unet", "text_encoder")
TEXT_MODEL_PREFIX = "text_model."


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
    """``family`` (informational, e.g. ``"sd1"``) and ``modules``: canonical name -> ``ModuleShape``."""

    family: str
    modules: Mapping[str, ModuleShape]

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

        kohya writes ``lora_unet_`` / ``lora_te_`` (``lora_te1_``) plus the module
        path with every ``.`` replaced by ``_``. Building this table from the
        real module names makes the reverse mapping exact (no string guessing);
        a text-encoder name is reachable with and without ``text_model_``.
        """
        table: dict[str, str] = {}
        ambiguous: set[str] = set()
        for name in self.modules:
            component, _, path = name.partition(".")
            if component == "unet":
                aliases = [f"lora_unet_{path.replace('.', '_')}"]
            else:
                short = path.removeprefix(TEXT_MODEL_PREFIX).replace(".", "_")
                aliases = [f"{p}{q}{short}" for p in ("lora_te_", "lora_te1_") for q in ("text_model_", "")]
            for alias in aliases:
                if alias in table and table[alias] != name:
                    ambiguous.add(alias)
                table[alias] = name
        for alias in ambiguous:
            del table[alias]
        return table

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
    add_text_model = component == "text_encoder" and not hasattr(model, "text_model")
    out = {}
    for path, module in model.named_modules():
        shape = _module_shape(module)
        if shape is None:
            continue
        if add_text_model:
            path = TEXT_MODEL_PREFIX + path
        out[f"{component}.{path}"] = shape
    return out


def base_model_spec(unet: nn.Module, text_encoder: nn.Module | None = None, family: str = "sd1") -> BaseModelSpec:
    """Spec of loaded (or meta-device) models."""
    modules = component_modules("unet", unet)
    if text_encoder is not None:
        modules.update(component_modules("text_encoder", text_encoder))
    return BaseModelSpec(family=family, modules=modules)


def base_model_spec_from_configs(
    unet_config: dict, text_encoder_config: dict | None = None, family: str = "sd1"
) -> BaseModelSpec:
    """Spec from a ``UNet2DConditionModel`` config and a ``CLIPTextConfig`` dict, built on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        text_encoder = None
        if text_encoder_config is not None:
            text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config))
    return base_model_spec(unet, text_encoder, family=family)


def base_model_spec_from_dir(model_dir: str | Path, family: str | None = None) -> BaseModelSpec:
    """Spec of a diffusers model directory, from ``unet/config.json`` and ``text_encoder/config.json`` only.

    ``family`` defaults to ``"sd2"`` for a ``StableDiffusionPipeline`` with
    1024-wide cross attention, else ``"sd1"``; it is informational (the
    fingerprint is what must match).
    """
    model_dir = Path(model_dir)
    unet_path = model_dir / "unet" / "config.json"
    if not unet_path.is_file():
        raise ValueError(f"{str(model_dir)!r} is not a diffusers model directory: {unet_path} is missing")
    unet_config = {k: v for k, v in json.loads(unet_path.read_text()).items() if not k.startswith("_")}
    te_path = model_dir / "text_encoder" / "config.json"
    te_config = None
    if te_path.is_file():
        te_config = {k: v for k, v in json.loads(te_path.read_text()).items() if not k.startswith("_")}
    if family is None:
        family = "sd2" if unet_config.get("cross_attention_dim") == 1024 else "sd1"
    return base_model_spec_from_configs(unet_config, te_config, family=family)


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
