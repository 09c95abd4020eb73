"""Heterogeneous LoRA batches: each image of a mixed batch equals diffusers' pipeline alone with
``load_lora_weights`` + ``set_adapters(names, weights)``; rows without LoRA equal the base pipeline."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from deployments.engine.batch_invariance import make_batch_invariant
from deployments.engine.multi_lora import (
    GatherKernel,
    GroupedKernel,
    MultiLoRAModel,
    RoutingBuffers,
    RowInvariantKernel,
    make_kernel,
    text_encoder_key_prefix,
)
from lora_registry.base_model import base_model_spec_from_dir
from lora_registry.validation import prepare_adapter

from engine_helpers import Engine
from lora_helpers import UNET_ATTN, make_peft_lora_file, random_slot_weights

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
    routing = RoutingBuffers(max_rows=4, max_depth=2).write([((1, 1.0),), (), ((2, 0.5), (1, 0.25)), ((1, 2.0),)])
    assert routing.num_rows == 4
    first, second = routing.passes
    assert [(g.slot, g.rows.tolist(), g.weights) for g in first] == [(1, [0, 3], (1.0, 2.0)), (2, [2], (0.5,))]
    assert [(g.slot, g.rows.tolist(), g.weights) for g in second] == [(1, [2], (0.25,))]
    assert routing.slot_ids.tolist() == [[1, 0], [0, 0], [2, 1], [1, 0]]  # slot 0 (empty) pads
    assert routing.weights.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.5, 0.25], [2.0, 0.0]]
    assert RoutingBuffers().write([(), ()]).empty


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
def test_kernels_agree_on_the_unet(tiny, canonical):
    """The gather+bmm kernel (for GPUs) and the row-invariant one compute what the grouped one does."""
    import copy

    outs = {}
    torch.manual_seed(0)
    x = torch.randn(6, 4, 8, 8)
    t = torch.tensor([999.0, 999.0, 500.0, 500.0, 20.0, 20.0])
    c = torch.randn(6, 77, 64)
    rows = [((1, 0.7), (2, 1.2)), ((1, 0.7), (2, 1.2)), ((2, 0.5),), ((2, 0.5),), (), ()]
    for kernel in ("grouped", "gather", "row-invariant"):
        unet = copy.deepcopy(tiny["unet"])
        lora = MultiLoRAModel(unet, UNET_TARGETS, num_slots=4, max_rank=8, kernel=kernel)
        assert lora.kernel.name == kernel
        for slot, name in ((1, "style_a"), (2, "style_b")):
            lora.load(slot, {p: (w.A, w.B, w.alpha) for p, w in canonical[name].component("unet").items()})
        with lora.routed(rows):
            outs[kernel] = unet(x, t, encoder_hidden_states=c).sample
        outs[kernel + "-base"] = unet(x, t, encoder_hidden_states=c).sample
    assert (outs["gather"] - outs["grouped"]).abs().max().item() < 1e-5
    assert (outs["row-invariant"] - outs["grouped"]).abs().max().item() < 1e-5
    assert (outs["grouped"] - outs["grouped-base"]).abs().max().item() > 1e-2  # adapters matter
    for kernel in ("grouped", "gather", "row-invariant"):
        assert torch.equal(outs[kernel][4:], outs[kernel + "-base"][4:]), kernel  # rows without adapters: untouched


@pytest.mark.parametrize(
    "name, deterministic, on_cuda, kernel, fallback",
    [
        ("auto", False, False, GroupedKernel, None),
        ("auto", False, True, GatherKernel, GroupedKernel),
        ("auto", True, False, RowInvariantKernel, None),
        ("auto", True, True, RowInvariantKernel, None),
        ("grouped", False, True, GroupedKernel, None),
        ("grouped", True, False, RowInvariantKernel, None),  # deterministic: no row may depend on its batch
        ("gather", False, False, GatherKernel, GroupedKernel),
        ("gather", True, True, GatherKernel, RowInvariantKernel),  # k x k convs it cannot gather
        ("row-invariant", False, True, RowInvariantKernel, None),
    ],
)
def test_kernel_choice(name, deterministic, on_cuda, kernel, fallback):
    chosen = make_kernel(name, deterministic=deterministic, on_cuda=on_cuda)
    assert type(chosen) is kernel
    assert type(getattr(chosen, "fallback", None)) is (type(None) if fallback is None else fallback)


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="'bgmv'"):
        make_kernel("bgmv", deterministic=False, on_cuda=False)


# ---- one layer, every kernel, against peft's per-row formula -----------------------------------------


class _Layers(torch.nn.Module):
    """A Linear over tokens, a 1x1 conv (gathered) and a 3x3 conv (the gather kernel's fallback)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 5)
        self.pointwise = torch.nn.Conv2d(3, 4, 1)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)


def _layer_lora(kernel: str):
    """The three layers with slots 1 (rank 2) and 2 (rank 3) loaded; ``{path: (A, B, alpha)}`` per slot."""
    g = torch.Generator().manual_seed(0)
    model = _Layers()
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g)
    lora = MultiLoRAModel(model, ["linear", "pointwise", "conv"], num_slots=3, max_rank=4, kernel=kernel, max_rows=2)
    adapters = {}
    for slot, rank, alpha in ((1, 2, 3.0), (2, 3, 1.5)):
        adapters[slot] = random_slot_weights(lora, rank, g, alpha=alpha)
        lora.load(slot, adapters[slot])
    return model, lora, adapters


def _peft_row(base, x, adapters, row_adapters, path):
    """peft's arithmetic for one row alone: ``base(x) + lora_B(lora_A(x)) * weight * alpha / r``, in order."""
    out = base(x)
    for slot, weight in row_adapters:
        A, B, alpha = adapters[slot][path]
        if isinstance(base, torch.nn.Conv2d):
            delta = F.conv2d(F.conv2d(x, A, None, base.stride, base.padding), B)
        else:
            delta = F.linear(F.linear(x, A), B)
        out = out + delta * (weight * alpha / A.shape[0])
    return out


INPUTS = {"linear": (7, 6), "pointwise": (3, 5, 5), "conv": (3, 5, 5)}  # per row
ROWS = [((1, 0.5), (2, 2.0)), (), ((2, 1.0),), ((2, 0.25), (1, 1.0)), ((1, 0.5),)]


@pytest.mark.parametrize("kernel", ["grouped", "gather", "row-invariant"])
@pytest.mark.parametrize("path", list(INPUTS))
@torch.inference_mode()
def test_each_kernel_equals_peft_per_row(kernel, path):
    model, lora, adapters = _layer_lora(kernel)
    layer = lora.layers[path]
    x = torch.randn(len(ROWS), *INPUTS[path], generator=torch.Generator().manual_seed(1))
    with lora.routed(ROWS):  # 5 rows, 2 adapters deep: more than max_rows=2, the buffers grow
        out = layer(x)
    assert lora.routing_buffers.max_rows == len(ROWS)
    for i, row in enumerate(ROWS):
        ref = _peft_row(layer.base, x[i : i + 1], adapters, row, path)
        assert (out[i : i + 1] - ref).abs().max().item() < 1e-4, (i, row)
    assert (out[0] - layer.base(x[:1])[0]).abs().max().item() > 0.1  # the adapters matter
    assert torch.equal(out[1], layer.base(x)[1])  # no adapter: base only, bit for bit


@contextlib.contextmanager
def host_tensors():
    """Records every tensor made from host data (``torch.tensor``, ``torch.as_tensor``) inside the block."""
    made = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ("tensor", "as_tensor"):
            real = getattr(torch, name)

            def spy(*args, _real=real, _name=name, **kwargs):
                made.append(_name)
                return _real(*args, **kwargs)

            mp.setattr(torch, name, spy)
        yield made


@torch.inference_mode()
def test_gather_kernel_reads_only_the_preallocated_routing():
    """What a CUDA graph needs: no tensor made on the host per forward, the routing read from fixed buffers.

    A routing taken before the buffers are rewritten reads the new mix: a graph captured over the
    buffers would replay whatever routing was written last (same rows and depth).
    """
    model, lora, _ = _layer_lora("gather")
    gather = lora.kernel
    layer = lora.layers["linear"]
    x = torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(2))
    buffers = lora.routing_buffers
    mixed = [((1, 0.5), (2, 2.0)), ((1, 0.7),)]  # slot 1 at two scales: the grouped kernel makes a tensor
    other = [((2, 1.5),), ((1, 1.0), (2, 0.25))]
    with lora.routed(mixed) as first:
        pointers = (buffers.columns.data_ptr(), buffers.column_weights.data_ptr())
        with host_tensors() as made:
            gathered = layer(x)
        assert made == []
        lora.state.kernel = GroupedKernel()
        with host_tensors() as made:
            layer(x)
        assert made == ["tensor"]  # the check sees the grouped kernel's per-row scales; it would see gather's
        lora.state.kernel = gather
        buffers.write(other, lora.state.pages)  # in place: the same storage, the same width
        assert (buffers.columns.data_ptr(), buffers.column_weights.data_ptr()) == pointers
        pages = lora.state.pages
        columns = [pages[2], pages[1] + pages[2]]  # each row's adapters' pages side by side, zero-padded
        assert first.pages.tolist() == [c + [0] * (first.width - len(c)) for c in columns]
        assert first.page_weights[0, : len(pages[2])].tolist() == [1.5] * len(pages[2])
        with host_tensors() as made:
            replayed = layer(x)  # still through ``first``'s views
        assert made == []
    with lora.routed(other):
        fresh = layer(x)
    assert torch.equal(replayed, fresh) and not torch.equal(replayed, gathered)


def test_ranks_4_16_128_mixed_in_one_batch_on_scattered_pages_equal_diffusers(tiny, tiny_dir, tmp_path):
    """Memory is paid per rank: three adapters of ranks 4, 16 and 128 in 148 pages, the rank-128 one on two
    runs of pages (a hole left by an eviction, then the rest), all in one batch, each equal to diffusers alone."""
    spec = base_model_spec_from_dir(tiny_dir)
    files = {
        f"r{rank}": make_peft_lora_file(
            tiny, tmp_path / f"r{rank}", seed=rank, rank=rank, alpha=rank / 4, unet_targets=UNET_TARGETS
        )
        for rank in (4, 8, 16, 128)
    }
    unet_weights = {
        name: {
            p: (w.A, w.B, w.alpha) for p, w in prepare_adapter(f.read_bytes(), spec).adapter.component("unet").items()
        }
        for name, f in files.items()
    }
    engine = Engine(tiny)
    lora = MultiLoRAModel(engine.unet, UNET_TARGETS, num_slots=5, max_rank=128, deterministic=True, num_pages=148)
    engine.steps.lora = lora
    lora.load(1, unet_weights["r8"])  # pages 1-8: a filler, evicted below
    lora.load(2, unet_weights["r16"])  # pages 9-24
    lora.clear(1)
    lora.load(3, unet_weights["r4"])  # pages 1-4 (the hole's first run)
    lora.load(4, unet_weights["r128"])  # pages 5-8 and 25-148
    assert lora.state.pages[4] == [5, 6, 7, 8, *range(25, 149)] and lora.free_pages == 0
    slot = {"r4": 3, "r16": 2, "r128": 4}
    requests = [
        ("a castle", [("r4", 0.8)], 1),
        ("a castle", [("r16", 0.6), ("r128", 0.5)], 2),
        ("a red fox", [("r128", 0.7)], 3),
        ("a red fox", [], 4),
    ]
    batch = []
    for prompt, loras, seed in requests:
        r = engine.request(prompt, steps=2, seed=seed, scheduler="ddim")
        r.adapters = tuple((slot[n], w) for n, w in loras)
        batch.append(r)
    images = engine.run(batch)
    assert engine.steps.ticks_run == 2  # one batch
    for i, (prompt, loras, seed) in enumerate(requests):
        ref = reference(tiny, files, prompt, loras, steps=2, seed=seed)
        assert (images[i] - ref[0]).abs().max().item() <= 1e-4, (prompt, loras)
    assert (images[2] - images[3]).abs().max().item() > 0.05  # rank 128 really changes the picture


def test_slots_load_weights_from_another_device():
    """The registry hands weights over in host memory; pages on another device (the GPU) take them. The meta
    device stands in for it here: a mixed-device index_copy_ is refused before any data moves."""
    import torch

    from deployments.engine.multi_lora import MultiLoRAModel

    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).to("meta")
    MultiLoRAModel(model, ["0"], num_slots=2, max_rank=2)  # wraps the Linear in place
    layer = next(m for m in model.modules() if hasattr(m, "load_slot"))
    layer.load_slot(1, [1, 2], torch.ones(2, 4), torch.ones(4, 2), alpha=2.0)  # host tensors into meta pages
    assert layer.lora_A.device.type == "meta"


def test_packed_load_writes_the_same_pages_as_per_layer_loads():
    """A load into contiguous pages goes through ``_load_packed`` (one host buffer, one copy to the device, one
    multi-tensor copy): every layer's pages, scales and page table equal those of the per-layer loads, bit for bit,
    for Linear and Conv2d layers, an adapter that targets only some layers, and a rank below the page count."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 12), torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.Linear(12, 5), torch.nn.Conv2d(6, 2, 1)
    )
    models = []
    for packed in (True, False):
        model = MultiLoRAModel(
            copy.deepcopy(net), ["0", "1", "2", "3"], num_slots=4, max_rank=8, deterministic=True, num_pages=24
        )
        if not packed:
            model._uniform_dtype = None  # the per-layer path: load_slot on every targeted layer
        models.append(model)
    g = torch.Generator().manual_seed(1)
    full = random_slot_weights(models[0], 6, g, alpha=3.0)
    partial = {p: w for p, w in random_slot_weights(models[0], 4, g, alpha=2.0).items() if p in ("1", "2")}
    for model in models:
        model.load(1, full)
        model.load(2, partial)
    (a, b) = models
    assert a.state.pages == b.state.pages and a.state.pages[1] == list(range(1, 7))  # contiguous: the packed path
    assert torch.equal(a.state.page_table, b.state.page_table) and torch.equal(a.scale_table, b.scale_table)
    for path in ("0", "1", "2", "3"):
        la, lb = a.layers[path], b.layers[path]
        assert torch.equal(la.lora_A, lb.lora_A) and torch.equal(la.lora_B, lb.lora_B), path
        assert la.lora_A.abs().sum() > 0
