"""Multi-LoRA layers: one forward serves rows with different adapters, scales, or none.

Every targeted ``nn.Linear`` / ``nn.Conv2d`` is wrapped in a layer whose adapter
weights live in **pages**, one rank each (S-LoRA's unified paging):

    A: [pages, in_features]          (conv: [pages, in, kh, kw])   row j of an adapter's A
    B: [pages, out_features]                                       column j of its B

An adapter of rank r in a *slot* (a handle: slot 0 means "no adapter") owns r
pages, the same page numbers in every layer (its largest rank over the layers;
where a layer's own rank is smaller, or the layer is not targeted, the extra
pages are zero there). Memory is paid in proportion to rank: a rank-4 adapter
takes a sixteenth of a rank-64 one. Page 0 is always zero (it pads). The
model's ``pages`` (the byte budget divided by one page's bytes over every
layer) are allocated and freed by ``MultiLoRAModel.load`` / ``clear``,
contiguous runs first; ``page_table`` [slots, max_rank] maps each slot to its
pages for the gather kernel.

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
- ``RowInvariantKernel`` (deterministic mode): per pass, the rows whose adapters
  have one rank in the layer, whatever the adapters, in one batched product
  (``batch_invariance.invariant_low_rank``: each row with its own gathered A and
  B, checked to give each row what its own ``invariant_linear`` calls give), so a
  row's result depends neither on its batch-mates nor on which adapters they
  use. One product per layer and pass on the usual mix, where a product per
  adapter costs more in calls than the model on a small UNet. Convolutions:
  per adapter, through ``invariant_conv2d``, as peft's conv layers compute.
- ``GatherKernel``: every row gathers its adapters' A and B, ranks stacked, and
  each layer runs two ``bmm`` whatever the mix: a fixed number of kernels that
  read only the preallocated routing buffers, for GPUs (and CUDA graphs).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from .batch_invariance import invariant_conv2d, invariant_linear, invariant_low_rank, low_rank_batches

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
    # Kernels' index tensors derived from this routing, shared by the layers of one forward.
    memo: dict = field(default_factory=dict, compare=False, repr=False)
    # The gather kernel's columns: each row's adapters' pages side by side (every page of its first adapter,
    # then of its second, ...), padded with page 0 (always zero) to ``width`` columns. None: not written.
    pages: torch.Tensor | None = None  # [rows, width] int64 page numbers
    page_slots: torch.Tensor | None = None  # [rows, width] int64: the slot each column's page belongs to (0 pads)
    page_weights: torch.Tensor | None = None  # [rows, width] float32: its request's weight for that adapter
    # Written at a fixed width for a captured CUDA graph (``RoutingBuffers.write(..., width=)``): its shapes
    # depend on the width alone, never on the mix of adapters.
    static: bool = False

    @property
    def depth(self) -> int:
        return self.slot_ids.shape[1]

    @property
    def width(self) -> int:
        return 0 if self.pages is None else self.pages.shape[1]

    @property
    def empty(self) -> bool:
        return not self.passes and self.width == 0


ROUTING_WIDTHS = (8, 16, 32, 64, 128, 256, 512)  # the gather kernel's column counts (a captured graph's key)


def width_bucket(columns: int, widths: Sequence[int] = ROUTING_WIDTHS) -> int:
    """The gather width for rows needing at most ``columns`` page columns: 0 (no adapter), a bucket, or itself.

    >>> width_bucket(0), width_bucket(4), width_bucket(16), width_bucket(17), width_bucket(600)
    (0, 8, 16, 32, 600)
    """
    if columns <= 0:
        return 0
    return next((w for w in widths if w >= columns), columns)


class RoutingBuffers:
    """One model's routing, preallocated and rewritten in place before each routed forward.

    Sized for ``max_rows`` rows of up to ``max_depth`` adapters each and ``max_width`` gather columns; a
    larger forward reallocates them once (a CUDA graph captured over the old buffers must then be
    captured again).

    >>> buffers = RoutingBuffers(max_rows=16, max_depth=4)
    >>> routing = buffers.write([((1, 1.0),), (), ((1, 0.5), (2, 1.0))])
    >>> routing.slot_ids.tolist()   # row 0: slot 1 at weight 1; row 1: none; row 2: slot 1 at 0.5 then slot 2
    [[1, 0], [0, 0], [1, 2]]
    >>> routing = buffers.write([((1, 1.0),), ((2, 0.5),)], slot_pages=[[], [5, 6], [7]])
    >>> routing.pages.tolist(), routing.page_slots.tolist()   # the gather columns, padded to a width of 8
    ([[5, 6, 0, 0, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0, 0, 0]], [[1, 1, 0, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0, 0, 0]])
    """

    def __init__(self, max_rows: int = 64, max_depth: int = 4, device: torch.device | str = "cpu", max_width: int = 64):
        if max_rows < 1 or max_depth < 1 or max_width < 1:
            raise ValueError(
                f"max_rows, max_depth and max_width must be >= 1, got {max_rows}, {max_depth}, {max_width}"
            )
        self.device = torch.device(device)
        self._allocate(max_rows, max_depth, max_width)

    def _allocate(self, max_rows: int, max_depth: int, max_width: int) -> None:
        self.max_rows, self.max_depth, self.max_width = max_rows, max_depth, max_width
        n = max_rows * max_depth
        # Flat, so that the [rows, depth] view at the front of each is contiguous.
        self.slot_ids = torch.zeros(n, dtype=torch.long, device=self.device)  # [max_rows * max_depth]
        self.weights = torch.zeros(n, dtype=torch.float32, device=self.device)  # [max_rows * max_depth]
        # Every pass's rows sorted by slot, passes one after the other: each SlotGroup is a slice.
        self.group_rows = torch.zeros(n, dtype=torch.long, device=self.device)  # [max_rows * max_depth]
        # The gather columns: pages, then their slots, in one buffer (one copy per forward); and their weights.
        self.columns = torch.zeros(2 * max_rows * max_width, dtype=torch.long, device=self.device)
        self.column_weights = torch.zeros(max_rows * max_width, dtype=torch.float32, device=self.device)

    def write(
        self, rows: Sequence[RowAdapters], slot_pages: Sequence[Sequence[int]] | None = None, width: int | None = None
    ) -> LoRARouting:
        """Write the routing of ``rows`` (one entry per batch row) and return its views.

        ``slot_pages``: each slot's pages (``LoRAState.pages``), for the gather kernel's columns; None: no
        columns. ``width``: write the columns exactly this wide and mark the routing ``static``, as a captured
        CUDA graph needs (its shapes must not depend on the mix of adapters); None: ``width_bucket`` of the
        widest row."""
        num_rows = len(rows)
        static = width is not None
        depth = max((len(r) for r in rows), default=0)
        columns = 0
        if slot_pages is not None:
            columns = max((sum(len(slot_pages[slot]) for slot, _ in r) for r in rows), default=0)
        if static and columns > width:
            raise ValueError(f"a row needs {columns} gather columns; this routing is written {width} wide")
        width = width if static else width_bucket(columns) if slot_pages is not None else 0
        if num_rows > self.max_rows or depth > self.max_depth or width > self.max_width:
            self._allocate(max(num_rows, self.max_rows), max(depth, self.max_depth), max(width, self.max_width))
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
        gather: dict = {}
        if width:
            m = num_rows * width
            pages, slots, page_weights = [0] * m, [0] * m, [0.0] * m
            for i, adapters in enumerate(rows):
                j = i * width
                for slot, weight in adapters:
                    for page in slot_pages[slot]:
                        pages[j], slots[j], page_weights[j] = page, slot, float(weight)
                        j += 1
            self.columns[: 2 * m].copy_(torch.tensor(pages + slots, dtype=torch.long))
            self.column_weights[:m].copy_(torch.tensor(page_weights, dtype=torch.float32))
            gather = {
                "pages": self.columns[:m].view(num_rows, width),
                "page_slots": self.columns[m : 2 * m].view(num_rows, width),
                "page_weights": self.column_weights[:m].view(num_rows, width),
            }
        return LoRARouting(
            num_rows,
            self.slot_ids[:n].view(num_rows, depth),
            self.weights[:n].view(num_rows, depth),
            passes,
            static=static,
            **gather,
        )


# -- layers: buffers only ------------------------------------------------------------


class NoFreePagesError(RuntimeError):
    """Not enough free pages for an adapter: free some (evict an unused adapter) first."""


@dataclass
class LoRAState:
    """Shared by every layer of one model: its kernel, its slots' pages, the routing of the forward."""

    kernel: MultiLoRAKernel
    page_table: torch.Tensor  # [slots, max_rank] int64: each slot's pages, then page 0 (zero) as padding
    pages: list[list[int]]  # per slot: its pages (the page numbers of ranks 0, 1, ...); [] when empty
    routing: LoRARouting | None = None
    # Whether the forward under way takes the LoRA path (``routing`` set and not empty): one plain bool, decided
    # once per routed forward, so that a compiled block (``model.compile: regional``) guards on it alone.
    active: bool = False
    # Bumped whenever a layer first carries an adapter (``MultiLoRALayer.carries``): a captured CUDA graph
    # recorded which layers take the LoRA path, so one of an older layout is stale.
    layout: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, slot: int, r: int) -> slice | list[int]:
        """The first ``r`` pages of ``slot``: a slice where they are contiguous (the usual case)."""
        pages = self.pages[slot][:r]
        start = pages[0]
        return slice(start, start + r) if pages[-1] - start == r - 1 and len(pages) == r else pages


class MultiLoRALayer(torch.nn.Module):
    """A base layer plus paged adapter weights; its forward is ``base(x)`` plus the model's kernel."""

    def __init__(self, base: torch.nn.Module, state: LoRAState, a_shape: tuple, out: int, num_pages: int):
        super().__init__()
        self.base = base
        self.state = state
        w = base.weight
        num_slots = state.page_table.shape[0]
        self.register_buffer("lora_A", torch.zeros((num_pages, *a_shape), dtype=w.dtype, device=w.device))
        self.register_buffer("lora_B", torch.zeros((num_pages, out), dtype=w.dtype, device=w.device))
        self.ranks = [0] * num_slots  # 0: the adapter in this slot does not target this module
        self.alphas = [0.0] * num_slots
        # Whether an adapter has targeted this module since start: a layer none has skips the LoRA path (adapters
        # that target only the attention projections leave the convolutions plain). It never turns back off, so
        # evictions never invalidate captured graphs: the layout changes at most once per layer.
        self.carries = False
        # [slots]: alpha / r of each slot's adapter in this module, 0 where none (its pages are zeros here)
        self.register_buffer("slot_scale", torch.zeros(num_slots, dtype=torch.float32, device=w.device))

    @property
    def a_shape(self) -> tuple[int, ...]:
        """One page of A: ``(in,)`` or a conv's ``(in, kh, kw)``."""
        return tuple(self.lora_A.shape[1:])

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[1]

    @property
    def page_bytes(self) -> int:
        """Bytes one page takes in this layer (A's row and B's column)."""
        return (self.lora_A[0].numel() + self.lora_B[0].numel()) * self.lora_A.element_size()

    @property
    def tokenwise(self) -> bool:
        """Whether the LoRA product is one matmul per token (or pixel): what the gather kernel handles."""
        return True

    def load_slot(
        self,
        slot: int,
        pages: list[int] | slice | torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        alpha: float,
        write_scale: bool = True,
    ) -> None:
        """Write one adapter's ``A`` [r, ...] and ``B`` [out, r, ...] into its first r ``pages`` (a slice where
        they are contiguous, else page numbers). Its other pages must be zero in this layer: free pages are
        (``zero_slot`` zeroes them on the way out), so only the adapter's own rows move. Host tensors are
        copied straight into the pages (asynchronously where they are pinned and the pages on the GPU).
        ``write_scale=False``: the caller writes ``slot_scale`` (``MultiLoRAModel.load``: one copy for every layer)."""
        r = A.shape[0]
        if isinstance(pages, slice):
            if r > pages.stop - pages.start:
                raise ValueError(f"adapter rank {r} needs {r} pages, the slot has {pages.stop - pages.start}")
            self.lora_A[pages.start : pages.start + r].copy_(A, non_blocking=True)
            # B [out, r] into the pages' [r, out] seen transposed: the host side stays one contiguous copy.
            self.lora_B[pages.start : pages.start + r].t().copy_(B.reshape(B.shape[0], r), non_blocking=True)
        else:
            index = torch.as_tensor(pages, dtype=torch.long).to(self.lora_A.device, non_blocking=True)
            if r > index.numel():
                raise ValueError(f"adapter rank {r} needs {r} pages, the slot has {index.numel()}")
            A = A.to(device=self.lora_A.device, dtype=self.lora_A.dtype, non_blocking=True)
            B = B.to(device=self.lora_B.device, dtype=self.lora_B.dtype, non_blocking=True)
            self.lora_A.index_copy_(0, index[:r], A)
            self.lora_B.index_copy_(0, index[:r], B.reshape(B.shape[0], r).t())  # [r, out]
        if write_scale:
            self.slot_scale[slot] = float(alpha) / r
        self.note_loaded(slot, r, alpha)

    def note_loaded(self, slot: int, r: int, alpha: float) -> None:
        """``slot`` now holds a rank-``r`` adapter here (its pages written, by ``load_slot`` or a packed load)."""
        self.alphas[slot] = float(alpha)
        self.ranks[slot] = r
        self._update_carries()

    def _update_carries(self) -> None:
        if not self.carries and any(self.ranks):
            self.carries = True
            self.state.layout += 1

    def zero_slot(self, slot: int, pages: slice | torch.Tensor) -> None:
        """Zero ``slot``'s pages here and forget its adapter (only where it had one: others are zero already)."""
        r = self.ranks[slot]
        if r == 0:
            return
        self.ranks[slot] = 0
        self.alphas[slot] = 0.0
        self.slot_scale[slot] = 0.0
        if isinstance(pages, slice):
            self.lora_A[pages.start : pages.start + r].zero_()
            self.lora_B[pages.start : pages.start + r].zero_()
        else:
            self.lora_A.index_fill_(0, pages[:r], 0.0)
            self.lora_B.index_fill_(0, pages[:r], 0.0)

    def adapter(self, slot: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``slot``'s ``A`` [r, in] (conv: [r, in, kh, kw]) and ``B`` [out, r] (conv: [out, r, 1, 1]),
        contiguous, as peft's ``lora_A.weight`` / ``lora_B.weight`` are."""
        run = self.state.run(slot, r)
        if isinstance(run, slice):
            A, B_rows = self.lora_A[run], self.lora_B[run]  # [r, ...], [r, out]: views
        else:
            index = torch.tensor(run, dtype=torch.long, device=self.lora_A.device)
            A, B_rows = self.lora_A.index_select(0, index), self.lora_B.index_select(0, index)
        return A, self._b_weight(B_rows.t().contiguous())

    def _b_weight(self, B: torch.Tensor) -> torch.Tensor:
        return B  # [out, r]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base(x, *args, **kwargs)
        if not self.state.active or not self.carries:
            return result
        routing = self.state.routing
        if routing.num_rows != x.shape[0]:
            raise ValueError(f"LoRA routing covers {routing.num_rows} rows, the batch has {x.shape[0]}")
        return self.state.kernel.apply(self, x, result, routing)


class MultiLoRALinear(MultiLoRALayer):
    def __init__(self, base: torch.nn.Linear, state: LoRAState, num_pages: int):
        super().__init__(base, state, (base.in_features,), base.out_features, num_pages)


class MultiLoRAConv2d(MultiLoRALayer):
    def __init__(self, base: torch.nn.Conv2d, state: LoRAState, num_pages: int):
        kh, kw = base.kernel_size
        super().__init__(base, state, (base.in_channels, kh, kw), base.out_channels, num_pages)

    @property
    def tokenwise(self) -> bool:
        b = self.base
        return b.kernel_size == (1, 1) and b.stride == (1, 1) and b.padding in ((0, 0), 0)

    def _b_weight(self, B: torch.Tensor) -> torch.Tensor:
        return B.view(*B.shape, 1, 1)  # [out, r, 1, 1]


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
                A, B = layer.adapter(g.slot, r)  # [r, in] and [out, r] (conv: [r, in, kh, kw], [out, r, 1, 1])
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


@dataclass(frozen=True)
class RankGroup:
    """The rows of one pass whose adapters have rank ``r`` in a layer, in batch order."""

    r: int
    rows: torch.Tensor | None  # [n] row indices; None: every row of the batch, in order
    pages: torch.Tensor  # [n * r] each row's adapter's pages, row after row
    scale: torch.Tensor  # [n, 1, 1] weight * alpha / r per row


class RowInvariantKernel(GroupedKernel):
    """Deterministic mode: per pass, one batched product per rank, each row with its own adapter.

    For pass ``k``, the rows whose ``k``-th adapter has rank ``r`` in the layer gather their
    adapters' A [r, in] and B [r, out] and run one ``invariant_low_rank`` product, which gives each
    row exactly its two ``invariant_linear`` calls (peft's ``lora_A`` and ``lora_B``), so its result
    depends neither on the other rows nor on their adapters. Then peft's ``result + delta * scaling``.
    Where the batched product is not shown equal to that for a shape (``low_rank_batches``), the
    layer runs per adapter as the grouped kernel does, through ``invariant_linear``: the same bits.
    Convolutions go per adapter through ``invariant_conv2d``, as peft's conv layers compute (a 1x1
    conv as a matmul over pixels rounds otherwise than oneDNN's convolution).
    """

    name = "row-invariant"

    def apply(self, layer, x, result, routing):
        if not isinstance(layer, MultiLoRALinear):
            return super().apply(layer, x, result, routing)
        tokens = x.reshape(x.shape[0], -1, x.shape[-1])  # [rows, tokens, in]
        A_pages, B_pages = layer.lora_A, layer.lora_B  # [pages, in], [pages, out]
        products = []
        for k in range(len(routing.passes)):
            for g in self.rank_groups(layer, routing, k):
                xs = tokens if g.rows is None else tokens.index_select(0, g.rows)  # [n, tokens, in]
                n = xs.shape[0]
                A = A_pages.index_select(0, g.pages).view(n, g.r, -1)  # [n, r, in]
                B = B_pages.index_select(0, g.pages).view(n, g.r, -1)  # [n, r, out]
                if not low_rank_batches(xs, A, B):  # row by row would cost more calls than per adapter
                    return super().apply(layer, x, result, routing)
                products.append((g, xs, A, B))
        for g, xs, A, B in products:  # passes in order: each row's additions in its request's order
            delta = invariant_low_rank(xs, A, B) * g.scale  # [n, tokens, out]: peft's lora_B(lora_A(x)) * scaling
            delta = delta.reshape(xs.shape[0], *result.shape[1:])
            if g.rows is None:
                result.add_(delta)
            else:
                result.index_add_(0, g.rows, delta)
        return result

    @staticmethod
    def rank_groups(layer: MultiLoRALayer, routing: LoRARouting, k: int) -> list[RankGroup]:
        """Pass ``k``'s rows by their adapter's rank in ``layer`` (none of rank 0), shared by like layers."""
        groups = routing.passes[k]
        key = ("rank-groups", k, layer.lora_A.dtype, tuple((layer.ranks[g.slot], layer.alphas[g.slot]) for g in groups))
        found = routing.memo.get(key)
        if found is not None:
            return found
        by_rank: dict[int, list[tuple[int, int, float]]] = {}  # r -> (row, slot, scaling)
        for g in groups:
            r = layer.ranks[g.slot]
            if r:
                alpha = layer.alphas[g.slot]
                # peft: scaling = weight * lora_alpha / r
                scalings = zip(g.rows.tolist(), g.weights, strict=True)
                by_rank.setdefault(r, []).extend((i, g.slot, w * alpha / r) for i, w in scalings)
        page_table = layer.state.page_table
        found = []
        for r, entries in sorted(by_rank.items()):
            entries.sort()
            rows = [i for i, _, _ in entries]
            slots = torch.tensor([s for _, s, _ in entries], dtype=torch.long, device=page_table.device)
            found.append(
                RankGroup(
                    r,
                    None if rows == list(range(routing.num_rows)) else torch.tensor(rows, device=page_table.device),
                    page_table[slots, :r].reshape(-1),
                    torch.tensor([c for _, _, c in entries], dtype=layer.lora_A.dtype, device=page_table.device).view(
                        -1, 1, 1
                    ),
                )
            )
        routing.memo[key] = found
        return found

    def linear_delta(self, x, A, B):
        return invariant_linear(invariant_linear(x, A, None), B, None)

    def conv_delta(self, x, A, B, conv):
        h = invariant_conv2d(x, A, None, conv.stride, conv.padding, conv.dilation)
        return invariant_conv2d(h, B, None)


def _as_tokens(layer: MultiLoRALayer, x: torch.Tensor) -> torch.Tensor:
    """``x`` as [rows, tokens, in_features] (a 1x1 conv is a Linear over pixels)."""
    if isinstance(layer, MultiLoRAConv2d):
        return x.flatten(2).transpose(1, 2)  # [rows, h*w, in]
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _from_tokens(layer: MultiLoRALayer, delta: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """[rows, tokens, out] back to the layer's output ``shape``."""
    if isinstance(layer, MultiLoRAConv2d):
        return delta.transpose(1, 2).reshape(shape)  # [rows, out, h, w]
    return delta.reshape(shape)


class GatherKernel(MultiLoRAKernel):
    """Every row gathers its adapters' pages (the routing's gather columns) and runs two ``bmm`` per layer.

    A row's columns are its adapters' pages side by side, padded with page 0 (zero) to the routing's
    ``width`` (``width_bucket`` of the widest row): a tick of rank-16 adapters computes 16 ranks, not the
    slots' ``max_rank`` times ``max_depth``. Each column is scaled by its request's weight times the
    layer's alpha / r for that slot (``slot_scale``), so composed adapters add up as peft's do. It reads only
    the routing buffers and the layers' page buffers (no tensor made on the host per forward), so one
    captured CUDA graph per width replays any mix of adapters written into the same buffers. Layers that are
    no matmul per token (k x k or strided convs) run as one grouped conv; grouped convs go to ``fallback``.
    """

    name = "gather"
    reads_only_buffers = True  # CUDA graphs can capture it (engine/step_graphs.py)

    def __init__(self, fallback: GroupedKernel):
        self.fallback = fallback

    def apply(self, layer, x, result, routing):
        if routing.pages is None:
            raise ValueError("the gather kernel needs the routing's gather columns (RoutingBuffers.write slot_pages)")
        if not layer.tokenwise:
            if layer.base.groups != 1:
                return self.fallback.apply(layer, x, result, routing)
            return self.conv_apply(layer, x, result, routing)
        rows, width = routing.pages.shape
        A = layer.lora_A.flatten(1)[routing.pages]  # [rows, width, in]
        B = layer.lora_B[routing.pages]  # [rows, width, out]
        scale = self.scale(layer, routing, x.dtype)  # [rows, width]
        h = torch.bmm(_as_tokens(layer, x), A.transpose(1, 2)) * scale[:, None, :]  # [rows, tokens, width]
        return result + _from_tokens(layer, torch.bmm(h, B), result.shape)  # [rows, tokens, out] -> result's shape

    @staticmethod
    def scale(layer, routing, dtype) -> torch.Tensor:
        """[rows, width]: each column's weight * alpha / r of its slot's adapter in this layer (0 where none)."""
        return (routing.page_weights * layer.slot_scale[routing.page_slots]).to(dtype)

    def conv_apply(self, layer, x, result, routing):
        """A k x k (or strided) conv: each row's columns of A as the filters of its own group of one grouped
        conv (the base conv's stride, padding, dilation), then its B as a per-row matmul over pixels."""
        rows, width = routing.pages.shape
        conv = layer.base
        A = layer.lora_A[routing.pages].reshape(rows * width, *layer.lora_A.shape[1:])  # [rows*width, in, kh, kw]
        h = F.conv2d(
            x.reshape(1, -1, *x.shape[2:]), A, None, conv.stride, conv.padding, conv.dilation, groups=rows
        )  # [1, rows*width, h', w']
        h = h.reshape(rows, width, -1) * self.scale(layer, routing, x.dtype)[:, :, None]  # [rows, width, pixels]
        B = layer.lora_B[routing.pages]  # [rows, width, out]
        return result + torch.bmm(B.transpose(1, 2), h).reshape(result.shape)  # [rows, out, h', w']


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


def _adaptable(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Conv2d) and module.groups == 1)


def pages_for(memory_bytes: int, modules: Sequence[torch.nn.Module]) -> int:
    """How many pages (one rank of one adapter over every module) ``memory_bytes`` holds.

    >>> pages_for(1 << 20, [torch.nn.Linear(64, 64)])   # (64 + 64) * 4 bytes a page
    2048
    """
    per_page = 0
    for m in modules:
        w = m.weight
        if isinstance(m, torch.nn.Linear):
            per_page += (m.in_features + m.out_features) * w.element_size()
        else:
            kh, kw = m.kernel_size
            per_page += (m.in_channels * kh * kw + m.out_channels) * w.element_size()
    return memory_bytes // per_page if per_page else 0


class MultiLoRAModel:
    """A model whose targeted layers carry paged adapter weights, in slots.

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
        num_pages: int | None = None,
        memory_bytes: int | None = None,
    ):
        """``key_prefix`` is prepended to module paths to form the keys adapters use.

        ``kernel``: ``"grouped"``, ``"gather"``, ``"row-invariant"`` or ``"auto"`` (see
        ``make_kernel``). ``max_rows`` x ``max_depth``: the routing buffers' size (rows of one
        forward x adapters per row); a larger forward grows them. Memory: ``num_pages`` pages,
        or as many as ``memory_bytes`` holds (``pages_for``) up to ``(num_slots - 1) * max_rank``
        (room for every slot at ``max_rank``, also the default).
        """
        if num_slots < 2:
            raise ValueError(f"num_slots must be >= 2 (slot 0 is 'no adapter'), got {num_slots}")
        self.model = model
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.deterministic = deterministic
        self.device = next(model.parameters()).device
        targets = list(targets)
        found = [(p, m) for p, m in model.named_modules() if p and _matches(p, targets) and _adaptable(m)]
        if not found:
            raise ValueError(f"no Linear or Conv2d module of the model matches the LoRA targets {targets}")
        if num_pages is None and memory_bytes is not None:  # never more than every slot at max_rank needs
            num_pages = min(pages_for(memory_bytes, [m for _, m in found]), (num_slots - 1) * max_rank)
        if num_pages is None:
            num_pages = (num_slots - 1) * max_rank
        if num_pages < 1:
            raise ValueError(f"the adapter memory holds no page (num_pages {num_pages})")
        self.num_pages = num_pages + 1  # page 0: always zero
        self.state = LoRAState(
            make_kernel(kernel, deterministic=deterministic, on_cuda=self.device.type == "cuda"),
            page_table=torch.zeros(num_slots, max_rank, dtype=torch.long, device=self.device),
            pages=[[] for _ in range(num_slots)],
        )
        self._free_pages = list(range(1, self.num_pages))  # sorted; a free page is zero in every layer
        self._stream = None  # CUDA: the side stream slot copies run on
        # As wide as the widest row can be: never reallocated under a captured graph.
        self.routing_buffers = RoutingBuffers(max_rows, max_depth, self.device, max_width=max_rank * max_depth)
        self.layers: dict[str, MultiLoRALayer] = {}
        for path, module in found:
            if isinstance(module, torch.nn.Linear):
                layer: MultiLoRALayer = MultiLoRALinear(module, self.state, self.num_pages)
            else:
                layer = MultiLoRAConv2d(module, self.state, self.num_pages)
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, name, layer)
            self.layers[key_prefix + path] = layer
        dtypes = {layer.lora_A.dtype for layer in self.layers.values()}
        self._uniform_dtype = dtypes.pop() if len(dtypes) == 1 else None  # packed loads need one dtype
        # Every layer's slot_scale is a row of one table, so a load writes an adapter's scales in one copy.
        self.scale_table = torch.zeros(len(self.layers), num_slots, dtype=torch.float32, device=self.device)
        self._layer_index = {path: i for i, path in enumerate(self.layers)}
        for i, layer in enumerate(self.layers.values()):
            layer.slot_scale = self.scale_table[i]  # [slots]: a view (the buffer stays registered)

    # -- memory --------------------------------------------------------------------------

    @property
    def page_bytes(self) -> int:
        """Bytes one page takes over every layer."""
        return sum(layer.page_bytes for layer in self.layers.values())

    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def total_pages(self) -> int:
        return self.num_pages - 1

    def pages_needed(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> int:
        """Pages an adapter takes: its largest rank over the modules it targets."""
        return max((A.shape[0] for A, _, _ in weights.values()), default=0)

    def _allocate(self, n: int) -> list[int]:
        """``n`` free pages: the first contiguous run that fits, else the lowest free ones."""
        if n > len(self._free_pages):
            raise NoFreePagesError(f"an adapter of rank {n} needs {n} pages; {len(self._free_pages)} are free")
        free = self._free_pages
        run_start = 0
        for i in range(len(free)):
            if i > 0 and free[i] != free[i - 1] + 1:
                run_start = i
            if i - run_start + 1 == n:
                taken = free[run_start : i + 1]
                del free[run_start : i + 1]
                return taken
        taken = free[:n]
        del free[:n]
        return taken

    def _free(self, slot: int) -> None:
        pages = self.state.pages[slot]
        if pages:
            self._free_pages = sorted(self._free_pages + pages)
            self.state.pages[slot] = []
            self.state.page_table[slot].zero_()

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
            b = (layer.out_features, 1) if isinstance(layer, MultiLoRALinear) else (layer.out_features, 1, 1, 1)
            out[path] = ((1, *layer.a_shape), b)
        return out

    def unsupported(self, weights: dict) -> list[str]:
        """Modules an adapter targets that these layers cannot carry (not targeted, or wrong shape)."""
        bad = []
        for path, (A, B, _alpha) in weights.items():
            layer = self.layers.get(path)
            if layer is None or tuple(A.shape[1:]) != layer.a_shape or A.shape[0] > self.max_rank:
                bad.append(path)
            elif B.shape[0] != layer.out_features or B.shape[1] != A.shape[0]:
                bad.append(path)
        return bad

    def load(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Put one adapter (``{module_path: (A, B, alpha)}``) into ``slot``: pages for its rank, every layer.

        Only the modules it targets are written (a free page is zero in every layer), with the page list
        sent to the device once, or as a slice where the pages are contiguous. On CUDA the copies run on
        a side stream (a running forward keeps the default one) and are waited for before returning.
        Raises ``NoFreePagesError`` (and changes nothing) when its pages are not free: the caller
        evicts an unused adapter first (``AdapterSlots`` does).
        """
        if not 0 < slot < self.num_slots:
            raise ValueError(f"slot must be in [1, {self.num_slots - 1}] (0 means no adapter), got {slot}")
        bad = self.unsupported(weights)
        if bad:
            raise ValueError(f"adapter targets modules these layers cannot carry: {bad[:5]}")
        self.clear(slot)
        n = self.pages_needed(weights)
        pages = self._allocate(n) if n else []
        self.state.pages[slot] = pages
        try:
            if pages:
                with self._copy_stream():
                    run = self._run_of(pages)
                    scales = [0.0] * len(self.layers)
                    if isinstance(run, slice) and self._uniform_dtype is not None:
                        self._load_packed(slot, run.start, weights)
                    else:
                        for path, (A, B, alpha) in weights.items():
                            self.layers[path].load_slot(slot, run, A, B, alpha, write_scale=False)
                    for path, (A, _, alpha) in weights.items():
                        scales[self._layer_index[path]] = float(alpha) / A.shape[0]
                    self.scale_table[:, slot].copy_(torch.tensor(scales, dtype=torch.float32))  # every layer's
                    self.state.page_table[slot, :n] = torch.tensor(pages, dtype=torch.long)
        except BaseException:
            self.clear(slot)
            raise

    def _load_packed(self, slot: int, start: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """An adapter into contiguous pages from ``start``, in three operations whatever its layer count: its A
        rows and transposed B rows packed into one host buffer (page-locked on CUDA), one copy to the device,
        one multi-tensor copy into every layer's pages. Per-layer copies cost a launch (and a host round trip)
        each: 8.8 ms for SD1.5's 128 attention projections on an H200 (docs/benchmarks.md, #19)."""
        dtype = self._uniform_dtype
        flat, dsts = [], []
        for path, (A, B, alpha) in weights.items():
            layer = self.layers[path]
            r = A.shape[0]
            flat.append(A.reshape(-1).to(dtype))
            flat.append(B.reshape(B.shape[0], r).t().reshape(-1).to(dtype))  # [r, out] rows, as the pages hold B
            dsts += [layer.lora_A[start : start + r], layer.lora_B[start : start + r]]
            layer.note_loaded(slot, r, alpha)
        total = sum(t.numel() for t in flat)
        host = torch.empty(total, dtype=dtype, pin_memory=self.device.type == "cuda")
        torch.cat(flat, out=host)
        packed = host.to(self.device, non_blocking=True)  # [total]: waited for on the copy stream's exit
        srcs, offset = [], 0
        for dst in dsts:
            srcs.append(packed[offset : offset + dst.numel()].view(dst.shape))
            offset += dst.numel()
        torch._foreach_copy_(dsts, srcs)

    def _run_of(self, pages: list[int]) -> slice | torch.Tensor:
        """``pages`` as a slice where contiguous (the usual case: ``_allocate`` prefers runs), else on the device."""
        if pages[-1] - pages[0] == len(pages) - 1:
            return slice(pages[0], pages[-1] + 1)
        return torch.tensor(pages, dtype=torch.long).to(self.device)

    def _copy_stream(self):
        """A side stream for slot copies on CUDA, synchronised on exit (a no-op context elsewhere)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return _OnStream(self._stream)

    def clear(self, slot: int) -> None:
        """Empty ``slot`` and free its pages (a forward must not be reading it)."""
        pages = self.state.pages[slot]
        if pages:
            with self._copy_stream():
                run = self._run_of(pages)
                for layer in self.layers.values():
                    layer.zero_slot(slot, run)
        self._free(slot)

    def routed(self, rows: Sequence[RowAdapters], width: int | None = None) -> _Routed:
        """A context in which this model's forwards apply ``rows[i]`` to batch row i.

        Entering it takes the model's lock and writes the routing into the preallocated buffers; with ``width``,
        the gather columns at that fixed width and ``static`` (what a captured CUDA graph replays,
        ``engine/step_graphs.py``).
        """
        return _Routed(self.state, self.routing_buffers, rows, width)

    def routing_width(self, rows: Sequence[RowAdapters]) -> int:
        """The gather width ``rows`` are routed at: ``width_bucket`` of the most pages a row's adapters hold."""
        pages = self.state.pages
        return width_bucket(max((sum(len(pages[slot]) for slot, _ in r) for r in rows), default=0))


class _OnStream:
    """Work issued inside runs on ``stream`` (after what the current stream has queued); waited for on exit."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        self._ctx = torch.cuda.stream(self.stream)
        self._ctx.__enter__()
        return self.stream

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self.stream.synchronize()
        return False


class _Routed:
    def __init__(self, state: LoRAState, buffers: RoutingBuffers, rows: Sequence[RowAdapters], width: int | None):
        self.state = state
        self.buffers = buffers
        self.rows = rows
        self.width = width

    def __enter__(self) -> LoRARouting:
        self.state.lock.acquire()
        try:
            gather = isinstance(self.state.kernel, GatherKernel)  # only it reads the columns
            pages = self.state.pages if gather else None
            self.state.routing = self.buffers.write(self.rows, pages, self.width)
            self.state.active = not self.state.routing.empty
        except BaseException:
            self.state.lock.release()
            raise
        return self.state.routing

    def __exit__(self, *exc):
        self.state.routing = None
        self.state.active = False
        self.state.lock.release()
        return False
