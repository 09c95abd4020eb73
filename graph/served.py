"""The base models one ingress serves, and how a request picks one.

A ``ServedModel`` is what the ingress knows of one base model: its name and kind, its limits (``max_side:
auto`` made a number for it), its tokenizer, its adapters (a resolver over the shared registry, bound to
this base) and its planner. ``ServedModels`` picks one by the request's ``model`` (none: the default, the
first configured) and lists them all for ``GET /v1/models``::

    served = ServedModels.open(config)                 # every model in config.served_models()
    served.pick("tiny-sdxl").planner.check_inputs(request)
    served.pick("nope")   # FieldError 404 model_not_found: unknown model 'nope'; served: 'tiny-sd', 'tiny-sdxl'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from deployments.engine import models
from deployments.engine.adapters import open_model_registry
from deployments.engine.models import ModelInfo
from deployments.engine.schedulers import SCHEDULER_NAMES
from lora_registry.base_model import BaseModelSpec

from .adapters_api import AdapterResolver
from .config import AppConfig, LimitsConfig, ServedModelConfig
from .errors import FieldError
from .planning import Planner
from .style_inputs import StyleSupport


@dataclass
class ServedModel:
    name: str
    uri: str  # where its weights are stored: shown to the admin token only
    info: ModelInfo
    limits: LimitsConfig  # the app's limits with max_side a number for this model
    tokenizer: Any
    base_spec: BaseModelSpec
    resolver: AdapterResolver
    planner: Planner

    @classmethod
    def open(cls, served: ServedModelConfig, config: AppConfig) -> ServedModel:
        """Read the model's description and tokenizer (no weights) and open the registry for its base."""
        directory = models.resolve_model_dir(served.model.uri, served.model.cache_dir)
        info = models.read_model_info(served.model.uri, directory)
        name = served.name or info.name
        tokenizer = models.load_tokenizer(directory)
        registry, spec = open_model_registry(config.registry, directory, config.lora)
        resolver = AdapterResolver(registry, spec, config.lora, served_kind=info.kind, served_name=name)
        style = None
        if served.model.ip_adapter is not None:  # IP-Adapter: per-block scales are checked against the UNet's layout
            unet_config = json.loads((directory / "unet" / "config.json").read_text())
            style = StyleSupport.of_unet_config(unet_config, served.model.ip_adapter.variant)
        planner = Planner(info, name, config.limits, tokenizer, resolver, style=style)
        limits = config.limits.for_model(info.default_side)
        return cls(name, served.model.uri, info, limits, tokenizer, spec, resolver, planner)

    def describe(self, created: int, admin: bool) -> dict:
        """Its ``GET /v1/models`` entry: kind (``sd1``, ``sdxl``), family (``sdxl-inpaint``, ...), native size
        (the default), largest size, its own scheduler and every scheduler name it takes, whether it takes a
        ``style_image`` (IP-Adapter); ``uri`` only for the admin token."""
        side, max_side = self.info.default_side, self.limits.max_side
        entry = {
            "id": self.name,
            "object": "model",
            "created": created,
            "owned_by": "lorafleet",
            "kind": self.info.kind,
            "family": self.info.family,
            "inpainting": self.info.inpainting,
            "default_size": f"{side}x{side}",
            "max_size": f"{max_side}x{max_side}",
            "default_scheduler": self.info.scheduler_class,
            "schedulers": list(SCHEDULER_NAMES),  # its scheduler field's names (engine/schedulers.py): all of them
            "style_image": self.planner.style is not None,  # served with IP-Adapter (model.ip_adapter)
        }
        if admin:
            entry["uri"] = self.uri
        return entry


class ServedModels:
    """Every base model behind the ingress, the default (first) one first."""

    def __init__(self, served: list[ServedModel]):
        if not served:
            raise ValueError("an ingress serves at least one model")
        self.all = list(served)
        self.by_name = {m.name: m for m in served}
        if len(self.by_name) != len(served):
            names = [m.name for m in served]
            raise ValueError(f"two models share a name: {sorted({n for n in names if names.count(n) > 1})}")
        self.default = served[0]
        # Each resolver knows the other bases, so an adapter made for one gets a 422 naming both models.
        bases = {m.base_spec.fingerprint: m.name for m in served}
        for m in served:
            m.resolver.served_bases = bases

    @classmethod
    def open(cls, config: AppConfig) -> ServedModels:
        return cls([ServedModel.open(served, config) for served in config.served_models()])

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.all]

    def pick(self, name: str | None, field: str = "model") -> ServedModel:
        """The model ``name`` names, or the default for None; else 404 ``model_not_found`` on ``field``."""
        if name is None:
            return self.default
        model = self.by_name.get(name)
        if model is None:
            raise FieldError(
                404,
                "model_not_found",
                field,
                "unknown {field} {value!r}; served: {served}",
                value=name,
                served=", ".join(repr(n) for n in self.names),
            )
        return model
