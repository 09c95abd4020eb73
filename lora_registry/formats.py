"""Recognise a LoRA file's key layout and map every key onto the base model (header only, no data).

Two families of files are accepted:

- ``diffusers``: what diffusers / PEFT write, e.g.
  ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (``pytorch_lora_weights.safetensors``),
  ``text_encoder.<path>...`` and SDXL's ``text_encoder_2.<path>...`` (with or without
  ``text_model.``), unprefixed PEFT keys (``base_model.model.<path>...``),
  and the older ``<path>.lora.down.weight``, ``...processor.to_q_lora.down.weight``
  and ``...lora_linear_layer.down.weight`` styles.
- ``kohya`` (kohya-ss sd-scripts, A1111, Civitai, LyCORIS): ``lora_unet_<path with _>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``; ``lora_te_`` / ``lora_te1_`` for the text encoder, ``lora_te2_``
  for SDXL's second; UNet paths in diffusers or LDM naming (``BaseModelSpec.kohya_names``). LyCORIS
  modules in the same naming: LoCon (convolutions), Tucker LoCon (``.lora_mid.weight``), LoHa
  (``.hada_w1_a`` ...), LoKr (``.lokr_w1`` ...), converted exactly by ``lycoris``.

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
from dataclasses import dataclass, field

from . import lycoris
from .base_model import OUTSIDE_TEXT_MODEL, TEXT_COMPONENTS, TEXT_MODEL_PREFIX, BaseModelSpec
from .errors import InvalidAdapterError, keys_phrase

SOURCE_FORMATS = ("diffusers", "kohya")
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PEFT_DEFAULT_ALPHA = 8.0  # peft.LoraConfig's default lora_alpha

_KOHYA_RE = re.compile(r"^(lora_(?:unet|te|te1|te2)_[A-Za-z0-9_]+)\.([A-Za-z0-9_.]+)$")
# kohya / LyCORIS tensor suffix -> role: A (down), B (up), alpha, or a LyCORIS tensor (``lycoris.ROLES``).
_KOHYA_ROLES = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha", **{r: r for r in lycoris.ROLES}}
_LYCORIS_MARKERS = (".hada_", ".lokr_", ".lora_mid.")

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
    # LyCORIS tensors besides down / up / alpha, role -> key: "lora_mid.weight", "hada_w1_a", "lokr_w1", ...
    parts: dict[str, str] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [k for k in (self.a_key, self.b_key, self.alpha_key) if k is not None] + list(self.parts.values())

    @property
    def algorithm(self) -> str:
        """``"lora"``, ``"tucker"`` (LoCon with ``lora_mid``), ``"loha"`` or ``"lokr"`` (``lycoris``)."""
        return lycoris.algorithm(set(self.parts))

    def role_keys(self) -> dict[str, str]:
        """Role -> key for every weight tensor (``"A"``, ``"B"`` and the LyCORIS roles), alpha excluded."""
        roles = {"A": self.a_key, "B": self.b_key, **self.parts}
        return {role: key for role, key in roles.items() if key is not None}


@dataclass
class ConversionPlan:
    source_format: str
    modules: dict[str, ModulePlan]


def detect_format(keys: Iterable[str]) -> str:
    """``"kohya"`` or ``"diffusers"`` from the key names; ``InvalidAdapterError`` if neither or both."""
    keys = list(keys)
    markers = (".lora_down.", ".lora_up.", *_LYCORIS_MARKERS)
    kohya = [k for k in keys if k.startswith("lora_") and any(m in k for m in markers)]
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
    lycoris_keys = [k for k in keys if any(m in k for m in ("hada_", "lokr_"))]
    if lycoris_keys:
        raise InvalidAdapterError(
            "LoHa / LoKr weights are accepted in the LyCORIS (kohya) key layout, lora_unet_<module>.hada_w1_a / "
            f".lokr_w1 ... (lora_te_ / lora_te1_ / lora_te2_ for text encoders); these keys are not: "
            f"{keys_phrase(lycoris_keys)}",
            code="unsupported_keys",
            keys=lycoris_keys,
        )
    oft = [k for k in keys if "oft_" in k]
    if oft:
        raise InvalidAdapterError(
            f"OFT / BOFT adapters are not supported (a rotation of the weight, no low-rank update): {keys_phrase(oft)}",
            code="unsupported_keys",
            keys=oft,
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
    configs = _peft_configs(metadata, adapter_config)
    _refuse_dora(keys, configs)
    if detected == "kohya":
        plans = _plan_kohya(keys, spec)
    else:
        plans = _plan_diffusers(keys, spec)
        _apply_peft_alphas(plans, configs)
    incomplete = []
    for p in plans.values():
        lacking = lycoris.missing(p.algorithm, set(p.parts), p.a_key is not None, p.b_key is not None)
        if lacking is not None:
            incomplete.append((p.module, lacking))
    if incomplete:
        detail = "; ".join(f"{m} needs {why}" for m, why in incomplete[:5])
        raise InvalidAdapterError(
            f"{len(incomplete)} modules have incomplete weights: {detail}",
            code="incomplete_pairs",
            keys=[m for m, _ in incomplete],
        )
    return ConversionPlan(source_format=detected, modules=dict(sorted(plans.items())))


def _refuse_dora(keys: list[str], configs: dict[str, dict] | None) -> None:
    """DoRA, in any of its forms, is refused: ``ΔW`` alone does not describe it (the magnitude rescales the
    whole weight, ``m · (W + s·ΔW) / ‖W + s·ΔW‖``, so it depends on the base weight's norm and on each request's
    scale s), and serving the LoRA part without the magnitude would be silently wrong."""
    dora = [k for k in keys if any(m in k for m in _DORA_MARKERS)]
    if dora:
        raise InvalidAdapterError(
            f"DoRA adapters are not supported: the magnitude ({keys_phrase(dora)}) rescales the whole weight, "
            "W' = m * (W + s*dW) / ||W + s*dW||, which depends on the base weight and on each request's scale s; "
            "serving dW without it would be silently wrong. Merge the DoRA into the base model, or retrain as LoRA",
            code="dora_unsupported",
            keys=dora,
        )
    for component, config in sorted((configs or {}).items()):
        if isinstance(config, dict) and config.get("use_dora"):
            raise InvalidAdapterError(
                f"DoRA adapters are not supported ({component} config has use_dora: true): the magnitude "
                "depends on the base weight and on each request's scale, and dropping it would be silently wrong",
                code="dora_unsupported",
            )


def _assign(plans: dict[str, ModulePlan], module: str, role: str, key: str, duplicates: list[str]) -> None:
    plan = plans.setdefault(module, ModulePlan(module=module))
    attr = {"A": "a_key", "B": "b_key", "alpha": "alpha_key"}.get(role)
    if attr is None:  # a LyCORIS tensor
        if role in plan.parts:
            duplicates.append(key)
        plan.parts[role] = key
        return
    if getattr(plan, attr) is not None:
        duplicates.append(key)
    setattr(plan, attr, key)


def _raise_unmapped(unsupported: list[str], unknown: list[str], duplicates: list[str], spec: BaseModelSpec) -> None:
    if unsupported:
        raise InvalidAdapterError(
            "unsupported tensors (not LoRA / LoCon down, up, mid or alpha, nor LoHa hada_* / LoKr lokr_* "
            f"weights): {keys_phrase(unsupported)}",
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
        if m is None or m.group(2) not in _KOHYA_ROLES:
            unsupported.append(key)
            continue
        module = spec.kohya_names.get(m.group(1))
        if module is None:
            unknown.append(key)
            continue
        _assign(plans, module, _KOHYA_ROLES[m.group(2)], key, duplicates)
    _raise_unmapped(unsupported, unknown, duplicates, spec)
    mixed = []
    for plan in plans.values():
        try:
            lycoris.algorithm(set(plan.parts))
        except ValueError as e:
            mixed.append(f"{plan.module} ({e})")
    if mixed:
        raise InvalidAdapterError(
            f"modules whose tensors mix LyCORIS algorithms: {keys_phrase(mixed)}",
            code="unsupported_keys",
            keys=[m.split(" ")[0] for m in mixed],
        )
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
