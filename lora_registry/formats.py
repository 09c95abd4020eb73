"""Recognise a LoRA file's key layout and map every key onto the base model (header only, no data).

Two families of files are accepted:

- ``diffusers``: what diffusers / PEFT write, e.g.
  ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (``pytorch_lora_weights.safetensors``),
  ``text_encoder.<path>...`` and SDXL's ``text_encoder_2.<path>...`` (with or without
  ``text_model.``), unprefixed PEFT keys (``base_model.model.<path>...``),
  and the older ``<path>.lora.down.weight``, ``...processor.to_q_lora.down.weight``
  and ``...lora_linear_layer.down.weight`` styles.
- ``kohya`` (kohya-ss sd-scripts, A1111, Civitai): ``lora_unet_<path with _>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``; ``lora_te_`` / ``lora_te1_`` for the text encoder, ``lora_te2_``
  for SDXL's second; SDXL UNet paths in diffusers or LDM naming (``BaseModelSpec.kohya_names``).

The result is a ``ConversionPlan``: for each canonical module, which source
keys hold ``A`` (down), ``B`` (up) and alpha, or the alpha value taken from
the PEFT config. Keys that fit no module of the base model are an
``InvalidAdapterError`` naming the first of them.

Alpha for diffusers files, first match wins: the ``adapter_config.json`` given
with the upload (PEFT ``lora_alpha``, ``alpha_pattern``, ``use_rslora``); the
``lora_adapter_metadata`` JSON that diffusers' ``save_lora_weights(...,
unet_lora_adapter_metadata=...)`` stores in the safetensors header; ``.alpha``
tensors; else ``alpha = r`` (diffusers' own convention: scale 1).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .base_model import OUTSIDE_TEXT_MODEL, TEXT_COMPONENTS, TEXT_MODEL_PREFIX, BaseModelSpec
from .errors import InvalidAdapterError, keys_phrase

SOURCE_FORMATS = ("diffusers", "kohya")
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PEFT_DEFAULT_ALPHA = 8.0  # peft.LoraConfig's default lora_alpha

_KOHYA_RE = re.compile(r"^(lora_(?:unet|te|te1|te2)_[A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_KOHYA_ROLES = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}

# (suffix regex, role, module-path rewrite) for diffusers / PEFT keys, tried in order.
_DIFFUSERS_SUFFIXES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^(?P<m>.+)\.lora_A\.weight$"), "A"),
    (re.compile(r"^(?P<m>.+)\.lora_B\.weight$"), "B"),
    (re.compile(r"^(?P<m>.+)\.lora\.down\.weight$"), "A"),
    (re.compile(r"^(?P<m>.+)\.lora\.up\.weight$"), "B"),
    (re.compile(r"^(?P<m>.+)\.lora_linear_layer\.down\.weight$"), "A"),
    (re.compile(r"^(?P<m>.+)\.lora_linear_layer\.up\.weight$"), "B"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha"),
]
# Attention-processor LoRA (diffusers < 0.20): "<attn>.processor.to_q_lora.down.weight" -> "<attn>.to_q".
_PROCESSOR_RE = re.compile(
    r"^(?P<attn>.+?)\.(?:processor\.)?(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<d>down|up)\.weight$"
)
_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_DORA_MARKERS = ("lora_magnitude_vector", "dora_scale")


@dataclass
class ModulePlan:
    module: str  # canonical name, "unet.<path>" / "text_encoder.<path>" / "text_encoder_2.<path>"
    a_key: str | None = None
    b_key: str | None = None
    alpha_key: str | None = None  # a tensor holding alpha
    alpha: float | None = None  # from the PEFT config / header metadata; wins over alpha_key
    rslora: bool = False  # PEFT use_rslora: scale is alpha / sqrt(r)

    @property
    def keys(self) -> list[str]:
        return [k for k in (self.a_key, self.b_key, self.alpha_key) if k is not None]


@dataclass
class ConversionPlan:
    source_format: str
    modules: dict[str, ModulePlan]


def detect_format(keys: Iterable[str]) -> str:
    """``"kohya"`` or ``"diffusers"`` from the key names; ``InvalidAdapterError`` if neither or both."""
    keys = list(keys)
    kohya = [k for k in keys if k.startswith("lora_") and (".lora_down." in k or ".lora_up." in k)]
    diffusers = [k for k in keys if any(p.match(k) for p, role in _DIFFUSERS_SUFFIXES if role != "alpha")]
    diffusers += [k for k in keys if _PROCESSOR_RE.match(k)]
    if kohya and diffusers:
        raise InvalidAdapterError(
            f"file mixes kohya keys ({keys_phrase(kohya)}) with diffusers/PEFT keys ({keys_phrase(diffusers)})",
            code="unknown_format",
            keys=kohya[:2] + diffusers[:3],
        )
    if kohya:
        return "kohya"
    if diffusers:
        return "diffusers"
    if any(marker in k for k in keys for marker in ("hada_", "lokr_", "oft_")):
        raise InvalidAdapterError(
            "LoHa / LoKr / OFT adapters are not supported; only LoRA (down/up) weights are",
            code="unsupported_keys",
            keys=[k for k in keys if any(m in k for m in ("hada_", "lokr_", "oft_"))],
        )
    raise InvalidAdapterError(
        "no LoRA weights found: expected diffusers/PEFT keys (*.lora_A.weight / *.lora_B.weight) or kohya keys "
        f"(lora_unet_*.lora_down.weight / .lora_up.weight); first keys: {keys_phrase(sorted(keys))}",
        code="unknown_format",
        keys=sorted(keys),
    )


def plan_conversion(
    keys: Iterable[str],
    metadata: dict[str, str],
    spec: BaseModelSpec,
    adapter_config: dict | None = None,
    source_format: str | None = None,
) -> ConversionPlan:
    """Map every key of a LoRA file onto the canonical modules of ``spec``; see the module docstring."""
    keys = sorted(keys)
    detected = detect_format(keys)
    if source_format is not None:
        if source_format not in SOURCE_FORMATS:
            raise InvalidAdapterError(
                f"source_format must be one of {SOURCE_FORMATS}, got {source_format!r}", code="invalid_format"
            )
        if source_format != detected:
            raise InvalidAdapterError(
                f"source_format is {source_format!r} but the keys are {detected!r} keys", code="format_mismatch"
            )
    dora = [k for k in keys if any(m in k for m in _DORA_MARKERS)]
    if dora:
        raise InvalidAdapterError(
            f"DoRA adapters are not supported (magnitude vectors in {keys_phrase(dora)})",
            code="dora_unsupported",
            keys=dora,
        )
    if detected == "kohya":
        plans = _plan_kohya(keys, spec)
    else:
        plans = _plan_diffusers(keys, spec)
        _apply_peft_alphas(plans, _peft_configs(metadata, adapter_config))
    incomplete = [p.module for p in plans.values() if p.a_key is None or p.b_key is None]
    if incomplete:
        raise InvalidAdapterError(
            f"modules without both a down (A) and an up (B) weight: {keys_phrase(incomplete)}",
            code="incomplete_pairs",
            keys=incomplete,
        )
    return ConversionPlan(source_format=detected, modules=dict(sorted(plans.items())))


def _assign(plans: dict[str, ModulePlan], module: str, role: str, key: str, duplicates: list[str]) -> None:
    plan = plans.setdefault(module, ModulePlan(module=module))
    attr = {"A": "a_key", "B": "b_key", "alpha": "alpha_key"}[role]
    if getattr(plan, attr) is not None:
        duplicates.append(key)
    setattr(plan, attr, key)


def _raise_unmapped(unsupported: list[str], unknown: list[str], duplicates: list[str], spec: BaseModelSpec) -> None:
    if unsupported:
        raise InvalidAdapterError(
            f"unsupported tensors (not LoRA down/up/alpha): {keys_phrase(unsupported)}",
            code="unsupported_keys",
            keys=unsupported,
        )
    if unknown:
        raise InvalidAdapterError(
            f"{len(unknown)} keys match no Linear/Conv2d module of the base model "
            f"({spec.label}, fingerprint {spec.fingerprint}): {keys_phrase(unknown)}",
            code="unknown_modules",
            keys=unknown,
        )
    if duplicates:
        raise InvalidAdapterError(
            f"several keys map onto the same module weight: {keys_phrase(duplicates)}",
            code="duplicate_keys",
            keys=duplicates,
        )


def _plan_kohya(keys: list[str], spec: BaseModelSpec) -> dict[str, ModulePlan]:
    plans: dict[str, ModulePlan] = {}
    unsupported, unknown, duplicates = [], [], []
    for key in keys:
        m = _KOHYA_RE.match(key)
        if m is None:
            unsupported.append(key)
            continue
        module = spec.kohya_names.get(m.group(1))
        if module is None:
            unknown.append(key)
            continue
        _assign(plans, module, _KOHYA_ROLES[m.group(2)], key, duplicates)
    _raise_unmapped(unsupported, unknown, duplicates, spec)
    return plans


def _split_component(path: str) -> tuple[str | None, str]:
    """``"unet.x"`` -> ``("unet", "x")``; unprefixed paths are inferred from their first segment."""
    path = path.removeprefix("base_model.model.")
    for component in ("unet", *TEXT_COMPONENTS):
        if path.startswith(component + "."):
            return component, path[len(component) + 1 :]
    if path.startswith("transformer."):
        return None, path
    if path.startswith((TEXT_MODEL_PREFIX, "encoder.layers.", "embeddings.", "final_layer_norm")):
        return "text_encoder", path
    return "unet", path


def _canonical_module(raw: str, spec: BaseModelSpec) -> str | None:
    component, path = _split_component(raw)
    if component is None:
        return None
    if component in TEXT_COMPONENTS and not path.startswith(TEXT_MODEL_PREFIX) and path not in OUTSIDE_TEXT_MODEL:
        path = TEXT_MODEL_PREFIX + path
    name = f"{component}.{path}"
    return name if name in spec.modules else None


def _plan_diffusers(keys: list[str], spec: BaseModelSpec) -> dict[str, ModulePlan]:
    plans: dict[str, ModulePlan] = {}
    unsupported, unknown, duplicates = [], [], []
    for key in keys:
        raw, role = _diffusers_module(key)
        if raw is None:
            unsupported.append(key)
            continue
        module = _canonical_module(raw, spec)
        if module is None:
            unknown.append(key)
            continue
        _assign(plans, module, role, key, duplicates)
    _raise_unmapped(unsupported, unknown, duplicates, spec)
    return plans


def _diffusers_module(key: str) -> tuple[str | None, str]:
    m = _PROCESSOR_RE.match(key)
    if m is not None:
        attn, proj = m.group("attn"), m.group("proj")
        is_te = _split_component(attn)[0] in TEXT_COMPONENTS
        return f"{attn}.{(_TE_PROJ if is_te else _UNET_PROJ)[proj]}", "A" if m.group("d") == "down" else "B"
    for pattern, role in _DIFFUSERS_SUFFIXES:
        m = pattern.match(key)
        if m is not None:
            return m.group("m"), role
    return None, ""


def _peft_configs(metadata: dict[str, str], adapter_config: dict | None) -> dict[str, dict] | None:
    """Per-component PEFT LoraConfig dicts, from the explicit config or the header metadata; None if neither."""
    if adapter_config is not None:
        if not isinstance(adapter_config, dict):
            raise InvalidAdapterError(
                "adapter_config must be a JSON object (PEFT adapter_config.json)", code="invalid_config"
            )
        return {component: adapter_config for component in ("unet", *TEXT_COMPONENTS)}
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if raw is None:
        return None
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidAdapterError(
            f"header metadata {LORA_ADAPTER_METADATA_KEY!r} is not JSON: {e}", code="invalid_config"
        ) from e
    if not isinstance(flat, dict):
        raise InvalidAdapterError(
            f"header metadata {LORA_ADAPTER_METADATA_KEY!r} is not a JSON object", code="invalid_config"
        )
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _apply_peft_alphas(plans: dict[str, ModulePlan], configs: dict[str, dict] | None) -> None:
    if configs is None:
        return  # alpha from .alpha tensors, else alpha = r
    for plan in plans.values():
        component, _, path = plan.module.partition(".")
        config = configs.get(component)
        if config is None:
            continue
        if config.get("use_dora"):
            raise InvalidAdapterError(
                f"DoRA adapters are not supported ({component} config has use_dora: true)", code="dora_unsupported"
            )
        alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
        patterns = config.get("alpha_pattern") or {}
        for candidate in (path.removeprefix(TEXT_MODEL_PREFIX), path):
            hit = _pattern_key(patterns, candidate)
            if hit is not None:
                alpha = patterns[hit]
                break
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise InvalidAdapterError(
                f"{component} config: lora_alpha {alpha!r} is not a number", code="invalid_config"
            )
        plan.alpha = float(alpha)
        plan.rslora = bool(config.get("use_rslora", False))


def _pattern_key(patterns: dict, module_path: str) -> str | None:
    """PEFT's rule (``peft.utils.other.get_pattern_key``): a pattern matches a dotted suffix of the path."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return pattern
    return None
