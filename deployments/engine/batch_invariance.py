"""Batch-invariant kernels on the CPU: a row's result never depends on its batch-mates.

Batching must not change images. A denoising loop with classifier-free
guidance amplifies last-bit differences about 20x per step (on random weights),
so a request's image would depend on what else was running if any kernel
rounded a row differently in a different batch. And the libraries do:

- MKL and oneDNN pick GEMM and convolution kernels, blockings and thread
  splits by shape: ``F.linear`` on 128 rows rounds a row differently than on
  192 (on Intel CPUs, with AVX-512 or AVX2; AMD CPUs get other kernels, which
  is why a suite can pass on one machine and fail on another);
- ``bmm`` switches between one GEMM and MKL's batched GEMM by batch count;
- element-wise activations (SiLU, GELU, sigmoid) compute most elements with
  vector code and the tail of each thread's chunk with scalar code, which
  rounds differently, and where the chunks end depends on the tensor's size;
- CPU attention splits its work across threads by batch size.

So nothing here relies on a library keeping its kernel choice across shapes.
Every operation that combines numbers (GEMMs, convolutions, attention,
normalisations, activations) goes through ``invariant_call``, which defines a
*canonical* computation per item and only ever returns that:

1. **Tiles of a fixed shape.** The canonical computation runs the operation on
   tiles of exactly ``size`` items along dim 0 (GEMM rows: the rows of the
   whole batch; images, attention items, ...), the last tile zero-padded,
   every tile contiguous with row-major strides and 64-byte aligned. ``size``
   depends on the layer and on one item's size, never on the batch, so every
   call has the same shapes and layout and the library makes the same choices.
   That an item's result does not depend on *where* in a tile it sits is
   checked, not assumed (``positions_are_independent``: a random tile rolled by
   one item and by half a tile plus one must give bit-identical items). Where
   the check fails, the canonical computation is one item per call, which
   needs no check: the call's shapes and inputs then depend on the item alone.
2. **The whole batch, where it is shown to be canonical.** Calling the library
   once on the whole batch is faster. For each batch shape, the first call
   runs the batch call and the canonical computation on two random inputs and
   compares them bit for bit; the batch call is used for that shape only if
   they agree. The order of a kernel's operations never depends on the data,
   so random inputs of like magnitude and random sign, where any change of
   reduction order shows in the low bits of almost every output, show whether
   the two compute the same way.
3. **Activations.** An element-wise kernel computes most elements with vector
   code and each chunk's tail with scalar code, and the two disagree on only a
   few percent of inputs, which random data could miss. So the check's inputs
   are values on which this machine's vector and scalar code are known to
   disagree (``sensitive_inputs``): any element that takes the other path then
   shows. Without such values nothing can show it, and the items run one per
   call.

Checks are cached per operation, shapes, dtype, device and thread count: the
first batch of a new shape pays for them, later ones do not. Element-wise
arithmetic other than the activations (add, multiply, divide) rounds once per
element in vector and scalar code alike, so it needs nothing. The VAE and the
text encoder run one image / one prompt row per call instead
(``images.decode``, ``images.latent_dist``, ``PromptEncoder(rowwise=True)``).

``docs/benchmarks.md`` has what this costs.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ALIGNMENT_BYTES = 64


@dataclass(frozen=True)
class TilePolicy:
    """How many items one call takes: a power of two in ``[low, high]``, ``work`` units per call at most."""

    work: int
    low: int
    high: int

    def size(self, work_per_item: int) -> int:
        size = self.low
        while size * 2 * max(1, work_per_item) <= self.work and size < self.high:
            size *= 2
        return size


# GEMM rows: multiply-adds per row = in * out.
GEMM_ROWS = TilePolicy(work=1 << 20, low=64, high=256)
# Images per convolution: multiply-adds per image.
CONV_IMAGES = TilePolicy(work=1 << 23, low=1, high=8)
# Items per attention call: multiply-adds per item (heads * q_len * kv_len * head_dim).
ATTENTION_ITEMS = TilePolicy(work=1 << 21, low=1, high=8)
# Items per normalisation call: elements per item.
NORM_ITEMS = TilePolicy(work=1 << 16, low=1, high=8)


def _default_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the default (row-major) strides and 64-byte aligned: a copy only where it is not.

    ``contiguous()`` is not enough: a ``[n, c, 1, 1]`` tensor is contiguous with
    channels-last strides too, and convolutions pick their kernel by strides.
    """
    if t.stride() == _default_strides(t.shape) and t.data_ptr() % ALIGNMENT_BYTES == 0:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


def _pad(t: torch.Tensor, size: int) -> torch.Tensor:
    """``t`` [n, ...] with zero items appended up to ``size`` (a new, aligned tensor)."""
    out = t.new_zeros(size, *t.shape[1:])
    out[: t.shape[0]] = t
    return out


def _tiles(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], size: int) -> torch.Tensor:
    """``fn`` over ``inputs`` (each [n, ...]) in calls of exactly ``size`` items, the last zero-padded."""
    n = inputs[0].shape[0]
    outs = []
    for start in range(0, n, size):
        parts = [x[start : start + size] for x in inputs]
        if parts[0].shape[0] < size:
            parts = [_pad(p, size) for p in parts]
        outs.append(fn(*(_canonical(p) for p in parts)))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out[:n]


def _per_item(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    n = inputs[0].shape[0]
    return torch.cat([fn(*(_canonical(x[i : i + 1]) for x in inputs)) for i in range(n)])


_checked: dict[tuple, bool] = {}


def _probe(shapes: list[tuple[int, ...]], like: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Standard-normal inputs for a check: terms of like magnitude and random sign, so that any
    change in the order of a reduction shows up in the low bits of almost every output (the order
    of operations never depends on the data)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).to(like.device, like.dtype) for shape in shapes)


def _check(key: tuple, test: Callable[[], bool]) -> bool:
    known = _checked.get(key)
    if known is None:
        known = _checked[key] = bool(test())
    return known


def positions_are_independent(fn: Callable[..., torch.Tensor], tiles: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``fn`` computes every item of a tile the same way, wherever in the tile it sits.

    ``tiles``: random inputs of the tile's shape. They are computed as they
    are, rolled by one item and rolled by half a tile plus one; the outputs
    must agree bit for bit, item by item. A kernel that handled some positions
    another way (an edge block, a thread boundary, a scalar tail) rounds them
    differently and fails.
    """
    size = tiles[0].shape[0]
    if size == 1:
        return True
    ref = fn(*tiles)
    for shift in sorted({1, size // 2 + 1}):
        rolled = fn(*(_canonical(torch.roll(t, shift, 0)) for t in tiles))
        if not torch.equal(torch.roll(ref, shift, 0), rolled):
            return False
    return True


def invariant_call(
    op: str,
    fn: Callable[..., torch.Tensor],
    *inputs: torch.Tensor,
    size: int,
    key: tuple = (),
    checkable: bool = True,
    probe: Callable[[list[tuple[int, ...]], int], tuple[torch.Tensor, ...]] | None = None,
) -> torch.Tensor:
    """``fn(*inputs)`` (each [n, ...], split along dim 0) whose items never depend on each other.

    The canonical computation runs ``fn`` on tiles of exactly ``size`` items,
    where that is checked to be position-independent, and one item per call
    otherwise. A call on the whole batch at once is used instead where it is
    checked to give every item exactly the canonical result; on most machines
    and shapes it does, and then invariance costs nothing but the first check.
    Each check runs once per shape (``key`` adds what else picks ``fn``'s
    kernel: weight shapes, strides, ...), dtype, device and thread count.

    ``probe(shapes, seed)`` makes the check inputs instead of ``_probe`` (``invariant_elementwise``).
    ``checkable=False`` runs one item per call, with no checks.
    """
    n = inputs[0].shape[0]
    x0 = inputs[0]
    if n == 0:
        return fn(*inputs)
    if not checkable:
        return _per_item(fn, inputs) if n > 1 else fn(*(_canonical(x) for x in inputs))
    if probe is None:

        def probe(shapes: list[tuple[int, ...]], seed: int) -> tuple[torch.Tensor, ...]:
            return _probe(shapes, x0, seed)

    base = (op, *(tuple(x.shape[1:]) for x in inputs), *key, x0.dtype, x0.device.type, torch.get_num_threads())
    tiled = size > 1 and _check(
        (*base, "tile", size),
        lambda: positions_are_independent(fn, probe([(size, *x.shape[1:]) for x in inputs], 0)),
    )

    def canonical(*xs: torch.Tensor) -> torch.Tensor:
        return _tiles(fn, xs, size) if tiled else _per_item(fn, xs)

    if n == size and tiled:
        return _tiles(fn, inputs, size)

    def batched_is_canonical() -> bool:  # two probes: a short reduction may round alike by chance
        shapes = [(n, *x.shape[1:]) for x in inputs]
        return all(torch.equal(fn(*xs), canonical(*xs)) for xs in (probe(shapes, 0), probe(shapes, 1)))

    if _check((*base, "batch", n), batched_is_canonical):
        return fn(*(_canonical(x) for x in inputs))
    return canonical(*inputs)


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` whose result for a row does not depend on the other rows.

    ``x``: [..., in]; every row (all leading dims flattened) is one tile item.
    """
    k, n = x.shape[-1], weight.shape[0]
    flat = x.reshape(-1, k)  # [rows, in]

    def gemm(rows: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return F.linear(rows, weight, bias)

    out = invariant_call("linear", gemm, flat, size=GEMM_ROWS.size(k * n), key=(n, bias is not None))
    return out.reshape(*x.shape[:-1], n)


def _low_rank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return torch.bmm(torch.bmm(x, A.transpose(1, 2)), B)  # [n, tokens, r] @ [n, r, out]


def _low_rank_rows(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Row by row, as peft's ``lora_B(lora_A(x))`` computes through ``invariant_linear``."""
    return torch.stack(
        [invariant_linear(invariant_linear(x[i], A[i], None), B[i].t().contiguous(), None) for i in range(x.shape[0])]
    )


def low_rank_batches(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether one ``bmm`` pair over these shapes gives every row exactly what ``_low_rank_rows`` gives.

    Checked once per shape (rows included) on two random probes, as ``invariant_call`` checks a batch.
    """
    shapes = [tuple(x.shape), tuple(A.shape), tuple(B.shape)]
    key = ("low-rank", *shapes, "batch", x.dtype, x.device.type, torch.get_num_threads())

    def test() -> bool:
        probes = (_probe(shapes, x, 0), _probe(shapes, x, 1))
        return all(torch.equal(_low_rank(*p), _low_rank_rows(*p)) for p in probes)

    return _check(key, test)


def invariant_low_rank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Each row's ``F.linear(F.linear(x, A), B.T)`` with its own ``A`` and ``B`` (a LoRA product), invariant.

    ``x``: [rows, tokens, in]; ``A``: [rows, r, in]; ``B``: [rows, r, out] -> [rows, tokens, out].
    The canonical result is each row's two ``invariant_linear`` calls, what peft's ``lora_A`` and
    ``lora_B`` layers compute under ``make_batch_invariant``, so a row equals diffusers' bit for bit
    and does not depend on the other rows or their adapters. One batched product for every row
    replaces it where ``low_rank_batches`` shows it equal (on most machines it is; MKL's Intel AVX2
    kernels round a ``bmm`` otherwise than a GEMM of another row count).
    """
    if x.shape[0] and low_rank_batches(x, A, B):
        return _low_rank(_canonical(x), _canonical(A), _canonical(B))
    return _low_rank_rows(x, A, B)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_out_hw(hw, kernel_hw, stride, padding, dilation) -> tuple[int, int]:
    """Output height and width of a convolution (``padding`` may be ``"same"`` or ``"valid"``)."""
    if padding == "same":
        return (int(hw[0]), int(hw[1]))
    pad = (0, 0) if padding == "valid" else _pair(padding)
    s, d = _pair(stride), _pair(dilation)
    h, w = ((hw[i] + 2 * pad[i] - d[i] * (kernel_hw[i] - 1) - 1) // s[i] + 1 for i in range(2))
    return h, w


def invariant_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    conv: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A convolution whose result for an image does not depend on the other images.

    ``x``: [images, in, h, w]. ``conv`` overrides ``F.conv2d`` (an ``nn.Conv2d``'s
    own ``_conv_forward``, for its padding modes).
    """
    if conv is None:

        def conv(t: torch.Tensor) -> torch.Tensor:
            return F.conv2d(t, weight, bias, stride, padding, dilation)

    out_h, out_w = conv_out_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    work = weight.numel() * out_h * out_w
    key = (tuple(weight.shape), str(stride), str(padding), str(dilation), bias is not None)
    return invariant_call("conv2d", conv, x, size=CONV_IMAGES.size(work), key=key)


def invariant_norm(op: str, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A normalisation ``fn`` (its statistics taken within each item of dim 0), invariant."""
    return invariant_call(op, fn, x, size=NORM_ITEMS.size(x[:1].numel()))


_sensitive: dict[tuple, torch.Tensor | None] = {}
SENSITIVITY_SAMPLES = 4096


def sensitive_inputs(op: str, fn: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor) -> torch.Tensor | None:
    """Inputs on which ``fn``'s vector code and its scalar code round differently, or None.

    An element-wise kernel computes most elements with vector code and a
    chunk's tail with scalar code. Values are computed both ways (inside a
    tensor whose length is a multiple of any vector width: vector code; alone:
    the scalar tail) and the ones that differ are kept. A check whose inputs are
    all such values sees any element that went down the other path.
    """
    key = (op, like.dtype, like.device.type, torch.get_num_threads())
    if key not in _sensitive:
        g = torch.Generator().manual_seed(1)
        x = (torch.randn(SENSITIVITY_SAMPLES, generator=g) * 4).to(like.device, like.dtype)
        vector = fn(x)
        scalar = torch.cat([fn(x[i : i + 1].clone()) for i in range(SENSITIVITY_SAMPLES)])
        differ = x[vector != scalar]
        _sensitive[key] = differ if differ.numel() else None
    return _sensitive[key]


def invariant_elementwise(op: str, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """An element-wise function (an activation) over ``x``, invariant per item (dim 0).

    One item per call, or the whole batch at once where a check on inputs from
    ``sensitive_inputs`` shows that every element takes the path it takes alone.
    Without such inputs nothing can show it, and items run one per call.
    """
    if x.dim() == 0:
        return fn(x)
    values = sensitive_inputs(op, fn, x)
    if values is None:
        return invariant_call(op, fn, x, size=1, checkable=False)

    def probe(shapes: list[tuple[int, ...]], seed: int) -> tuple[torch.Tensor, ...]:
        (shape,) = shapes
        numel = math.prod(shape)
        return (values.repeat(-(-numel // values.numel()))[:numel].reshape(shape),)

    return invariant_call(op, fn, x, size=1, probe=probe)


def invariant_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask=None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on [batch, heads, len, head_dim] inputs, invariant per batch item."""
    heads, q_len, head_dim = query.shape[1:]
    work = heads * q_len * key.shape[2] * head_dim
    size = ATTENTION_ITEMS.size(work)
    if mask is None:
        return invariant_call("sdpa", F.scaled_dot_product_attention, query, key, value, size=size)
    mask = mask.expand(query.shape[0], *mask.shape[1:])

    def attend(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    return invariant_call("sdpa-masked", attend, query, key, value, mask.contiguous(), size=size)


class InvariantAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with the attention itself through ``invariant_attention``.

    The projections (``to_q``/``to_k``/``to_v``/``to_out``) are ``nn.Linear``
    layers, made invariant by ``make_batch_invariant`` like every other. Subclasses change ``_attend``
    and add a term before ``to_out`` with ``_added`` (IP-Adapter's rows: ``ip_adapter.py``).
    """

    def _attend(self, query, key, value, mask=None):
        return invariant_attention(query, key, value, mask)  # [batch, heads, q_len, head_dim]

    def _added(self, attn, query, hidden_states, head_dim):
        """``hidden_states`` [batch, q_len, inner] before ``to_out``, with what a subclass adds (nothing here)."""
        return hidden_states

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [batch, heads, q_len, head_dim]
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [batch, heads, kv_len, head_dim]
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = self._attend(query, key, value, attention_mask)  # [batch, heads, q_len, head_dim]
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = self._added(attn, query, hidden_states, head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


_ACTIVATIONS = (torch.nn.SiLU, torch.nn.GELU, torch.nn.Sigmoid, torch.nn.Mish, torch.nn.Tanh, torch.nn.Softplus)
_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def _linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return invariant_linear(x, self.weight, self.bias)


def _conv_forward(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    def conv(t: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(t, self.weight, self.bias)

    return invariant_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, conv=conv)


def _elementwise_forward(op: str, forward: Callable[..., torch.Tensor]):
    def call(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_elementwise(op, forward, x)

    return call


def _norm_forward(op: str, forward: Callable[[torch.Tensor], torch.Tensor]):
    def call(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_norm(op, forward, x)

    return call


def make_batch_invariant(model: torch.nn.Module) -> torch.nn.Module:
    """Give ``model`` (a diffusers UNet or VAE) the batch-invariant kernels, in place; returns it.

    Every ``nn.Linear``, ``nn.Conv2d``, activation, normalisation, GELU gate and
    timestep embedding runs through the tiles above, and attention through
    ``InvariantAttnProcessor``. Layers wrapped by peft or by ``multi_lora`` keep
    plain modules inside, so they get the same kernels.
    """
    from diffusers.models.activations import GEGLU, GELU
    from diffusers.models.embeddings import Timesteps

    if not hasattr(model, "set_attn_processor"):
        # A transformers text encoder's attention is its own: PromptEncoder(rowwise=True) instead.
        raise TypeError(f"make_batch_invariant takes a diffusers model, got {type(model).__name__}")
    model.set_attn_processor(InvariantAttnProcessor())
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = types.MethodType(_linear_forward, module)
        elif type(module) is torch.nn.Conv2d:
            module.forward = types.MethodType(_conv_forward, module)
        elif isinstance(module, _NORMS):
            op = f"{type(module).__name__}:{getattr(module, 'num_groups', '')}:{module.eps}"
            module.forward = types.MethodType(_norm_forward(op, module.forward), module)
        elif isinstance(module, _ACTIVATIONS):
            op = f"{type(module).__name__}:{getattr(module, 'approximate', '')}"
            module.forward = types.MethodType(_elementwise_forward(op, module.forward), module)
        elif isinstance(module, Timesteps):  # sines of [batch] timesteps: tiny, one per call
            forward = module.forward
            module.forward = types.MethodType(
                lambda self, t, forward=forward: invariant_call("timesteps", forward, t, size=1, checkable=False),
                module,
            )
        elif isinstance(module, GEGLU | GELU):
            gelu = module.gelu  # the bound method: they call self.gelu(gate) on a strided half
            op = f"{type(module).__name__}.gelu:{getattr(module, 'approximate', '')}"
            module.gelu = lambda gate, gelu=gelu, op=op: invariant_elementwise(op, gelu, gate)
    return model
