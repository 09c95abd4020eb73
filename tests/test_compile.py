"""``model.compile: regional`` (#19 item 4): the UNet's repeated blocks compiled with their multi-LoRA layers.

Adapters are data in the slot buffers and the routing buffers: a compiled block must never recompile when
the mix of adapters changes (other slots, weights, how many per row, none at all at the same width). The
``eager`` backend traces exactly what inductor would compile and runs it with the stock kernels, so the
outputs equal the uncompiled UNet's bit for bit here; ``torch.compiler.set_stance("fail_on_recompile")``
turns any recompile into an error.
"""

import copy

import pytest
import torch
from pydantic import ValidationError

from deployments.engine.config import ModelConfig
from deployments.engine.multi_lora import MultiLoRAModel
from deployments.engine.runtime import compile_regions, prepare_runtime

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture
def compiled_stance():
    """Dynamo's caches and stance left as found (other tests run uncompiled)."""
    torch._dynamo.reset()
    yield
    torch.compiler.set_stance("default")
    torch._dynamo.reset()


def _lora_unet(tiny):
    from lora_helpers import random_slot_weights

    unet = copy.deepcopy(tiny["unet"]).eval().requires_grad_(False)
    lora = MultiLoRAModel(unet, TARGETS, num_slots=4, max_rank=8, kernel="gather")
    g = torch.Generator().manual_seed(3)
    for slot, rank in ((1, 4), (2, 2), (3, 4)):
        lora.load(slot, random_slot_weights(lora, rank, g, scale=0.3))
    return unet, lora


def _step(unet, lora, rows, width=None):
    g = torch.Generator().manual_seed(5)
    cfg = unet.config
    x = torch.randn(len(rows), cfg.in_channels, 8, 8, generator=g)
    t = torch.tensor([10.0, 500.0, 900.0][: len(rows)])
    context = torch.randn(len(rows), 77, cfg.cross_attention_dim, generator=g)
    with torch.inference_mode(), lora.routed(rows, width=width):
        return unet(x, t, encoder_hidden_states=context, return_dict=False)[0]


MIXES = [
    [((1, 1.0),), (), ((2, 0.5),)],
    [((3, 0.7), (2, 1.5)), ((1, 0.25),), ()],  # other slots, two adapters composed on one row, other weights
    [(), (), ()],  # no adapter, at the same width: the LoRA path adds zeros
    [((2, 1.0), (1, 1.0)), ((2, 1.0), (3, 0.5)), ((1, 2.0),)],
]


def test_changing_adapters_never_recompiles_a_compiled_block(tiny, compiled_stance):
    from torch._dynamo.utils import counters

    unet, lora = _lora_unet(tiny)
    want = [_step(unet, lora, rows, width=8) for rows in MIXES]  # uncompiled
    compile_regions(unet, "regional", backend="eager")
    first = _step(unet, lora, MIXES[0], width=8)  # compiles each block shape once
    assert torch.equal(first, want[0])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the blocks were compiled
    torch.compiler.set_stance("fail_on_recompile")
    for rows, expected in zip(MIXES[1:], want[1:], strict=True):
        assert torch.equal(_step(unet, lora, rows, width=8), expected)
    assert counters["stats"]["unique_graphs"] == graphs
    # New weights loaded into a slot (an eviction and a load): data again, no recompile.
    from lora_helpers import random_slot_weights

    lora.load(1, random_slot_weights(lora, 4, torch.Generator().manual_seed(9), scale=0.3))
    reloaded = _step(unet, lora, MIXES[0], width=8)
    assert not torch.equal(reloaded, want[0])
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_refuses_deterministic_kernels_and_unknown_settings(tiny):
    with pytest.raises(ValidationError, match="model.compile: regional needs model.deterministic off"):
        ModelConfig(uri="builtin:tiny-sd", compile="regional", deterministic="on")
    with pytest.raises(ValidationError, match="compile"):
        ModelConfig(uri="builtin:tiny-sd", compile="full")
    # auto is on for the CPU: the same refusal, at start-up, naming both fields.
    with pytest.raises(ValueError, match="model.compile: regional needs model.deterministic off"):
        prepare_runtime(ModelConfig(uri="builtin:tiny-sd", compile="regional"))
    rt = prepare_runtime(ModelConfig(uri="builtin:tiny-sd", compile="regional", deterministic="off"))
    assert (rt.compile, rt.compile_backend) == ("regional", "inductor")
    unet = tiny["unet"]
    assert compile_regions(unet, "none") is unet
    with pytest.raises(ValueError, match="model.compile must be none or regional"):
        compile_regions(unet, "everything")
