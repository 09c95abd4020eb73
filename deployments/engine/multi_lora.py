"""Multi-LoRA layers: one forward serves rows with different adapters, scales, or none.

Every targeted ``nn.Linear`` / ``nn.Conv2d`` is wrapped in a layer that keeps
``num_slots`` adapter slots, preallocated with ranks padded to ``max_rank``:

    A: [slots, max_rank, in_features]          (conv: [slots, max_rank, in, kh, kw])
    B: [slots, out_features, max_rank]         (conv: [slots, out, max_rank, 1, 1])

Layers keep only these buffers; the maths lives in a kernel object, one per
``MultiLoRAModel`` (as vLLM's ``lora/punica_wrapper`` does): a layer's forward
is ``kernel.apply(layer, x, base(x), routing)``.

The routing says, for each row of the batch, the ordered list of
``(slot, weight)`` its request asked for. ``MultiLoRAModel.routed`` writes it
into buffers preallocated per model (``RoutingBuffers``) and kernels read a
``LoRARouting``: views of the first ``rows`` rows of those buffers. Several
adapters on one request compose exactly: each row gets
``base(x) + sum_k scaling_k * B_k(A_k(x))`` in the request's order, with
``scaling_k = weight_k * alpha / r`` as peft computes it — the same operations
on the same values as diffusers' ``load_lora_weights`` +
``set_adapters(names, weights)``, so a row's output equals the pipeline's for
that request alone.

Kernels (``make_kernel`` picks one by name):

- ``GroupedKernel``: rows grouped by slot (segmented LoRA), one A and one B
  product per adapter present in the batch, on the gathered rows only, sliced
  to the adapter's own rank: peft's arithmetic. Exact and cheapest on the CPU.
- ``RowInvariantKernel``: the grouped arithmetic through ``batch_invariance``'s
  ``invariant_linear`` / ``invariant_conv2d``, so a row's result does not
  depend on how many rows share its adapter (deterministic mode).
- ``GatherKernel``: every row gathers its adapters' A and B, ranks stacked, and
  each layer runs two ``bmm`` whatever the mix: a fixed number of kernels that
  read only the preallocated routing buffers, for GPUs (and CUDA graphs).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from .batch_invariance import invariant_conv2d, invariant_linear

RowAdapters = Sequence[tuple[int, float]]  # ((slot, weight), ...) in the request's order

KERNELS = ("auto", "grouped", "gather", "row-invariant")


# -- routing ----------------------------------------------------------------------


@dataclass(frozen=True)
class SlotGroup:
    """The rows of one pass that use one slot, in batch order."""

    slot: int
    rows: torch.Tensor  # [n] row indices into the batch: a view of RoutingBuffers.group_rows
    weights: tuple[float, ...]  # one per row


@dataclass(frozen=True)
class LoRARouting:
    """Which adapters apply to which rows of one forward: views of a ``RoutingBuffers``.

    Valid until the buffers are written again (``MultiLoRAModel.routed`` holds a lock meanwhile).
    """

    num_rows: int
    slot_ids: torch.Tensor  # [rows, depth] int64; slot 0 (always empty) pads rows with fewer adapters
    weights: torch.Tensor  # [rows, depth] float32; 0 pads
    # passes[k]: the k-th adapter of every row, grouped by slot. Applying the passes in order keeps
    # each row's additions in its request's order.
    passes: tuple[tuple[SlotGroup, ...], ...]

    @property
    def depth(self) -> int:
        return self.slot_ids.shape[1]

    @property
    def empty(self) -> bool:
        return not self.passes


class RoutingBuffers:
    """One model's routing, preallocated and rewritten in place before each routed forward.

    Sized for ``max_rows`` rows of up to ``max_depth`` adapters each; a larger batch reallocates
    them once (a CUDA graph captured over the old buffers would then need capturing again).

    >>> buffers = RoutingBuffers(max_rows=16, max_depth=4)
    >>> routing = buffers.write([((1, 1.0),), (), ((1, 0.5), (2, 1.0))])
    >>> routing.slot_ids.tolist()   # row 0: slot 1 at weight 1; row 1: none; row 2: slot 1 at 0.5 then slot 2
    [[1, 0], [0, 0], [1, 2]]
    """

    def __init__(self, max_rows: int = 64, max_depth: int = 4, device: torch.device | str = "cpu"):
        if max_rows < 1 or max_depth < 1:
            raise ValueError(f"max_rows and max_depth must be >= 1, got {max_rows} and {max_depth}")
        self.device = torch.device(device)
        self._allocate(max_rows, max_depth)

    def _allocate(self, max_rows: int, max_depth: int) -> None:
        self.max_rows, self.max_depth = max_rows, max_depth
        n = max_rows * max_depth
        # Flat, so that the [rows, depth] view at the front of each is contiguous.
        self.slot_ids = torch.zeros(n, dtype=torch.long, device=self.device)  # [max_rows * max_depth]
        self.weights = torch.zeros(n, dtype=torch.float32, device=self.device)  # [max_rows * max_depth]
        # Every pass's rows sorted by slot, passes one after the other: each SlotGroup is a slice.
        self.group_rows = torch.zeros(n, dtype=torch.long, device=self.device)  # [max_rows * max_depth]

    def write(self, rows: Sequence[RowAdapters]) -> LoRARouting:
        """Write the routing of ``rows`` (one entry per batch row) and return its views."""
        num_rows = len(rows)
        depth = max((len(r) for r in rows), default=0)
        if num_rows > self.max_rows or depth > self.max_depth:
            self._allocate(max(num_rows, self.max_rows), max(depth, self.max_depth))
        n = num_rows * depth
        slot_ids, weights = [0] * n, [0.0] * n
        for i, adapters in enumerate(rows):
            for k, (slot, weight) in enumerate(adapters):
                slot_ids[i * depth + k] = slot
                weights[i * depth + k] = float(weight)
        order: list[int] = []  # group_rows' contents
        spans: list[list[tuple[int, int, int, tuple[float, ...]]]] = []  # per pass: (slot, start, count, weights)
        for k in range(depth):
            by_slot: dict[int, tuple[list[int], list[float]]] = {}
            for i, adapters in enumerate(rows):
                if k < len(adapters):
                    slot, weight = adapters[k]
                    idx, ws = by_slot.setdefault(slot, ([], []))
                    idx.append(i)
                    ws.append(float(weight))
            spans.append([])
            for slot, (idx, ws) in sorted(by_slot.items()):
                spans[-1].append((slot, len(order), len(idx), tuple(ws)))
                order += idx
        if n:
            self.slot_ids[:n].copy_(torch.tensor(slot_ids, dtype=torch.long))
            self.weights[:n].copy_(torch.tensor(weights, dtype=torch.float32))
            self.group_rows[: len(order)].copy_(torch.tensor(order, dtype=torch.long))
        passes = tuple(
            tuple(SlotGroup(slot, self.group_rows[start : start + count], ws) for slot, start, count, ws in groups)
            for groups in spans
        )
        return LoRARouting(
            num_rows,
            self.slot_ids[:n].view(num_rows, depth),
            self.weights[:n].view(num_rows, depth),
            passes,
        )


# -- layers: buffers only ------------------------------------------------------------


@dataclass
class LoRAState:
    """Shared by every layer of one model: its kernel and the routing of the forward in progress."""

    kernel: MultiLoRAKernel
    routing: LoRARouting | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class MultiLoRALayer(torch.nn.Module):
    """A base layer plus ``num_slots`` adapter slots; its forward is ``base(x)`` plus the model's kernel."""

    def __init__(self, base: torch.nn.Module, state: LoRAState, a_shape: tuple, b_shape: tuple, num_slots: int):
        super().__init__()
        self.base = base
        self.state = state
        w = base.weight
        self.register_buffer("lora_A", torch.zeros((num_slots, *a_shape), dtype=w.dtype, device=w.device))
        self.register_buffer("lora_B", torch.zeros((num_slots, *b_shape), dtype=w.dtype, device=w.device))
        self.ranks = [0] * num_slots  # 0: the adapter in this slot does not target this module
        self.alphas = [0.0] * num_slots
        # [slots]: alpha / r of each slot's adapter in this module, 0 where none (its A and B are zeros)
        self.register_buffer("slot_scale", torch.zeros(num_slots, dtype=torch.float32, device=w.device))

    @property
    def max_rank(self) -> int:
        return self.lora_A.shape[1]

    @property
    def tokenwise(self) -> bool:
        """Whether the LoRA product is one matmul per token (or pixel): what the gather kernel handles."""
        return True

    def load_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, alpha: float = 0.0) -> None:
        """Copy one adapter's ``A`` [r, ...] and ``B`` [out, r, ...] into ``slot`` (or clear it)."""
        if A is None or B is None:
            self.ranks[slot] = 0
            self.slot_scale[slot] = 0.0
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
            return
        r = A.shape[0]
        if r > self.max_rank:
            raise ValueError(f"adapter rank {r} exceeds max_rank {self.max_rank}")
        self.ranks[slot] = 0  # never half-loaded while a forward reads it
        self.slot_scale[slot] = 0.0
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :r].copy_(A)
        self.lora_B[slot, :, :r].copy_(B)
        self.alphas[slot] = float(alpha)
        self.slot_scale[slot] = float(alpha) / r
        self.ranks[slot] = r

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base(x, *args, **kwargs)
        routing = self.state.routing
        if routing is None or routing.empty:
            return result
        if routing.num_rows != x.shape[0]:
            raise ValueError(f"LoRA routing covers {routing.num_rows} rows, the batch has {x.shape[0]}")
        return self.state.kernel.apply(self, x, result, routing)


class MultiLoRALinear(MultiLoRALayer):
    def __init__(self, base: torch.nn.Linear, state: LoRAState, num_slots: int, max_rank: int):
        super().__init__(base, state, (max_rank, base.in_features), (base.out_features, max_rank), num_slots)


class MultiLoRAConv2d(MultiLoRALayer):
    def __init__(self, base: torch.nn.Conv2d, state: LoRAState, num_slots: int, max_rank: int):
        kh, kw = base.kernel_size
        super().__init__(
            base, state, (max_rank, base.in_channels, kh, kw), (base.out_channels, max_rank, 1, 1), num_slots
        )

    @property
    def tokenwise(self) -> bool:
        b = self.base
        return b.kernel_size == (1, 1) and b.stride == (1, 1) and b.padding in ((0, 0), 0)


# -- kernels: the maths ---------------------------------------------------------------


class MultiLoRAKernel:
    """How a multi-LoRA layer adds its rows' adapters to ``base(x)``; one instance per model."""

    name: ClassVar[str]

    def apply(self, layer: MultiLoRALayer, x: torch.Tensor, result: torch.Tensor, routing: LoRARouting) -> torch.Tensor:
        """``result`` (``layer.base(x)``, which may be updated in place) plus each row's adapters, in order.

        The additions go into ``result`` itself, adapter after adapter, as peft's
        ``result = result + lora_B(lora_A(x)) * scaling`` does: summing the deltas first
        would round differently.
        """
        raise NotImplementedError


class GroupedKernel(MultiLoRAKernel):
    """Rows grouped by slot: per pass and adapter, ``index_select`` its rows, A then B, scale, ``index_add_``."""

    name = "grouped"

    def apply(self, layer, x, result, routing):
        for groups in routing.passes:
            for g in groups:
                r = layer.ranks[g.slot]
                if r == 0:
                    continue
                # peft: scaling = weight * lora_alpha / r, then result + lora_B(lora_A(x)) * scaling
                scalings = [w * layer.alphas[g.slot] / r for w in g.weights]
                xs = x.index_select(0, g.rows)
                A = layer.lora_A[g.slot, :r]  # [r, in] (conv: [r, in, kh, kw])
                B = layer.lora_B[g.slot, :, :r]  # [out, r] (conv: [out, r, 1, 1])
                if isinstance(layer, MultiLoRAConv2d):
                    delta = self.conv_delta(xs, A, B, layer.base)
                else:
                    delta = self.linear_delta(xs, A, B)
                if len(set(scalings)) == 1:
                    scaled = delta * scalings[0]
                else:
                    s = torch.tensor(scalings, dtype=delta.dtype, device=delta.device)
                    scaled = delta * s.view(-1, *([1] * (delta.dim() - 1)))
                result.index_add_(0, g.rows, scaled)
        return result

    def linear_delta(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``lora_B(lora_A(x))``: x [n, ..., in] -> [n, ..., out]."""
        return F.linear(F.linear(x, A), B)

    def conv_delta(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
        """``lora_B(lora_A(x))`` for a conv: A has the base conv's kernel, stride and padding; B is 1x1."""
        return F.conv2d(F.conv2d(x, A, None, conv.stride, conv.padding, conv.dilation), B)


class RowInvariantKernel(GroupedKernel):
    """The grouped arithmetic through the batch-invariant GEMM and convolution (deterministic mode)."""

    name = "row-invariant"

    def linear_delta(self, x, A, B):
        return invariant_linear(invariant_linear(x, A, None), B, None)

    def conv_delta(self, x, A, B, conv):
        h = invariant_conv2d(x, A, None, conv.stride, conv.padding, conv.dilation)
        return invariant_conv2d(h, B, None)


class GatherKernel(MultiLoRAKernel):
    """Every row gathers its adapters' stacked A and B: two ``bmm`` per layer, whatever the mix.

    Reads only the routing buffers and the layers' slot buffers (no tensor made on the host per
    forward), so one captured CUDA graph replays any routing written into the same buffers. Layers
    that are no matmul per token (k x k or strided convs) go to ``fallback``.
    """

    name = "gather"

    def __init__(self, fallback: GroupedKernel):
        self.fallback = fallback

    def apply(self, layer, x, result, routing):
        if not layer.tokenwise:
            return self.fallback.apply(layer, x, result, routing)
        rows, depth = routing.slot_ids.shape
        R = layer.max_rank
        ids = routing.slot_ids  # [rows, depth]
        A = layer.lora_A.flatten(2)[ids]  # [rows, depth, R, in]
        B = layer.lora_B.flatten(2)[ids]  # [rows, depth, out, R]
        scale = (routing.weights * layer.slot_scale[ids]).to(x.dtype)  # [rows, depth]: weight * alpha / r
        A = A.reshape(rows, depth * R, -1)  # [rows, depth*R, in]: ranks stacked
        B = B.permute(0, 1, 3, 2).reshape(rows, depth * R, -1)  # [rows, depth*R, out]
        h = torch.bmm(self._tokens(layer, x), A.transpose(1, 2))  # [rows, tokens, depth*R]
        h = h * scale.repeat_interleave(R, dim=1)[:, None, :]
        return result + self._untokens(layer, torch.bmm(h, B), result)  # [rows, tokens, out] -> result's shape

    @staticmethod
    def _tokens(layer: MultiLoRALayer, x: torch.Tensor) -> torch.Tensor:
        """``x`` as [rows, tokens, in_features] (a 1x1 conv is a Linear over pixels)."""
        if isinstance(layer, MultiLoRAConv2d):
            return x.flatten(2).transpose(1, 2)  # [rows, h*w, in]
        return x.reshape(x.shape[0], -1, x.shape[-1])

    @staticmethod
    def _untokens(layer: MultiLoRALayer, delta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, MultiLoRAConv2d):
            return delta.transpose(1, 2).reshape(like.shape)  # [rows, out, h, w]
        return delta.reshape(like.shape)


def make_kernel(name: str, *, deterministic: bool, on_cuda: bool) -> MultiLoRAKernel:
    """The kernel ``name`` means for a model (``deterministic``: batch-invariant mode; ``on_cuda``).

    ``"auto"`` is row-invariant when deterministic, gather on CUDA, grouped otherwise. In
    deterministic mode no row may depend on its batch-mates, and a plain grouped product rounds
    according to how many rows share its adapter: there ``"grouped"`` runs row-invariant, and
    gather hands the convolutions it cannot gather to row-invariant too.

    >>> make_kernel("auto", deterministic=False, on_cuda=True).name
    'gather'
    >>> make_kernel("grouped", deterministic=True, on_cuda=False).name
    'row-invariant'
    """
    if name not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(repr(k) for k in KERNELS)}; got {name!r}")
    if name == "auto":
        name = "row-invariant" if deterministic else "gather" if on_cuda else "grouped"
    grouped = RowInvariantKernel() if deterministic or name == "row-invariant" else GroupedKernel()
    return GatherKernel(fallback=grouped) if name == "gather" else grouped


# -- the model ------------------------------------------------------------------------


def text_encoder_key_prefix(text_encoder: torch.nn.Module) -> str:
    """Adapters name CLIP modules ``text_model.encoder...``; transformers 5 flattens ``CLIPTextModel``."""
    return "" if hasattr(text_encoder, "text_model") else "text_model."


def _matches(path: str, targets: Iterable[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


class MultiLoRAModel:
    """A model whose targeted layers carry adapter slots.

    >>> lora = MultiLoRAModel(unet, targets=["to_q", "to_k"], num_slots=8, max_rank=64)   # doctest: +SKIP
    >>> lora.load(slot=1, weights={"down_blocks.0...attn1.to_q": (A, B, alpha), ...})
    >>> with lora.routed([((1, 0.8),), ()]):   # row 0 with slot 1 at 0.8, row 1 base only
    ...     unet(x, t, encoder_hidden_states=c)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        targets: Iterable[str],
        num_slots: int,
        max_rank: int,
        deterministic: bool = False,
        key_prefix: str = "",
        kernel: str = "auto",
        max_rows: int = 64,
        max_depth: int = 4,
    ):
        """``key_prefix`` is prepended to module paths to form the keys adapters use.

        ``kernel``: ``"grouped"``, ``"gather"``, ``"row-invariant"`` or ``"auto"`` (see
        ``make_kernel``). ``max_rows`` x ``max_depth``: the routing buffers' size (rows of one
        forward x adapters per row); a larger forward grows them.
        """
        self.model = model
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.deterministic = deterministic
        self.device = next(model.parameters()).device
        self.state = LoRAState(make_kernel(kernel, deterministic=deterministic, on_cuda=self.device.type == "cuda"))
        self.routing_buffers = RoutingBuffers(max_rows, max_depth, self.device)
        self.layers: dict[str, MultiLoRALayer] = {}
        targets = list(targets)
        for path, module in list(model.named_modules()):
            if not path or not _matches(path, targets):
                continue
            if type(module) is torch.nn.Linear or isinstance(module, torch.nn.Linear):
                layer: MultiLoRALayer = MultiLoRALinear(module, self.state, num_slots, max_rank)
            elif isinstance(module, torch.nn.Conv2d) and module.groups == 1:
                layer = MultiLoRAConv2d(module, self.state, num_slots, max_rank)
            else:
                continue
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, name, layer)
            self.layers[key_prefix + path] = layer
        if not self.layers:
            raise ValueError(f"no Linear or Conv2d module of the model matches the LoRA targets {targets}")

    @property
    def kernel(self) -> MultiLoRAKernel:
        return self.state.kernel

    def use_kernel(self, name: str) -> None:
        """Switch every layer to the kernel ``name`` (benchmarks compare kernels on one model)."""
        with self.state.lock:
            self.state.kernel = make_kernel(name, deterministic=self.deterministic, on_cuda=self.device.type == "cuda")

    def module_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """Per adaptable module: the (A, B) shapes of a rank-1 adapter, for validation."""
        out = {}
        for path, layer in self.layers.items():
            a, b = layer.lora_A.shape[2:], layer.lora_B.shape[1:]
            out[path] = ((1, *a), (b[0], 1, *b[2:]))
        return out

    def unsupported(self, weights: dict) -> list[str]:
        """Modules an adapter targets that these layers cannot carry (not targeted, or wrong shape)."""
        bad = []
        for path, (A, B, _alpha) in weights.items():
            layer = self.layers.get(path)
            if layer is None or tuple(A.shape[1:]) != tuple(layer.lora_A.shape[2:]) or A.shape[0] > self.max_rank:
                bad.append(path)
            elif B.shape[0] != layer.lora_B.shape[1] or B.shape[1] != A.shape[0]:
                bad.append(path)
        return bad

    def load(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Put one adapter (``{module_path: (A, B, alpha)}``) into ``slot`` of every layer."""
        if not 0 < slot < self.num_slots:
            raise ValueError(f"slot must be in [1, {self.num_slots - 1}] (0 means no adapter), got {slot}")
        bad = self.unsupported(weights)
        if bad:
            raise ValueError(f"adapter targets modules these layers cannot carry: {bad[:5]}")
        for path, layer in self.layers.items():
            entry = weights.get(path)
            if entry is None:
                layer.load_slot(slot, None, None)
            else:
                A, B, alpha = entry
                layer.load_slot(slot, A, B, alpha)

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.load_slot(slot, None, None)

    def routed(self, rows: Sequence[RowAdapters]) -> _Routed:
        """A context in which this model's forwards apply ``rows[i]`` to batch row i.

        Entering it takes the model's lock and writes the routing into the preallocated buffers.
        """
        return _Routed(self.state, self.routing_buffers, rows)


class _Routed:
    def __init__(self, state: LoRAState, buffers: RoutingBuffers, rows: Sequence[RowAdapters]):
        self.state = state
        self.buffers = buffers
        self.rows = rows

    def __enter__(self) -> LoRARouting:
        self.state.lock.acquire()
        try:
            self.state.routing = self.buffers.write(self.rows)
        except BaseException:
            self.state.lock.release()
            raise
        return self.state.routing

    def __exit__(self, *exc):
        self.state.routing = None
        self.state.lock.release()
        return False
