"""The UNet step on static, padded buffers (``deployments/engine/step_graphs.py``), on the CPU.

Everything but CUDA-graph capture and replay runs here: the row buckets, the static buffers and their
padding, per-shape entries, SDXL's added conditions, the multi-LoRA routing of padded rows, and the eager
fallback beyond the largest bucket. With batch-invariant kernels the padded step gives every real row the
very bits of a plain call.
"""

import copy
import dataclasses

import pytest
import torch

from deployments.engine.batch_invariance import make_batch_invariant
from deployments.engine.multi_lora import MultiLoRAModel
from deployments.engine.step_graphs import ROW_BUCKETS, StepGraphs, bucket_rows

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def inputs(rows: int, seed: int, context=(77, 64)):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(rows, 4, 8, 8, generator=g)
    timestep = torch.randint(0, 1000, (rows,), generator=g).to(torch.float32)
    ctx = torch.randn(rows, *context, generator=g)
    return sample, timestep, ctx


@pytest.fixture(scope="module")
def unet(tiny):
    return make_batch_invariant(copy.deepcopy(tiny["unet"])).eval()


def plain(unet, sample, timestep, context, added=None):
    kwargs = {"encoder_hidden_states": context, "return_dict": False}
    if added is not None:
        kwargs["added_cond_kwargs"] = added
    return unet(sample, timestep, **kwargs)[0]


def test_rows_go_to_the_smallest_bucket_that_holds_them():
    assert [bucket_rows(n) for n in (1, 2, 3, 5, 9, 17, 33, 64)] == [1, 2, 4, 8, 16, 32, 64, 64]
    assert bucket_rows(65) is None and ROW_BUCKETS[-1] == 64
    assert bucket_rows(5, buckets=(6, 12)) == 6


def test_cuda_graphs_are_refused_off_cuda(unet):
    with pytest.raises(ValueError, match="CUDA graphs need the UNet on a CUDA device"):
        StepGraphs(unet, capture=True)


@torch.inference_mode()
def test_a_padded_step_gives_each_row_the_bits_of_a_plain_call(unet):
    graphs = StepGraphs(unet, capture=False)
    big = inputs(7, seed=1)
    small = inputs(3, seed=2)
    for sample, timestep, context in (big, small, big):  # 7 rows -> bucket 8; 3 -> 4; the 8-row buffers again
        out = graphs.forward(sample, timestep, context, None, None)
        assert out.shape == sample.shape
        assert torch.equal(out, plain(unet, sample, timestep, context))
    assert sorted(shape.rows for shape in graphs.entries) == [4, 8]
    # The padding rows of a smaller tick are zeros, whatever a larger one left there.
    entry = next(e for s, e in graphs.entries.items() if s.rows == 8)
    graphs.forward(*inputs(5, seed=3), None, None)
    assert torch.count_nonzero(entry.sample[5:]) == 0 and torch.count_nonzero(entry.context[5:]) == 0


@torch.inference_mode()
def test_beyond_the_largest_bucket_the_step_runs_eagerly(unet):
    graphs = StepGraphs(unet, capture=False, buckets=(1, 2))
    sample, timestep, context = inputs(3, seed=4)
    assert torch.equal(graphs.forward(sample, timestep, context, None, None), plain(unet, sample, timestep, context))
    assert graphs.eager_calls == 1 and not graphs.entries


@torch.inference_mode()
def test_sdxl_added_conditions_ride_in_static_buffers(tiny_sdxl):
    unet = make_batch_invariant(copy.deepcopy(tiny_sdxl["unet"])).eval()
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    g = torch.Generator().manual_seed(5)
    sample, timestep, context = inputs(3, seed=5, context=(77, cfg.cross_attention_dim))
    added = {"text_embeds": torch.randn(3, pooled, generator=g), "time_ids": torch.randn(3, 6, generator=g)}
    graphs = StepGraphs(unet, capture=False)
    out = graphs.forward(sample, timestep, context, added, None)
    assert torch.equal(out, plain(unet, sample, timestep, context, added))
    (shape,) = graphs.entries
    assert (shape.rows, shape.text_embeds, shape.time_ids) == (4, pooled, 6)


@torch.inference_mode()
def test_padded_rows_carry_no_adapter_and_real_rows_keep_theirs(tiny):
    from lora_helpers import random_slot_weights

    unet = make_batch_invariant(copy.deepcopy(tiny["unet"])).eval()  # as the engine prepares it on the CPU
    lora = MultiLoRAModel(unet, TARGETS, num_slots=4, max_rank=4, deterministic=True)
    g = torch.Generator().manual_seed(6)
    for slot in (1, 2):
        lora.load(slot, random_slot_weights(lora, 4, g, scale=0.3))
    graphs = StepGraphs(unet, lora, capture=False)
    sample, timestep, context = inputs(5, seed=7)
    adapters = [((1, 1.0),), (), ((2, 0.5), (1, 1.0)), ((2, 1.0),), ()]
    out = graphs.forward(sample, timestep, context, None, adapters)
    with lora.routed(adapters):
        want = plain(unet, sample, timestep, context)
    assert torch.equal(out, want)
    base = plain(unet, sample, timestep, context)
    assert not torch.equal(out[0], base[0]) and torch.equal(out[1], base[1])  # the adapters act; none elsewhere


@torch.inference_mode()
def test_the_engine_on_static_buffers_makes_the_same_images(tiny):
    """A mixed batch (sizes, schedulers, guidance, step counts) through ``StepScheduler`` with ``step_graphs``:
    the very images of the plain engine, and the ticks went through the padded buffers."""
    from engine_helpers import Engine

    plain_engine, graphed = Engine(tiny), Engine(tiny)
    graphed.steps.step_graphs = StepGraphs(graphed.unet, capture=False)

    def requests(engine):
        return [
            engine.request("a boat", seed=1, steps=4, scheduler="dpmpp_2m"),
            engine.request("a field", size=32, seed=2, steps=3, scheduler="euler_a"),
            engine.request("a lighthouse", seed=3, steps=5, guidance_scale=0.0, scheduler="default"),
        ]

    def latents(engine):
        jobs = engine.steps.submit(requests(engine))
        while not engine.steps.idle:
            engine.steps.tick()
        return [j.x_t for j in jobs]

    for got, want in zip(latents(graphed), latents(plain_engine), strict=True):
        assert torch.equal(got, want)
    assert {shape.rows for shape in graphed.steps.step_graphs.entries} >= {2, 4}
    assert graphed.steps.step_graphs.eager_calls == 0


def test_the_setting_picks_the_path(tiny):
    from deployments.engine.step_graphs import make_step_graphs, native_shapes

    unet = tiny["unet"]
    assert make_step_graphs(unet, None, "off", max_rows=16) is None
    assert make_step_graphs(unet, None, "auto", max_rows=16) is None  # auto: CUDA only
    graphs = make_step_graphs(unet, None, "on", max_rows=16, native_latent_side=4)
    assert graphs is not None and not graphs.capture
    assert {s.width for s in graphs.entries} == {0}  # no LoRA layers: no routing
    assert sorted(s.rows for s in graphs.entries) == [1, 2, 4, 8, 16]  # built at start, up to max_rows_per_tick
    (first, *_) = native_shapes(unet, 0, 4, 16)
    assert (first.sample, first.context, first.text_embeds) == ((4, 4, 4), (77, 64), None)
    with pytest.raises(ValueError, match="cuda_graphs must be auto, on or off"):
        make_step_graphs(unet, None, "yes", max_rows=16)


def test_sdxl_native_shapes_carry_the_added_conditions(tiny_sdxl):
    from deployments.engine.step_graphs import native_shapes

    cfg = tiny_sdxl["unet"].config
    (shape,) = native_shapes(tiny_sdxl["unet"], 16, 32, 2, buckets=(2,))
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    assert (shape.rows, shape.text_embeds, shape.time_ids, shape.width) == (2, pooled, 6, 16)


# -- the routing a captured graph replays (CUDA's path, run eagerly here) -------------------------------------

LOCON = [*TARGETS, "conv1", "conv2", "downsamplers.0.conv"]  # 3x3 and strided convs too


def lora_unet(tiny, kernel: str):
    from lora_helpers import random_slot_weights

    unet = copy.deepcopy(tiny["unet"]).eval()
    lora = MultiLoRAModel(unet, LOCON, num_slots=4, max_rank=4, deterministic=False, kernel=kernel)
    g = torch.Generator().manual_seed(8)
    for slot, rank in ((1, 4), (2, 2)):
        lora.load(slot, random_slot_weights(lora, rank, g, scale=0.3))
    return unet, lora


@torch.inference_mode()
def test_static_routing_with_the_gather_kernel_equals_the_grouped_kernel(tiny):
    """Fixed width, padded rows, every layer on its LoRA path (what capture records), k x k and strided convs
    through the gather kernel's grouped conv: the grouped kernel's result, to rounding, and no adapter no change."""
    grouped_unet, grouped = lora_unet(tiny, "grouped")
    gather_unet, gather = lora_unet(tiny, "gather")
    assert gather.kernel.reads_only_buffers
    graphs = StepGraphs(gather_unet, gather, capture=False, static_routing=True)
    sample, timestep, context = inputs(5, seed=9)
    adapters = [((1, 1.0),), (), ((2, 0.5), (1, 1.0)), ((2, 1.0),), ()]
    out = graphs.forward(sample, timestep, context, None, adapters)
    with grouped.routed(adapters):
        want = plain(grouped_unet, sample, timestep, context)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    base = plain(gather_unet, sample, timestep, context)
    # Stock kernels here (as on CUDA): padding to 8 rows may round differently, so to rounding, not bits.
    torch.testing.assert_close(out[1], base[1], rtol=1e-4, atol=1e-5)  # slot 0 at weight 0 adds zeros
    assert (out[0] - base[0]).abs().max() > 1e-3  # the adapters act
    # Ranks 4 and 2 composed: 6 columns, width 8 (what was written and keyed), for every row.
    assert {shape.width for shape in graphs.entries} == {8}
    # A tick without any adapter: width 0, the plain UNet's step (its own graph on CUDA).
    none = graphs.forward(sample, timestep, context, None, [()] * 5)
    torch.testing.assert_close(none, base, rtol=1e-4, atol=1e-5)
    assert {shape.width for shape in graphs.entries} == {0, 8}
    # Written wider than it needs (a captured graph of width 16 replaying rank-4 adapters): the same rows.
    with gather.routed(adapters, width=16) as routing:
        assert routing.static and routing.width == 16
        wide = plain(gather_unet, sample, timestep, context)
    torch.testing.assert_close(wide, out, rtol=1e-4, atol=1e-5)


def test_a_static_routing_is_written_at_its_width_and_refuses_wider_rows():
    from deployments.engine.multi_lora import RoutingBuffers

    buffers = RoutingBuffers(max_rows=4, max_depth=2, max_width=8)
    pages = [[], [3, 4], [5]]  # slot 1: rank 2; slot 2: rank 1
    routing = buffers.write([((1, 1.0),), (), ((2, 0.5), (1, 2.0))], pages, width=4)
    assert routing.static and not routing.empty and routing.width == 4
    assert routing.pages.tolist() == [[3, 4, 0, 0], [0, 0, 0, 0], [5, 3, 4, 0]]
    assert routing.page_slots.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [2, 1, 1, 0]]
    assert routing.page_weights.tolist() == [[1.0, 1.0, 0, 0], [0, 0, 0, 0], [0.5, 2.0, 2.0, 0]]
    assert buffers.write([(), ()], pages).empty  # no adapters: width 0, nothing to do
    assert buffers.write([(), ()], pages, width=0).empty  # a static tick without adapters: the plain UNet
    with pytest.raises(ValueError, match="a row needs 3 gather columns; this routing is written 2 wide"):
        buffers.write([((2, 1.0), (1, 1.0))], pages, width=2)
    wide = buffers.write([((1, 1.0),)] * 4, [[], list(range(1, 41))])  # grows past max_width: reallocated
    assert wide.width == 64 and buffers.max_width == 64


@torch.inference_mode()
def test_layers_no_adapter_targets_skip_the_lora_path_and_a_new_layout_is_captured_again(tiny):
    """Adapters on the attention projections alone leave the convolutions plain (no LoRA path, no zeros
    computed); the first adapter to target a layer changes the layout, which drops the steps built before
    (``rewarm`` builds them again). Evicting it changes nothing: the layout only grows."""
    from lora_helpers import random_slot_weights

    unet = copy.deepcopy(tiny["unet"]).eval()
    lora = MultiLoRAModel(unet, LOCON, num_slots=4, max_rank=4, kernel="gather")
    graphs = StepGraphs(unet, lora, capture=False, static_routing=True)
    sample, timestep, context = inputs(2, seed=3)
    base = plain(unet, sample, timestep, context)
    assert lora.state.layout == 0 and not any(layer.carries for layer in lora.layers.values())
    torch.testing.assert_close(graphs.forward(sample, timestep, context, None, [(), ()]), base, rtol=0, atol=0)
    (before,) = graphs.entries
    g = torch.Generator().manual_seed(4)
    weights = random_slot_weights(lora, 4, g, scale=0.3)
    attention = {p: w for p, w in weights.items() if p.endswith(tuple(TARGETS))}
    lora.load(1, attention)
    assert {p for p, layer in lora.layers.items() if layer.carries} == set(attention)
    assert lora.state.layout == len(attention)  # each layer once
    out = graphs.forward(sample, timestep, context, None, [((1, 1.0),), ()])
    with lora.routed([((1, 1.0),), ()]):
        want = plain(unet, sample, timestep, context)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert (out[0] - base[0]).abs().max() > 1e-3 and torch.equal(out[1], base[1])
    assert {shape.layout for shape in graphs.entries} == {lora.state.layout}  # the old layout's step dropped
    assert graphs.rewarm() == 1  # ... and built again for this layout
    assert dataclasses.replace(before, layout=lora.state.layout) in graphs.entries
    layout = lora.state.layout
    lora.clear(1)  # evicted: the layers keep their LoRA path (zeros), no graph goes stale
    assert lora.state.layout == layout and all(lora.layers[p].carries for p in attention)
    lora.load(2, weights)  # every LoCon layer now: the convolutions join
    assert lora.state.layout == len(weights)
