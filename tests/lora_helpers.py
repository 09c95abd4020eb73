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
