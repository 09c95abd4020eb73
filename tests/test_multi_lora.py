"""Heterogeneous LoRA batches: each image of a mixed batch equals diffusers' pipeline alone with
``load_lora_weights`` + ``set_adapters(names, weights)``; rows without LoRA equal the base pipeline."""

from __future__ import annotations

import pytest
import torch

from deployments.engine.batch_invariance import make_batch_invariant
from deployments.engine.multi_lora import LoRARouting, MultiLoRAModel, text_encoder_key_prefix
from lora_registry.base_model import base_model_spec_from_dir
from lora_registry.validation import prepare_adapter

from engine_helpers import Engine
from lora_helpers import UNET_ATTN, make_peft_lora_file

UNET_TARGETS = [*UNET_ATTN, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def lora_files(tiny, tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        # UNet attention only, rank 4.
        "style_a": make_peft_lora_file(tiny, root / "a", seed=1, rank=4, alpha=8, unet_targets=UNET_ATTN),
        # UNet (incl. 1x1-conv proj_in/proj_out and the feed-forward) and text encoder, rank 2.
        "style_b": make_peft_lora_file(
            tiny,
            root / "b",
            seed=2,
            rank=2,
            alpha=3,
            unet_targets=["to_k", "to_v", "proj_in", "ff.net.2"],
            text_targets=["q_proj", "v_proj", "fc1"],
        ),
    }


@pytest.fixture(scope="module")
def canonical(lora_files, tiny_dir):
    spec = base_model_spec_from_dir(tiny_dir)
    return {name: prepare_adapter(path.read_bytes(), spec).adapter for name, path in lora_files.items()}


class LoRAEngine(Engine):
    """The engine with multi-LoRA layers on the UNet and text encoder, adapters in fixed slots."""

    def __init__(self, tiny, canonical):
        super().__init__(tiny)
        self.unet_lora = MultiLoRAModel(self.unet, UNET_TARGETS, num_slots=4, max_rank=8, deterministic=True)
        self.text_lora = MultiLoRAModel(
            self.text_encoder,
            TEXT_TARGETS,
            num_slots=4,
            max_rank=8,
            key_prefix=text_encoder_key_prefix(self.text_encoder),
        )
        self.steps.lora = self.unet_lora
        self.prompts.lora = self.text_lora
        self.slot = {}
        for slot, (name, adapter) in enumerate(sorted(canonical.items()), start=1):
            weights = {
                c: {p: (w.A, w.B, w.alpha) for p, w in adapter.component(c).items()} for c in ("unet", "text_encoder")
            }
            self.unet_lora.load(slot, weights["unet"])
            self.text_lora.load(slot, weights["text_encoder"])
            self.slot[name] = slot

    def lora_request(self, prompt, loras, **kw):
        from deployments.engine.step_scheduler import DenoiseRequest

        text = tuple((self.slot[n], w, n) for n, w in loras)
        pos, neg = self.prompts.encode_prompt([prompt, kw.pop("negative_prompt", "")], [text, text])
        return DenoiseRequest(
            pos,
            neg,
            64,
            64,
            kw.get("steps", 5),
            kw.get("guidance_scale", 7.5),
            kw.get("seed", 0),
            kw.get("scheduler", "ddim"),
            adapters=tuple((self.slot[n], w) for n, w in loras),
        )


def reference(tiny, lora_files, prompt, loras, *, steps=5, seed=0, scheduler="ddim"):
    """diffusers alone: load_lora_weights for each adapter, set_adapters(names, weights)."""
    ref = Engine(tiny)
    pipe = ref.pipeline(scheduler)
    if loras:
        for name, _ in loras:
            pipe.load_lora_weights(str(lora_files[name]), adapter_name=name)
        pipe.set_adapters([n for n, _ in loras], adapter_weights=[w for _, w in loras])
        # peft's own lora_A/lora_B layers get the same batch-invariant kernels as ours.
        make_batch_invariant(pipe.unet)
    return pipe(
        prompt,
        height=64,
        width=64,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


REQUESTS = [
    ("a castle", [("style_a", 0.7), ("style_b", 1.2)], 1),  # two adapters composed, in this order
    ("a castle", [("style_b", 0.5)], 2),
    ("a castle", [], 3),  # no LoRA, batched with LoRA rows
    ("a red fox", [("style_a", 1.0)], 4),
    ("a red fox", [("style_b", 1.2), ("style_a", 0.7)], 1),  # the same pair, other order
]


def test_mixed_batch_equals_diffusers_alone(tiny, lora_files, canonical):
    engine = LoRAEngine(tiny, canonical)
    batch = engine.run([engine.lora_request(p, loras, seed=s) for p, loras, s in REQUESTS])
    assert engine.steps.ticks_run == 5  # one batch: all five requests in each of the 5 DDIM steps
    for i, (prompt, loras, seed) in enumerate(REQUESTS):
        ref = reference(tiny, lora_files, prompt, loras, seed=seed)
        assert (batch[i] - ref[0]).abs().max().item() <= 1e-4, (prompt, loras)
    # The adapters really change the picture, and their scales matter.
    base = batch[2]
    assert (engine.run([engine.lora_request("a castle", [("style_b", 0.5)], seed=3)]) - base).abs().max() > 0.05


def test_adapter_scale_zero_equals_no_adapter(tiny, canonical):
    engine = LoRAEngine(tiny, canonical)
    with_zero = engine.run([engine.lora_request("a boat", [("style_a", 0.0)], seed=5)])
    none = engine.run([engine.lora_request("a boat", [], seed=5)])
    assert torch.equal(with_zero, none)


def test_routing_groups_rows_by_slot_in_request_order():
    routing = LoRARouting([((1, 1.0),), (), ((2, 0.5), (1, 0.25)), ((1, 2.0),)])
    assert routing.num_rows == 4
    first, second = routing.passes
    assert [(g.slot, g.rows.tolist(), g.weights) for g in first] == [(1, [0, 3], (1.0, 2.0)), (2, [2], (0.5,))]
    assert [(g.slot, g.rows.tolist(), g.weights) for g in second] == [(1, [2], (0.25,))]
    assert LoRARouting([(), ()]).empty


def test_layers_refuse_what_they_cannot_carry(tiny, canonical):
    import copy

    unet = copy.deepcopy(tiny["unet"])
    lora = MultiLoRAModel(unet, ["to_q"], num_slots=2, max_rank=2)
    weights = {p: (w.A, w.B, w.alpha) for p, w in canonical["style_a"].component("unet").items()}
    with pytest.raises(ValueError, match="cannot carry"):
        lora.load(1, weights)  # targets to_k/to_v/to_out too, and rank 4 > max_rank 2
    with pytest.raises(ValueError, match="slot must be"):
        lora.load(0, {})


@torch.inference_mode()
def test_gather_kernel_equals_grouped(tiny, canonical):
    """The gather+bmm kernel (for GPUs) computes what the grouped one does, ranks stacked per row."""
    import copy

    outs = {}
    torch.manual_seed(0)
    x = torch.randn(6, 4, 8, 8)
    t = torch.tensor([999.0, 999.0, 500.0, 500.0, 20.0, 20.0])
    c = torch.randn(6, 77, 64)
    rows = [((1, 0.7), (2, 1.2)), ((1, 0.7), (2, 1.2)), ((2, 0.5),), ((2, 0.5),), (), ()]
    for kernel in ("grouped", "gather"):
        unet = copy.deepcopy(tiny["unet"])
        lora = MultiLoRAModel(unet, UNET_TARGETS, num_slots=4, max_rank=8, kernel=kernel)
        assert lora.state.kernel == kernel
        for slot, name in ((1, "style_a"), (2, "style_b")):
            lora.load(slot, {p: (w.A, w.B, w.alpha) for p, w in canonical[name].component("unet").items()})
        with lora.routed(rows):
            outs[kernel] = unet(x, t, encoder_hidden_states=c).sample
        outs[kernel + "-base"] = unet(x, t, encoder_hidden_states=c).sample
    assert (outs["gather"] - outs["grouped"]).abs().max().item() < 1e-5
    assert (outs["grouped"] - outs["grouped-base"]).abs().max().item() > 1e-2  # adapters matter
    assert torch.equal(outs["grouped"][4:], outs["grouped-base"][4:])  # rows without adapters: untouched
