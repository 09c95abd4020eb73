"""SDXL LoRA: each image of a mixed batch equals StableDiffusionXLPipeline alone with ``load_lora_weights``
+ ``set_adapters(names, weights)``, for kohya files in both UNet naming conventions (LDM/SGM
``input_blocks_…`` as sd-scripts writes SDXL LoRAs, and diffusers-style ``down_blocks_…``) with
``lora_te1_`` and ``lora_te2_`` parts, at different scales, composed, and beside rows with none.

The reference loads the same weights converted to diffusers/PEFT keys by diffusers' own naming rules
(``lora_helpers.kohya_to_diffusers_state_dict``): diffusers 0.42.1 misapplies per-module alphas when it
loads such kohya files itself.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from deployments.engine.batch_invariance import make_batch_invariant
from deployments.engine.multi_lora import MultiLoRAModel, text_encoder_key_prefix
from lora_registry.base_model import base_model_spec_from_dir
from lora_registry.validation import prepare_adapter

from engine_helpers import SDXLEngine
from lora_helpers import SDXL_TEXT_TARGETS, SDXL_UNET_TARGETS, kohya_sdxl_state, kohya_to_diffusers_state_dict

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def kohya(tiny_sdxl_dir):
    spec = base_model_spec_from_dir(tiny_sdxl_dir)
    return {
        # sd-scripts' SDXL naming, rank 4, everything served on all three models.
        "ldm": kohya_sdxl_state(spec, convention="ldm", seed=1, rank=4),
        # diffusers-style UNet names, rank 2, fewer modules on the second encoder.
        "dif": kohya_sdxl_state(spec, convention="diffusers", seed=2, rank=2, text_2_targets=("q_proj", "fc2")),
    }


@pytest.fixture(scope="module")
def canonical(kohya, tiny_sdxl_dir):
    spec = base_model_spec_from_dir(tiny_sdxl_dir)
    out = {}
    for name, state in kohya.items():
        prepared = prepare_adapter(safetensors.torch.save(state), spec)
        assert prepared.source_format == "kohya"
        out[name] = prepared.adapter
    return out


class SDXLLoRAEngine(SDXLEngine):
    """The SDXL engine with multi-LoRA slots on the UNet and both text encoders, adapters in fixed slots."""

    def __init__(self, tiny_sdxl, canonical):
        super().__init__(tiny_sdxl)
        first, second = self.prompts.encoders
        self.loras = {
            "unet": MultiLoRAModel(self.unet, SDXL_UNET_TARGETS, num_slots=4, max_rank=8, deterministic=True),
            "text_encoder": MultiLoRAModel(
                self.text_encoder, SDXL_TEXT_TARGETS, 4, 8, key_prefix=text_encoder_key_prefix(self.text_encoder)
            ),
            "text_encoder_2": MultiLoRAModel(
                self.text_encoder_2, SDXL_TEXT_TARGETS, 4, 8, key_prefix=text_encoder_key_prefix(self.text_encoder_2)
            ),
        }
        self.steps.lora, first.lora, second.lora = (self.loras[c] for c in COMPONENTS)
        self.slot = {}
        for slot, (name, adapter) in enumerate(sorted(canonical.items()), start=1):
            assert set(adapter.components) == set(COMPONENTS)
            for c in COMPONENTS:
                self.loras[c].load(slot, {p: (w.A, w.B, w.alpha) for p, w in adapter.component(c).items()})
            self.slot[name] = slot

    def lora_request(self, prompt, loras, negative="", **kw):
        text = tuple((self.slot[n], w, n) for n, w in loras)
        unet = tuple((self.slot[n], w) for n, w in loras)
        return self.request(prompt, negative, adapters=unet, text_adapters=text, text_adapters_2=text, **kw)


def reference(tiny_sdxl, kohya, prompt, loras, negative="", **kw):
    ref = SDXLEngine(tiny_sdxl)
    pipe = ref.pipeline(kw.get("scheduler", "default"))
    if loras:
        for name, _ in loras:
            pipe.load_lora_weights(kohya_to_diffusers_state_dict(kohya[name], ref.unet.config), adapter_name=name)
        pipe.set_adapters([n for n, _ in loras], adapter_weights=[w for _, w in loras])
        make_batch_invariant(pipe.unet)  # peft's lora_A/lora_B layers get the same kernels as ours
    return ref.reference_latents(prompt, negative, pipe=pipe, **kw)


REQUESTS = [
    # prompt, loras (name, scale) in order, negative, seed
    ("a castle", [("ldm", 0.8)], "", 1),
    ("a castle", [("dif", 0.6), ("ldm", 0.5)], "blurry", 2),  # composed; the negative goes through both TEs' LoRAs
    ("a castle", [], "", 3),  # no LoRA, batched with LoRA rows
    ("a red fox", [("dif", 1.0)], "ugly", 4),
]


def test_mixed_batch_equals_diffusers_alone(tiny_sdxl, kohya, canonical):
    engine = SDXLLoRAEngine(tiny_sdxl, canonical)
    batch = engine.run_latents([engine.lora_request(p, loras, n, seed=s, steps=4) for p, loras, n, s in REQUESTS])
    assert engine.steps.ticks_run == 4  # one batch: every request in each of the 4 steps
    for i, (prompt, loras, negative, seed) in enumerate(REQUESTS):
        ref = reference(tiny_sdxl, kohya, prompt, loras, negative, seed=seed, steps=4)
        assert (batch[i : i + 1] - ref).abs().max().item() <= 1e-4, (prompt, loras)
    # The adapters really change the picture, and so does their scale.
    lone = engine.run_latents([engine.lora_request("a castle", [("ldm", 0.8)], seed=3, steps=4)])
    assert (lone - batch[2:3]).abs().max().item() > 1e-2


def test_text_encoder_2_adapter_changes_only_through_its_own_slots(tiny_sdxl, canonical):
    engine = SDXLLoRAEngine(tiny_sdxl, canonical)
    slot = engine.slot["ldm"]
    (base, first_only, second_only) = engine.prompts.encode_prompt_pairs(
        ["a cat"] * 3, ["ugly"] * 3, [(), ((slot, 1.0, "ldm"),), ()], [(), (), ((slot, 1.0, "ldm"),)]
    )
    h1 = engine.text_encoder.config.hidden_size
    # The first encoder's LoRA moves only its half of the context, the second's the other half and the pooled.
    assert torch.equal(first_only.prompt_embeds[:, h1:], base.prompt_embeds[:, h1:])
    assert not torch.equal(first_only.prompt_embeds[:, :h1], base.prompt_embeds[:, :h1])
    assert torch.equal(first_only.pooled_prompt_embeds, base.pooled_prompt_embeds)
    assert torch.equal(second_only.prompt_embeds[:, :h1], base.prompt_embeds[:, :h1])
    assert not torch.equal(second_only.pooled_prompt_embeds, base.pooled_prompt_embeds)
