"""Make real LoRA files for the tiny model with peft (non-zero init, so a wrong adapter cannot pass)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_peft_lora_file(
    tiny,
    directory: Path,
    *,
    seed: int,
    rank: int,
    alpha: float,
    unet_targets: list[str],
    text_targets: list[str] | None = None,
) -> Path:
    """A diffusers ``pytorch_lora_weights.safetensors`` written by ``save_lora_weights``, alpha in its metadata."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = copy.deepcopy(tiny["unet"])
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=unet_targets, init_lora_weights=False)
    unet.add_adapter(config)
    kwargs = {
        "unet_lora_layers": get_peft_model_state_dict(unet),
        "unet_lora_adapter_metadata": config.to_dict(),
    }
    if text_targets:
        te_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=text_targets, init_lora_weights=False)
        from peft import inject_adapter_in_model

        te = inject_adapter_in_model(te_config, copy.deepcopy(tiny["text_encoder"]))
        kwargs["text_encoder_lora_layers"] = get_peft_model_state_dict(te)
        kwargs["text_encoder_lora_adapter_metadata"] = te_config.to_dict()
    for cfg_key in ("unet_lora_adapter_metadata", "text_encoder_lora_adapter_metadata"):
        if cfg_key in kwargs:
            kwargs[cfg_key] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in kwargs[cfg_key].items()}
    directory.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(directory, **kwargs)
    return directory / "pytorch_lora_weights.safetensors"


def peft_to_kohya_file(peft_file: Path, out: Path, alpha: float) -> Path:
    """The same weights as a kohya/A1111 ("Civitai") file: lora_down / lora_up / alpha keys."""
    import safetensors.torch

    state = safetensors.torch.load_file(str(peft_file))
    kohya = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        path, _, role = rest.rpartition(".lora_")
        role = role.removesuffix(".weight")
        if component == "unet":
            name = "lora_unet_" + path.replace(".", "_")
        else:
            if not path.startswith("text_model."):
                path = "text_model." + path
            name = "lora_te_" + path.replace(".", "_")
        kohya[f"{name}.{'lora_down' if role == 'A' else 'lora_up'}.weight"] = tensor.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha))
    out.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(kohya, str(out))
    return out


def random_slot_weights(lora, rank: int, generator, scale: float = 1.0, alpha: float | None = None) -> dict:
    """``{module path: (A [rank, ...], B [out, rank, ...], alpha)}`` for every layer of a ``MultiLoRAModel``."""
    import torch

    weights = {}
    for path, (a_shape, b_shape) in lora.module_shapes().items():
        A = scale * torch.randn(rank, *a_shape[1:], generator=generator)
        B = scale * torch.randn(b_shape[0], rank, *b_shape[2:], generator=generator)
        weights[path] = (A, B, float(rank if alpha is None else alpha))
    return weights


# -- SDXL kohya files (issue 17) ----------------------------------------------------------------------------------

# deployments/engine/config.py LoRAConfig.unet_target_modules / text_encoder_target_modules (the served slots).
SDXL_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
SDXL_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# LoCon (kohya's conv_dim) modules: resnet convs and linears, samplers, conv_in/out and the embedding MLPs. The
# serving config carries no slots for them, so only registry-level tests use them.
LOCON_TARGETS = (
    "conv1",
    "conv2",
    "time_emb_proj",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "conv_in",
    "conv_out",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
    "add_embedding.linear_1",
    "add_embedding.linear_2",
)
KOHYA_TEXT_PREFIX = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def _targeted(spec, component: str, targets) -> list[str]:
    prefix = component + "."
    return sorted(
        name for name in spec.modules if name.startswith(prefix) and name[len(prefix) :].endswith(tuple(targets))
    )


def kohya_sdxl_state(
    spec,
    *,
    convention: str = "ldm",
    seed: int = 0,
    rank: int = 4,
    unet_targets=SDXL_UNET_TARGETS,
    text_targets=SDXL_TEXT_TARGETS,
    text_2_targets=SDXL_TEXT_TARGETS,
    locon: bool = False,
    scale: float = 0.1,
) -> dict[str, torch.Tensor]:
    """A random, non-zero kohya SDXL LoRA state dict for the model of ``spec`` (a ``BaseModelSpec``).

    ``lora_unet_`` names in ``convention`` ``"ldm"`` (``input_blocks_4_1_...``, as kohya-ss sd-scripts writes
    SDXL LoRAs) or ``"diffusers"`` (``down_blocks_1_attentions_0_...``), ``lora_te1_`` / ``lora_te2_`` for the
    two text encoders; every module has ``lora_down`` ([r, in] / [r, in, kh, kw]), ``lora_up`` ([out, r] /
    [out, r, 1, 1]) and an ``alpha`` that varies between modules (r/2, r, 2r). ``locon`` adds ``LOCON_TARGETS``
    (conv and resnet modules). The LDM names come from ``spec.ldm_unet_names``, which
    ``test_registry_sdxl`` checks against diffusers' own SGM mapping.
    """
    if convention not in ("ldm", "diffusers"):
        raise ValueError(f"convention must be 'ldm' or 'diffusers', got {convention!r}")
    g = torch.Generator().manual_seed(seed)
    names: list[tuple[str, str]] = []  # (canonical module, kohya name)
    for name in _targeted(spec, "unet", tuple(unet_targets) + (LOCON_TARGETS if locon else ())):
        path = name.removeprefix("unet.")
        if convention == "ldm":
            path = spec.ldm_unet_names[path]
        names.append((name, "lora_unet_" + path.replace(".", "_")))
    for component, targets in (("text_encoder", text_targets), ("text_encoder_2", text_2_targets)):
        for name in _targeted(spec, component, targets):
            names.append((name, KOHYA_TEXT_PREFIX[component] + name.partition(".")[2].replace(".", "_")))
    state = {}
    for i, (name, kohya) in enumerate(names):
        shape = spec.modules[name]
        state[f"{kohya}.lora_down.weight"] = scale * torch.randn(shape.lora_a_shape(rank), generator=g)
        state[f"{kohya}.lora_up.weight"] = scale * torch.randn(shape.lora_b_shape(rank), generator=g)
        state[f"{kohya}.alpha"] = torch.tensor(rank * (0.5, 1.0, 2.0)[i % 3])
    return state


def write_kohya_sdxl_file(spec, path: Path, **kwargs) -> Path:
    """``kohya_sdxl_state(spec, **kwargs)`` saved as a safetensors file at ``path``."""
    import safetensors.torch

    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in kohya_sdxl_state(spec, **kwargs).items()}, str(path))
    return path


# diffusers-style kohya names diffusers' converter garbles (its SDXL "emb" rule drops linear_N's index); sd-scripts
# writes these modules as label_emb_0_0 / _2 (LDM), which it converts right.
_DIFFUSERS_MISNAMED = {
    "lora_unet_add_embedding_linear_1": "unet.add_embedding.linear_1",
    "lora_unet_add_embedding_linear_2": "unet.add_embedding.linear_2",
}
_OLD_UNET_ATTN = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_TE_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _peft_module(old_down_key: str) -> str:
    """diffusers' pre-PEFT LoRA key (what its kohya converter emits) -> the PEFT module name."""
    import re

    m = re.match(r"^(unet\..*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.down\.weight$", old_down_key)
    if m is not None:
        return f"{m.group(1)}.{_OLD_UNET_ATTN[m.group(2)]}"
    m = re.match(r"^(text_encoder(?:_2)?\..*)\.(to_q|to_k|to_v|to_out)_lora\.down\.weight$", old_down_key)
    if m is not None:
        return f"{m.group(1)}.{_OLD_TE_ATTN[m.group(2)]}"
    m = re.match(r"^(.*)\.lora(?:_linear_layer)?\.down\.weight$", old_down_key)
    if m is None:
        raise ValueError(f"unexpected converted key {old_down_key!r}")
    return m.group(1)


def kohya_module_to_diffusers(kohya: str, unet_config) -> str:
    """One kohya module name (``lora_unet_input_blocks_4_1_...``, ``lora_te2_...``) -> its diffusers/PEFT module
    name (``unet.down_blocks.1.attentions.0...``, ``text_encoder_2.text_model...``), by diffusers' own rules:
    ``_maybe_map_sgm_blocks_to_diffusers`` (SGM/LDM block numbers, from ``unet_config``) and
    ``_convert_non_diffusers_lora_to_diffusers`` (the rest), the code behind ``load_lora_weights`` for kohya
    files (private to diffusers 0.42.1: the reference, not something lorafleet calls)."""
    from types import SimpleNamespace

    if kohya in _DIFFUSERS_MISNAMED:
        return _DIFFUSERS_MISNAMED[kohya]

    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    one = {f"{kohya}.lora_down.weight": torch.zeros(1), f"{kohya}.lora_up.weight": torch.zeros(1)}
    one = _maybe_map_sgm_blocks_to_diffusers(one, SimpleNamespace(**dict(unet_config)))
    converted, _ = _convert_non_diffusers_lora_to_diffusers(one)
    (down,) = [k for k in converted if ".down." in k]
    return _peft_module(down)


def kohya_to_diffusers_state_dict(kohya_state: dict[str, torch.Tensor], unet_config) -> dict[str, torch.Tensor]:
    """A kohya LoRA state dict (SDXL or SD1, either UNet naming) as a diffusers/PEFT one:
    ``unet.<path>.lora_A.weight`` / ``.lora_B.weight``, ``text_encoder.<path>...``, ``text_encoder_2.<path>...``,
    with each module's ``alpha / r`` folded into ``lora_B`` (so no ``network_alphas``: diffusers' default
    alpha = r, scale 1, gives the same update).

    ``StableDiffusionXLPipeline.load_lora_weights`` accepts the result, all three components, and every
    module's update then equals the registry's canonical one (``test_registry_sdxl``). Load this rather than
    the kohya file itself: with diffusers 0.42.1 and transformers 5.24, loading the kohya file directly gives
    wrong updates for modules whose alpha differs from the file's most common alpha (``get_peft_kwargs``'
    alpha_pattern), e.g. about half the modules of ``kohya_sdxl_state``'s files. Module names follow diffusers'
    own conversion (``kohya_module_to_diffusers``), independent of lorafleet's registry.
    """
    out: dict[str, torch.Tensor] = {}
    for key in sorted(kohya_state):
        if not key.endswith(".lora_down.weight"):
            continue
        kohya = key.removesuffix(".lora_down.weight")
        down, up = kohya_state[key], kohya_state[f"{kohya}.lora_up.weight"]
        rank = down.shape[0]
        alpha_t = kohya_state.get(f"{kohya}.alpha")
        alpha = float(alpha_t) if alpha_t is not None else float(rank)
        module = kohya_module_to_diffusers(kohya, unet_config)
        if f"{module}.lora_A.weight" in out:
            raise ValueError(f"two kohya modules map onto {module!r}")
        out[f"{module}.lora_A.weight"] = down.contiguous()
        out[f"{module}.lora_B.weight"] = (up * (alpha / rank)).contiguous()
    return out


# -- LyCORIS files (issue 18): peft LoHa / LoKr adapters exported in LyCORIS's kohya-named layout -----------------

LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def peft_lycoris_model(model, config, seed: int):
    """A deep copy of ``model`` with a peft LoHa / LoKr adapter (``config``: ``LoHaConfig`` / ``LoKrConfig`` with
    ``init_weights=False``, so every factor is non-zero) injected as ``"default"``."""
    from peft import inject_adapter_in_model

    torch.manual_seed(seed)
    return inject_adapter_in_model(config, copy.deepcopy(model))


def lycoris_layers(model) -> dict:
    """``{module path: peft LoHa / LoKr layer}`` of a model made by ``peft_lycoris_model``."""
    from peft.tuners.loha.layer import LoHaLayer
    from peft.tuners.lokr.layer import LoKrLayer

    return {path: m for path, m in model.named_modules() if isinstance(m, (LoHaLayer, LoKrLayer))}


def export_lycoris_state(model, prefix: str = "lora_unet_", weight_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A peft LoHa / LoKr model's weights as a LyCORIS file: ``<prefix><path with _>.hada_w1_a`` ... / ``.lokr_w1``
    ..., ``.alpha``. LyCORIS applies a LoKr whose two Kronecker factors are both full at scale 1 (alpha ignored)
    where peft applies ``alpha / r``: such a module gets peft's scale folded into ``lokr_w2``, as LyCORIS's own
    ``custom_state_dict`` folds its scalar. ``weight_scale`` multiplies the first factor (to keep updates small)."""
    from peft.tuners.loha.layer import LoHaLayer

    state = {}
    for path, layer in lycoris_layers(model).items():
        name = prefix + path.replace(".", "_")
        roles = LOHA_ROLES if isinstance(layer, LoHaLayer) else LOKR_ROLES
        tensors = {r: getattr(layer, r)["default"].detach().clone() for r in roles if "default" in getattr(layer, r)}
        first = "hada_w1_a" if "hada_w1_a" in tensors else "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
        tensors[first] = tensors[first] * weight_scale
        alpha = float(layer.alpha["default"])
        if "lokr_w1" in tensors and "lokr_w2" in tensors:
            tensors["lokr_w2"] = tensors["lokr_w2"] * layer.scaling["default"]
        for role, t in tensors.items():
            state[f"{name}.{role}"] = t.contiguous()
        state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def scale_first_factor(model, weight_scale: float) -> None:
    """Multiply each peft LoHa / LoKr layer's first factor by ``weight_scale``, in place (the model then matches
    ``export_lycoris_state(model, weight_scale=...)``)."""
    with torch.no_grad():
        for layer in lycoris_layers(model).values():
            for role in ("hada_w1_a", "lokr_w1", "lokr_w1_a"):
                params = getattr(layer, role, {})
                if "default" in params:
                    params["default"].mul_(weight_scale)
                    break


def tucker_locon_state(spec, *, seed: int, rank: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A kohya/LyCORIS LoCon file for the model of ``spec``: Tucker (``lora_down [r, in, 1, 1]``, ``lora_mid
    [r, r, kh, kw]``, ``lora_up [out, r, 1, 1]``) on every k x k UNet conv, plain LoCon (``lora_down [r, in, 1,
    1]``) on every 1x1 conv and plain LoRA on the resnets' linears (``time_emb_proj``); alphas vary."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (name, shape) in enumerate(sorted(spec.modules.items())):
        component, _, path = name.partition(".")
        if component != "unet" or not path.endswith(LOCON_TARGETS):
            continue
        kohya = "lora_unet_" + path.replace(".", "_")
        out, inp, kernel = shape.out_features, shape.in_features, shape.kernel_size
        if shape.kind == "conv2d":
            state[f"{kohya}.lora_down.weight"] = scale * torch.randn(rank, inp, 1, 1, generator=g)
            state[f"{kohya}.lora_up.weight"] = scale * torch.randn(out, rank, 1, 1, generator=g)
            if kernel != (1, 1):
                state[f"{kohya}.lora_mid.weight"] = scale * torch.randn(rank, rank, *kernel, generator=g)
        else:
            state[f"{kohya}.lora_down.weight"] = scale * torch.randn(rank, inp, generator=g)
            state[f"{kohya}.lora_up.weight"] = scale * torch.randn(out, rank, generator=g)
        state[f"{kohya}.alpha"] = torch.tensor(rank * (0.5, 1.0, 2.0)[i % 3])
    return state
