"""The frozen base model with trainable PEFT LoRA layers, and their diffusers-format file.

The UNet gets its adapter through diffusers' PEFT integration
(``unet.add_adapter``); each text encoder (SDXL: both) through
``peft.inject_adapter_in_model`` (transformers' own ``add_adapter`` needs a
newer peft). Weights are saved as the model kind's pipeline writes them
(``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.save_lora_weights``:
keys under ``unet.``, ``text_encoder.``, ``text_encoder_2.``), with each
``LoraConfig`` in the header, so a checkpoint's LoRA file loads in diffusers
as it is, and the registry converts it exactly as it converts any upload.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from deployments.engine import models

from .conditioning import TOKENIZER_OF, strategy_for
from .config import TrainingConfig
from .data import derive_seed

LORA_FILE = "pytorch_lora_weights.safetensors"


def _lora_config(config: TrainingConfig, targets: tuple[str, ...]):
    from peft import LoraConfig

    # Gaussian A, zero B: the adapter starts as the identity, as in diffusers' training scripts.
    return LoraConfig(
        r=config.rank, lora_alpha=config.lora_alpha, target_modules=list(targets), init_lora_weights="gaussian"
    )


def _json_ready(config_dict: dict) -> dict:
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config_dict.items()}


class LoRAModel:
    """Tokenizers, text encoders, UNet and VAE in float32 on ``device``; only the LoRA weights train.

    ``kind`` is the model's (``ModelInfo.kind``): ``"sd1"`` has one text encoder, ``"sdxl"`` two
    (``text_encoder_parts``); ``train_text_encoder`` puts a LoRA on each of them.
    """

    def __init__(self, model_dir: Path, config: TrainingConfig, device: torch.device, kind: str = "sd1"):
        from peft import inject_adapter_in_model

        self.device = device
        self.kind = kind
        self.pipeline_class = strategy_for(kind).PIPELINE
        self.text_encoder_parts = strategy_for(kind).TEXT_ENCODERS
        self.tokenizers = {p: models.load_tokenizer(model_dir, TOKENIZER_OF[p]) for p in self.text_encoder_parts}
        self.text_encoders = {
            p: models.load_text_encoder(model_dir, device, torch.float32, p) for p in self.text_encoder_parts
        }
        self.unet = models.load_unet(model_dir, device, torch.float32)
        self.vae = models.load_vae(model_dir, device, torch.float32)  # float32: SDXL's VAE overflows in float16
        self.lora_configs = {"unet": _lora_config(config, config.target_modules)}
        if config.train_text_encoder:
            for part in self.text_encoder_parts:
                self.lora_configs[part] = _lora_config(config, config.text_encoder_target_modules)
        # The initial LoRA weights depend on the seed only, never on what ran before in this process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, "lora-init"))
            self.unet.add_adapter(self.lora_configs["unet"])
            if config.train_text_encoder:
                for part in self.text_encoder_parts:
                    inject_adapter_in_model(self.lora_configs[part], self.text_encoders[part])
        self.components = {"unet": self.unet, **self.text_encoders}
        for name, module in self.components.items():
            for param_name, param in module.named_parameters():
                param.requires_grad_(name in self.lora_configs and ".lora_" in param_name)
        self.unet.train()
        for encoder in self.text_encoders.values():
            encoder.train(config.train_text_encoder)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable LoRA weights, in a fixed order (the optimizer state depends on it)."""
        return [p for name in self.lora_configs for p in self.components[name].parameters() if p.requires_grad]

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """PEFT state dicts (``<path>.lora_A.weight``) per trained component, on the CPU."""
        from peft.utils import get_peft_model_state_dict

        return {
            name: {
                k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(self.components[name]).items()
            }
            for name in self.lora_configs
        }

    def save(self, directory: Path) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` (diffusers layout, LoraConfigs in the header)."""
        import diffusers

        kwargs = {}
        for name, state in self.state_dicts().items():
            kwargs[f"{name}_lora_layers"] = state
            kwargs[f"{name}_lora_adapter_metadata"] = self._metadata(name)
        pipeline = getattr(diffusers, self.pipeline_class)
        pipeline.save_lora_weights(str(directory), weight_name=LORA_FILE, **kwargs)
        return Path(directory) / LORA_FILE

    def _metadata(self, component: str) -> dict:
        return _json_ready(self.lora_configs[component].to_dict())

    def load(self, path: Path) -> None:
        """Load LoRA weights saved by ``save`` into the live layers (in place, so wrappers such as DDP keep them).

        Checks every key first, so a file from another run changes nothing.
        """
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        state = safetensors.torch.load_file(str(path), device="cpu")
        by_component: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.lora_configs}
        for key, tensor in state.items():
            component, _, rest = key.partition(".")
            if component not in by_component:
                raise ValueError(f"{path}: {key} is for {component!r}, which this run does not train")
            by_component[component][rest] = tensor
        for name, component_state in by_component.items():
            expected = set(get_peft_model_state_dict(self.components[name]))
            if set(component_state) != expected:
                missing, unexpected = sorted(expected - set(component_state)), sorted(set(component_state) - expected)
                raise ValueError(
                    f"{path}: the {name} LoRA weights do not fit this run's layers "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
        for name, component_state in by_component.items():
            set_peft_model_state_dict(self.components[name], component_state)
