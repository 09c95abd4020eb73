"""Multi-LoRA layers: one forward serves rows with different adapters, scales, or none.

Every targeted ``nn.Linear`` / ``nn.Conv2d`` is wrapped in a layer that keeps
``num_slots`` adapter slots, preallocated with ranks padded to ``max_rank``:

    A: [slots, max_rank, in_features]          (conv: [slots, max_rank, in, kh, kw])
    B: [slots, out_features, max_rank]         (conv: [slots, out, max_rank, 1, 1])

A forward reads a ``LoRARouting``: for each row of the batch, the ordered list
of ``(slot, weight)`` its request asked for. Several adapters on one request
compose exactly: each row gets ``base(x) + sum_k scaling_k * B_k(A_k(x))`` in
the request's order, with ``scaling_k = weight_k * alpha / r`` as peft
computes it — the same operations on the same values as diffusers'
``load_lora_weights`` + ``set_adapters(names, weights)``, so a row's output
equals the pipeline's for that request alone.

Rows are grouped by slot (segmented LoRA): one A and one B product per
adapter present in the batch, on the gathered rows only, sliced to the
adapter's own rank.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .batch_invariance import invariant_conv2d, invariant_linear

RowAdapters = Sequence[tuple[int, float]]  # ((slot, weight), ...) in the request's order


@dataclass
class _Group:
    slot: int
    rows: torch.Tensor  # [n] row indices into the batch
    weights: tuple[float, ...]  # one per row


class LoRARouting:
    """Which adapters apply to which rows of one forward.

    >>> LoRARouting([((1, 1.0),), (), ((1, 0.5), (2, 1.0))])   # doctest: +SKIP
    # row 0: slot 1 at weight 1; row 1: no adapter; row 2: slot 1 at 0.5 then slot 2 at 1
    """

    def __init__(self, rows: Sequence[RowAdapters], device: torch.device | str = "cpu"):
        self.num_rows = len(rows)
        depth = max((len(r) for r in rows), default=0)
        # For the gather kernel: every row's adapters as [rows, depth] tensors (slot 0 pads).
        self.slot_ids = torch.tensor(
            [[a[0] for a in r] + [0] * (depth - len(r)) for r in rows], dtype=torch.long, device=device
        ).reshape(self.num_rows, depth)  # [rows, depth]
        self.weights = torch.tensor(
            [[float(a[1]) for a in r] + [0.0] * (depth - len(r)) for r in rows], dtype=torch.float32, device=device
        ).reshape(self.num_rows, depth)  # [rows, depth]
        # passes[k]: the k-th adapter of every row, grouped by slot. Applying the
        # passes in order keeps each row's additions in its request's order.
        self.passes: list[list[_Group]] = []
        for k in range(depth):
            by_slot: dict[int, tuple[list[int], list[float]]] = {}
            for i, adapters in enumerate(rows):
                if k < len(adapters):
                    slot, weight = adapters[k]
                    idx, ws = by_slot.setdefault(slot, ([], []))
                    idx.append(i)
                    ws.append(float(weight))
            self.passes.append(
                [
                    _Group(slot, torch.tensor(idx, dtype=torch.long, device=device), tuple(ws))
                    for slot, (idx, ws) in sorted(by_slot.items())
                ]
            )

    @property
    def empty(self) -> bool:
        return not self.passes


@dataclass
class LoRAState:
    """Shared by every layer of one model: the routing of the forward in progress."""

    routing: LoRARouting | None = None
    deterministic: bool = False
    # "grouped": one A and one B product per adapter present, on its rows (exact, peft's arithmetic);
    # "gather": every row gathers its adapters' stacked A and B, two bmm per layer whatever the mix
    # (a fixed number of kernels: for GPUs, where launches dominate).
    kernel: str = "grouped"
    lock: threading.Lock = field(default_factory=threading.Lock)


class _MultiLoRABase(torch.nn.Module):
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

    def _delta(self, x: torch.Tensor, slot: int, r: int) -> torch.Tensor:
        raise NotImplementedError

    def _gatherable(self) -> bool:
        return True

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as [rows, tokens, in_features] (a 1x1 conv is a Linear over pixels)."""
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def _untokens(self, delta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return delta.reshape(like.shape)

    def _gather_forward(self, x: torch.Tensor, result: torch.Tensor, routing: LoRARouting) -> torch.Tensor:
        rows, depth = routing.slot_ids.shape
        R = self.max_rank
        ids = routing.slot_ids  # [rows, depth]
        A = self.lora_A.flatten(2)[ids]  # [rows, depth, R, in]
        B = self.lora_B.flatten(2)[ids]  # [rows, depth, out, R]
        scale = (routing.weights * self.slot_scale[ids]).to(x.dtype)  # [rows, depth]: weight * alpha / r
        A = A.reshape(rows, depth * R, -1)  # [rows, depth*R, in]: ranks stacked
        B = B.permute(0, 1, 3, 2).reshape(rows, depth * R, -1)  # [rows, depth*R, out]
        h = torch.bmm(self._tokens(x), A.transpose(1, 2))  # [rows, tokens, depth*R]
        h = h * scale.repeat_interleave(R, dim=1)[:, None, :]
        return result + self._untokens(torch.bmm(h, B), result)  # [rows, tokens, out] -> result's shape

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base(x, *args, **kwargs)
        routing = self.state.routing
        if routing is None or routing.empty:
            return result
        if routing.num_rows != x.shape[0]:
            raise ValueError(f"LoRA routing covers {routing.num_rows} rows, the batch has {x.shape[0]}")
        if self.state.kernel == "gather" and self._gatherable():
            return self._gather_forward(x, result, routing)
        for groups in routing.passes:
            for g in groups:
                r = self.ranks[g.slot]
                if r == 0:
                    continue
                # peft: scaling = weight * lora_alpha / r, then result + lora_B(lora_A(x)) * scaling
                scalings = [w * self.alphas[g.slot] / r for w in g.weights]
                xs = x.index_select(0, g.rows)
                delta = self._delta(xs, g.slot, r)
                if len(set(scalings)) == 1:
                    scaled = delta * scalings[0]
                else:
                    s = torch.tensor(scalings, dtype=delta.dtype, device=delta.device)
                    scaled = delta * s.view(-1, *([1] * (delta.dim() - 1)))
                result.index_add_(0, g.rows, scaled)
        return result


class MultiLoRALinear(_MultiLoRABase):
    def __init__(self, base: torch.nn.Linear, state: LoRAState, num_slots: int, max_rank: int):
        super().__init__(base, state, (max_rank, base.in_features), (base.out_features, max_rank), num_slots)

    def _delta(self, x, slot, r):
        A = self.lora_A[slot, :r]  # [r, in]
        B = self.lora_B[slot, :, :r]  # [out, r]
        if self.state.deterministic:
            return invariant_linear(invariant_linear(x, A, None), B, None)
        return F.linear(F.linear(x, A), B)


class MultiLoRAConv2d(_MultiLoRABase):
    def _gatherable(self) -> bool:
        b = self.base
        return b.kernel_size == (1, 1) and b.stride == (1, 1) and b.padding in ((0, 0), 0)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # [rows, h*w, in]

    def _untokens(self, delta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return delta.transpose(1, 2).reshape(like.shape)  # [rows, out, h, w]

    def __init__(self, base: torch.nn.Conv2d, state: LoRAState, num_slots: int, max_rank: int):
        kh, kw = base.kernel_size
        super().__init__(
            base, state, (max_rank, base.in_channels, kh, kw), (base.out_channels, max_rank, 1, 1), num_slots
        )

    def _delta(self, x, slot, r):
        A = self.lora_A[slot, :r]  # [r, in, kh, kw]
        B = self.lora_B[slot, :, :r]  # [out, r, 1, 1]
        b = self.base
        if self.state.deterministic:
            h = invariant_conv2d(x, A, None, b.stride, b.padding, b.dilation)
            return invariant_conv2d(h, B, None)
        return F.conv2d(F.conv2d(x, A, None, b.stride, b.padding, b.dilation), B)


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
    ):
        """``key_prefix`` is prepended to module paths to form the keys adapters use.

        ``kernel``: ``"grouped"``, ``"gather"``, or ``"auto"`` (grouped when deterministic or on the
        CPU — exact and cheapest there —, gather on CUDA).
        """
        if kernel not in ("auto", "grouped", "gather"):
            raise ValueError(f"kernel must be 'auto', 'grouped' or 'gather', got {kernel!r}")
        if kernel == "auto":
            on_cuda = next(model.parameters()).device.type == "cuda"
            kernel = "gather" if on_cuda and not deterministic else "grouped"
        self.model = model
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.state = LoRAState(deterministic=deterministic, kernel=kernel)
        self.layers: dict[str, _MultiLoRABase] = {}
        targets = list(targets)
        for path, module in list(model.named_modules()):
            if not path or not _matches(path, targets):
                continue
            if type(module) is torch.nn.Linear or isinstance(module, torch.nn.Linear):
                layer: _MultiLoRABase = MultiLoRALinear(module, self.state, num_slots, max_rank)
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

    def routed(self, rows: Sequence[RowAdapters]):
        return _Routed(self.state, LoRARouting(rows, device=next(self.model.parameters()).device))


class _Routed:
    def __init__(self, state: LoRAState, routing: LoRARouting):
        self.state = state
        self.routing = routing

    def __enter__(self):
        self.state.lock.acquire()
        self.state.routing = self.routing
        return self.routing

    def __exit__(self, *exc):
        self.state.routing = None
        self.state.lock.release()
        return False
