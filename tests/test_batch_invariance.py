"""Batch-invariant CPU kernels: a row's result is bit-identical whatever batch it is in.

These tests hold on any x86 CPU and thread count; ``make test-isa`` runs them under forced ISAs.
"""

import copy
import types

import pytest
import torch
import torch.nn.functional as F

from deployments.engine import batch_invariance as bi
from deployments.engine.batch_invariance import make_batch_invariant
from deployments.engine.images import decode
from deployments.engine.multi_lora import MultiLoRAModel
from deployments.engine.prompts import PromptEncoder

from lora_helpers import random_slot_weights

# Batch compositions drawn from a pool: every size from alone to the whole pool, items in new places.
COMPOSITIONS = [[0], [3, 1], [2, 0, 4], [4, 3, 2, 1, 0], [1, 5, 0, 6, 2, 7, 3], [8, 7, 6, 5, 4, 3, 2, 1, 0]]


@pytest.fixture(params=["checked", "tiles only", "one per call"])
def regime(request, monkeypatch):
    """Each path of ``invariant_call``: the whole batch where checked, fixed tiles, one item per call."""
    bi._checked.clear()
    if request.param != "checked":
        original = bi._check

        def check(key, test):
            if "batch" in key or (request.param == "one per call" and "tile" in key):
                return False
            return original(key, test)

        monkeypatch.setattr(bi, "_check", check)
    yield request.param
    bi._checked.clear()


def assert_rows_invariant(fn, pool: list[torch.Tensor]):
    """``fn`` on every composition of ``pool`` gives each item exactly what it gives alone."""
    alone = [fn(x[None])[0] for x in pool]
    for picks in COMPOSITIONS:
        out = fn(torch.stack([pool[i] for i in picks]))
        for pos, i in enumerate(picks):
            assert torch.equal(out[pos], alone[i]), f"item {i} at position {pos} of {len(picks)}"


# ---- pure functions -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy, work, size",
    [
        (bi.TilePolicy(work=1 << 20, low=64, high=256), 64 * 128, 128),
        (bi.TilePolicy(work=1 << 20, low=64, high=256), 8 * 64, 256),
        (bi.TilePolicy(work=1 << 20, low=64, high=256), 1280 * 1280, 64),
        (bi.TilePolicy(work=1 << 23, low=1, high=8), 32 * 32 * 9 * 64, 8),
        (bi.TilePolicy(work=1 << 23, low=1, high=8), 320 * 320 * 9 * 4096, 1),
        (bi.TilePolicy(work=100, low=1, high=8), 0, 8),
    ],
)
def test_tile_policy(policy, work, size):
    assert policy.size(work) == size


@pytest.mark.parametrize(
    "hw, k, stride, padding, dilation, out",
    [
        ((8, 8), (3, 3), (1, 1), (1, 1), (1, 1), (8, 8)),
        ((8, 8), (3, 3), (2, 2), (1, 1), (1, 1), (4, 4)),
        ((7, 9), (3, 3), 2, 1, 1, (4, 5)),
        ((8, 8), (1, 1), 1, 0, 1, (8, 8)),
        ((8, 8), (3, 3), 1, "same", 1, (8, 8)),
        ((8, 8), (3, 3), 1, "valid", 1, (6, 6)),
        ((8, 8), (3, 3), 1, 2, 2, (8, 8)),
    ],
)
def test_conv_out_hw(hw, k, stride, padding, dilation, out):
    assert bi.conv_out_hw(hw, k, stride, padding, dilation) == out
    x = torch.zeros(1, 1, *hw)
    assert F.conv2d(x, torch.zeros(1, 1, *k), None, stride, padding, dilation).shape[2:] == out


def test_canonical_layout_is_row_major_and_aligned():
    # A [n, c, 1, 1] tensor is "contiguous" with channels-last strides too; convolutions pick kernels by strides.
    t = torch.empty_strided((3, 8, 1, 1), (8, 1, 8, 8)).copy_(torch.randn(3, 8, 1, 1))
    assert t.is_contiguous() and t.stride() != (8, 1, 1, 1)
    c = bi._canonical(t)
    assert c.stride() == (8, 1, 1, 1) and torch.equal(c, t)
    offset = torch.randn(17)[1:]  # 4 bytes past an aligned start
    assert bi._canonical(offset).data_ptr() % 64 == 0
    aligned = torch.randn(16)
    assert bi._canonical(aligned) is aligned


# ---- the check machinery ---------------------------------------------------------------------------------


def test_position_check_catches_a_position_dependent_kernel():
    def by_position(x):  # row i gets i * 1e-3: depends on where it sits
        return x + 1e-3 * torch.arange(x.shape[0], dtype=x.dtype)[:, None]

    tile = (torch.randn(8, 4),)
    assert not bi.positions_are_independent(by_position, tile)
    assert bi.positions_are_independent(lambda x: x * 3, tile)


def test_a_batch_size_dependent_kernel_falls_back_and_stays_invariant():
    bi._checked.clear()

    def by_batch(x):  # rounds "differently" for other batch sizes than its tile of 4
        return x * 2 + (0 if x.shape[0] == 4 else 1e-3)

    pool = list(torch.randn(9, 5))
    assert_rows_invariant(lambda x: bi.invariant_call("by-batch", by_batch, x, size=4), pool)
    assert bi.invariant_call("by-batch", by_batch, torch.ones(2, 5), size=4)[0, 0].item() == 2.0  # tile path
    bi._checked.clear()


def test_elementwise_tail_is_found_and_avoided():
    bi._checked.clear()
    bi._sensitive.clear()

    def tail_differs(x):  # like a vector kernel whose last 3 elements take scalar code
        y = x * 1.5
        y.view(-1)[-3:] += 1e-3
        return y

    values = bi.sensitive_inputs("tail", tail_differs, torch.zeros(1))
    assert values is not None and values.numel() > 4000
    assert bi.sensitive_inputs("times-two", lambda x: x * 2, torch.zeros(1)) is None
    pool = list(torch.randn(9, 6))
    assert_rows_invariant(lambda x: bi.invariant_elementwise("tail", tail_differs, x), pool)
    bi._checked.clear()
    bi._sensitive.clear()


@pytest.mark.parametrize("fn", [F.silu, F.gelu, torch.sigmoid])
def test_real_activations_have_no_hidden_tails(fn):
    """Whatever the ISA, the batched activation is only used where it matches one item per call."""
    pool = list(torch.randn(9, 3, 5, 7) * 3)
    assert_rows_invariant(lambda x: bi.invariant_elementwise(fn.__name__, fn, x), pool)


# ---- the kernels -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, out", [((77, 64), 64), ((1, 128), 256), ((64, 288), 32), ((5, 8), 64), ((16, 64), 8)])
def test_linear(regime, shape, out):
    torch.manual_seed(0)
    layer = torch.nn.Linear(shape[-1], out)
    pool = list(torch.randn(9, *shape))
    assert_rows_invariant(lambda x: bi.invariant_linear(x, layer.weight, layer.bias), pool)
    x = torch.stack(pool)
    torch.testing.assert_close(bi.invariant_linear(x, layer.weight, layer.bias), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "conv, hw",
    [
        (torch.nn.Conv2d(32, 4, 3, padding=1), 8),
        (torch.nn.Conv2d(4, 32, 3, padding=1, stride=2), 16),
        (torch.nn.Conv2d(32, 64, 1), 4),
        (torch.nn.Conv2d(64, 64, 3, padding=1), 1),
        (torch.nn.Conv2d(8, 8, 3, padding=1), 32),
    ],
)
def test_conv2d(regime, conv, hw):
    torch.manual_seed(0)
    pool = list(torch.randn(9, conv.in_channels, hw, hw))
    assert_rows_invariant(lambda x: bi.invariant_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding), pool)
    x = torch.stack(pool)
    got = bi.invariant_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    torch.testing.assert_close(got, conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_len, kv_len", [(64, 77), (1, 77), (16, 16), (4, 4)])
def test_attention(regime, q_len, kv_len):
    torch.manual_seed(0)
    q, k, v = torch.randn(9, 8, q_len, 8), torch.randn(9, 8, kv_len, 8), torch.randn(9, 8, kv_len, 8)
    pool = list(torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1))

    def attend(rows):
        n = rows.shape[0]
        a, b = 8 * q_len * 8, 8 * kv_len * 8
        qs, ks, vs = rows[:, :a], rows[:, a : a + b], rows[:, a + b :]
        return bi.invariant_attention(qs.reshape(n, 8, q_len, 8), ks.reshape(n, 8, -1, 8), vs.reshape(n, 8, -1, 8))

    assert_rows_invariant(attend, pool)


@pytest.mark.parametrize("norm, shape", [(torch.nn.GroupNorm(8, 32), (32, 8, 8)), (torch.nn.LayerNorm(64), (77, 64))])
def test_norms(regime, norm, shape):
    pool = list(torch.randn(9, *shape) * 3 + 1)
    assert_rows_invariant(lambda x: bi.invariant_norm(type(norm).__name__, norm, x), pool)


@pytest.mark.parametrize(
    "tokens, k, r, out",
    [(64, 32, 8, 32), (77, 160, 4, 64), (1, 128, 16, 256), (16, 64, 64, 64), (256, 64, 64, 64)],
)
def test_low_rank(regime, tokens, k, r, out):
    """Each row with its own A and B: the row's product whatever the other rows (and their adapters), and
    exactly the two invariant_linear calls it stands for."""
    g = torch.Generator().manual_seed(tokens + r)
    x, A, B = (
        torch.randn(9, tokens, k, generator=g),
        torch.randn(9, r, k, generator=g),
        torch.randn(9, r, out, generator=g),
    )
    pool = list(torch.cat([x.flatten(1), A.flatten(1), B.flatten(1)], dim=1))

    def product(rows):
        n, a, b = rows.shape[0], tokens * k, r * k
        xs, As, Bs = rows[:, :a], rows[:, a : a + b], rows[:, a + b :]
        return bi.invariant_low_rank(xs.reshape(n, tokens, k), As.reshape(n, r, k), Bs.reshape(n, r, out))

    assert_rows_invariant(product, pool)
    for i in range(9):  # what peft's lora_A and lora_B Linear layers give under make_batch_invariant, bit for bit
        want = bi.invariant_linear(bi.invariant_linear(x[i], A[i], None), B[i].t().contiguous(), None)
        assert torch.equal(product(pool[i][None])[0], want), i
        torch.testing.assert_close(want, F.linear(F.linear(x[i], A[i]), B[i].t()), rtol=1e-4, atol=1e-4)


# Per row of a multi-LoRA batch: its adapters (slot, weight), in order. Slots 1: rank 4, 2 and 3: rank 8,
# 4: rank 16, 5: rank 8 but not on "linear". Row 8 asks what row 1 asks, on other inputs.
LORA_ROWS = [
    ((1, 0.5),),
    ((2, 1.0),),
    ((3, 0.7), (1, 1.2)),
    (),
    ((4, 1.0),),
    ((5, 1.0),),
    ((2, 0.3), (4, 0.9)),
    ((3, 1.0),),
    ((2, 1.0),),
]
LORA_INPUTS = {"linear": (33, 48), "pointwise": (12, 6, 6), "conv": (12, 6, 6)}  # per row


class _LoRALayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(48, 40)
        self.pointwise = torch.nn.Conv2d(12, 20, 1)  # convs: per adapter, through invariant_conv2d
        self.conv = torch.nn.Conv2d(12, 20, 3, padding=1)
        # The base layers' own kernels, as make_batch_invariant gives a UNet's.
        self.linear.forward = types.MethodType(bi._linear_forward, self.linear)
        for conv in (self.pointwise, self.conv):
            conv.forward = types.MethodType(bi._conv_forward, conv)


def _lora_layers() -> MultiLoRAModel:
    g = torch.Generator().manual_seed(5)
    lora = MultiLoRAModel(_LoRALayers(), list(LORA_INPUTS), num_slots=6, max_rank=16, deterministic=True)
    assert lora.kernel.name == "row-invariant"
    for slot, rank in ((1, 4), (2, 8), (3, 8), (4, 16), (5, 8)):
        weights = random_slot_weights(lora, rank, g, alpha=rank / 2)
        if slot == 5:
            del weights["linear"]
        lora.load(slot, weights)
    return lora


@pytest.mark.parametrize("path", list(LORA_INPUTS))
@torch.inference_mode()
def test_lora_rows_are_invariant_to_batch_mates_and_their_adapters(regime, path):
    """A row's output is bit-identical whatever rows, adapters, ranks and batch size share its forward."""
    lora = _lora_layers()
    layer = lora.layers[path]
    pool = list(torch.randn(len(LORA_ROWS), *LORA_INPUTS[path], generator=torch.Generator().manual_seed(6)))

    def forward(picks):
        with lora.routed([LORA_ROWS[i] for i in picks]):
            return layer(torch.stack([pool[i] for i in picks]))

    alone = [forward([i])[0] for i in range(len(LORA_ROWS))]
    # [1, 7, 8]: every row one adapter of rank 8 (two adapters), the product over the whole batch.
    for picks in [*COMPOSITIONS, [1, 7, 8], [8, 1], [5, 3], [6, 2], [2, 6, 4, 0]]:
        out = forward(picks)
        for pos, i in enumerate(picks):
            assert torch.equal(out[pos], alone[i]), f"row {i} at position {pos} of {picks}"
    base = [layer.base(x[None])[0] for x in pool]
    assert torch.equal(alone[3], base[3])  # no adapter: base only, bit for bit
    adapted = (0, 1, 2, 4, 6, 7) if path == "linear" else (0, 1, 2, 4, 5, 6, 7)
    for i in adapted:
        assert (alone[i] - base[i]).abs().max().item() > 1e-2, i  # the adapters apply
    if path == "linear":
        assert torch.equal(alone[5], base[5])  # slot 5 does not target it
    assert not torch.equal(alone[1], alone[8])  # same adapter, other inputs


@torch.inference_mode()
def test_row_invariant_kernel_runs_one_product_per_pass_and_rank(monkeypatch):
    """Rows of any adapters share one product per rank: 5 rows of two rank-8 adapters, one call."""
    from deployments.engine import multi_lora

    lora = _lora_layers()
    calls = []

    def counted(x, A, B, real=multi_lora.invariant_low_rank):
        calls.append((x.shape[0], A.shape[1]))
        return real(x, A, B)

    monkeypatch.setattr(multi_lora, "invariant_low_rank", counted)
    monkeypatch.setattr(multi_lora, "low_rank_batches", lambda x, A, B: True)  # whatever this CPU's bmm does
    x = torch.randn(len(LORA_ROWS), *LORA_INPUTS["linear"])
    with lora.routed(LORA_ROWS):
        lora.layers["linear"](x)
    # pass 0: rank 4 (row 0), rank 8 (rows 1, 2, 6, 7, 8), rank 16 (row 4), slot 5 (rank 0 here) skipped;
    # pass 1: rank 4 (row 2), rank 16 (row 6)
    assert calls == [(1, 4), (5, 8), (1, 16), (1, 4), (1, 16)]
    calls.clear()
    with lora.routed([LORA_ROWS[i] for i in (1, 7, 8)]) as routing:
        lora.layers["linear"](x[:3])
        (group,) = lora.kernel.rank_groups(lora.layers["linear"], routing, 0)
    assert calls == [(3, 8)] and group.rows is None  # every row, in order: no gather of rows


@torch.inference_mode()
def test_row_invariant_kernel_gives_the_bits_of_its_per_adapter_path(monkeypatch):
    """The batched product (where this CPU's check allows it) and the per-adapter invariant_linear calls
    (peft's arithmetic; the fallback) give every row the same bits."""
    from deployments.engine import multi_lora

    lora = _lora_layers()
    x = torch.randn(len(LORA_ROWS), *LORA_INPUTS["linear"], generator=torch.Generator().manual_seed(7))
    with lora.routed(LORA_ROWS):
        batched = lora.layers["linear"](x)
        monkeypatch.setattr(multi_lora, "low_rank_batches", lambda x, A, B: False)
        per_adapter = lora.layers["linear"](x)
    assert torch.equal(batched, per_adapter)


def test_make_batch_invariant_refuses_a_text_encoder(tiny):
    with pytest.raises(TypeError, match="diffusers model"):
        make_batch_invariant(copy.deepcopy(tiny["text_encoder"]))


# ---- whole models ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_unet(tiny):
    """The tiny UNet with the invariant kernels and multi-LoRA layers holding two random adapters."""
    unet = make_batch_invariant(copy.deepcopy(tiny["unet"]))
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1"]
    lora = MultiLoRAModel(unet, targets, num_slots=3, max_rank=8, deterministic=True)
    g = torch.Generator().manual_seed(3)
    for slot, rank in ((1, 4), (2, 8)):
        lora.load(slot, random_slot_weights(lora, rank, g, scale=0.1))
    return unet, lora


@pytest.mark.parametrize("hw", [8, 16])
@torch.inference_mode()
def test_unet_rows_are_batch_invariant(lora_unet, hw):
    unet, lora = lora_unet
    g = torch.Generator().manual_seed(hw)
    n = 9
    x = torch.randn(n, 4, hw, hw, generator=g)
    t = torch.tensor([999.0, 801.0, 500.0, 120.0, 20.0, 1.0, 640.0, 333.0, 77.0])
    c = torch.randn(n, 77, 64, generator=g)
    adapters = [((1, 1.0),), (), ((2, 0.5),), ((1, 0.7), (2, 1.2)), (), ((2, 1.0),), ((1, 0.3),), (), ((2, 0.8),)]

    def forward(picks):
        rows = [adapters[i] for i in picks]
        with lora.routed(rows):
            return unet(x[picks], t[picks], encoder_hidden_states=c[picks]).sample

    alone = [forward([i])[0] for i in range(n)]
    for picks in COMPOSITIONS:
        out = forward(picks)
        for pos, i in enumerate(picks):
            assert torch.equal(out[pos], alone[i]), f"row {i} at position {pos} of {len(picks)}"


@torch.inference_mode()
def test_text_encoder_rows_are_batch_invariant(tiny):
    enc = PromptEncoder(tiny["tokenizer"], copy.deepcopy(tiny["text_encoder"]), cache_size=0, rowwise=True)
    texts = ["a cat", "", "a photograph of an astronaut", "(red:1.2) house " * 30]
    together = enc.encode_prompt(texts)
    for text, emb in zip(texts, together, strict=True):
        assert torch.equal(emb, enc.encode_prompt([text])[0]), text


@torch.inference_mode()
def test_per_image_vae_decode_is_batch_invariant(tiny):
    torch.manual_seed(0)
    z = torch.randn(4, 4, 8, 8)
    full = decode(tiny["vae"], z, per_image=True)
    assert torch.equal(full[2:3], decode(tiny["vae"], z[2:3], per_image=True))
