"""The UNet step on static buffers, padded to a row bucket: replayed from a captured CUDA graph on CUDA.

Eager PyTorch spends most of a small UNet step launching kernels (#19: a 2-row SD1.5 step takes 33-54 ms
eager and 12 ms replayed from a CUDA graph on an H200). A CUDA graph replays a fixed sequence of kernels on
fixed memory, so everything a step reads must sit in buffers allocated once:

- the step's inputs, copied each tick into static buffers of one ``StepShape`` (rows padded up to a bucket
  of ``ROW_BUCKETS``; the padding rows are zeros, and their outputs are dropped);
- the multi-LoRA routing: ``MultiLoRAModel.routed`` writes each row's adapters' pages side by side (the
  gather columns) into the model's preallocated ``RoutingBuffers`` at a fixed width (a ``width_bucket``:
  8, 16, 32, ... columns; padding columns are page 0, which is zero, at weight 0), and the gather kernel
  reads only those buffers, so one graph per width replays any mix of adapters. A tick without adapters
  has width 0: its graph is the plain UNet's. Layers no adapter has targeted yet skip the LoRA path; when
  one first does (``LoRAState.layout``), the steps captured before are dropped and captured again
  (``rewarm``, or on first use). The grouped kernels loop over the adapters on the host: they
  are never captured.

On CUDA (``capture=True``) a graph is captured per ``StepShape`` at warm-up (``warm_up``: the model's
native size at every row bucket, widths 0 and 16) or on first use (another size, or adapters of another
rank: a one-off stall of three forwards), all sharing one memory pool; a shape with more rows than the largest
bucket runs eagerly. Elsewhere (``capture=False``: the CPU, and tests) the same code runs the same static
buffers eagerly, so every path but capture and replay is tested on the CPU. On the CPU with batch-invariant
kernels the padding changes no bit of a row's result (rows never depend on their batch-mates).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class StepShape:
    """What a captured step is specialised on."""

    rows: int  # padded to a bucket
    sample: tuple[int, int, int]  # the UNet input's [channels, height, width] (9 channels for inpainting UNets)
    context: tuple[int, int]  # [tokens, hidden] of encoder_hidden_states
    text_embeds: int | None  # SDXL's pooled text embedding width (None: no added conditions)
    time_ids: int | None  # SDXL's time ids per row (6)
    width: int  # gather columns of the multi-LoRA routing (0: no adapter in the tick, or no LoRA layers)
    layout: int = 0  # the multi-LoRA layout captured (``LoRAState.layout``: which layers carry adapters)


def bucket_rows(rows: int, buckets: Sequence[int] = ROW_BUCKETS) -> int | None:
    """The smallest bucket holding ``rows`` rows, or None beyond the largest.

    >>> bucket_rows(3), bucket_rows(16), bucket_rows(65)
    (4, 16, None)
    """
    return next((b for b in buckets if b >= rows), None)


class _Entry:
    """One ``StepShape``'s static buffers, and its captured graph (if any)."""

    def __init__(self, shape: StepShape, device: torch.device, dtype: torch.dtype):
        self.shape = shape
        rows = shape.rows
        self.sample = torch.zeros(rows, *shape.sample, device=device, dtype=dtype)  # [rows, c, h, w]
        self.timestep = torch.zeros(rows, device=device, dtype=torch.float32)  # [rows]
        self.context = torch.zeros(rows, *shape.context, device=device, dtype=dtype)  # [rows, tokens, hidden]
        self.added = None
        if shape.text_embeds is not None:
            self.added = {
                "text_embeds": torch.zeros(rows, shape.text_embeds, device=device, dtype=dtype),
                "time_ids": torch.zeros(rows, shape.time_ids, device=device, dtype=dtype),
            }
        self.out: torch.Tensor | None = None  # the captured graph's output (inside its pool)
        self.graph: torch.cuda.CUDAGraph | None = None

    def write(self, sample, timestep, context, added) -> None:
        """Copy one tick's inputs into the buffers; the padding rows stay zero."""
        n = sample.shape[0]
        self.sample[:n].copy_(sample)
        self.timestep[:n].copy_(timestep)
        self.context[:n].copy_(context)
        if self.added is not None:
            for key, buffer in self.added.items():
                buffer[:n].copy_(added[key])
        if n < self.shape.rows:  # a previous tick may have left rows here
            self.sample[n:].zero_()
            self.timestep[n:].zero_()
            self.context[n:].zero_()
            if self.added is not None:
                for buffer in self.added.values():
                    buffer[n:].zero_()


class StepGraphs:
    """``forward``: the UNet step of a tick through static buffers, replayed from a CUDA graph where captured.

    ``unet``: the (multi-LoRA) UNet. ``lora``: its ``MultiLoRAModel``, or None. ``capture``: capture CUDA graphs
    (only on CUDA; requires a routing-buffer kernel, ``lora.kernel`` gather). ``static_routing`` (default:
    ``capture``): write each tick's routing at its bucketed width, as capture needs; the CPU tests run that
    path eagerly.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        lora=None,
        *,
        capture: bool,
        buckets: Sequence[int] = ROW_BUCKETS,
        warmup_iters: int = 2,
        static_routing: bool | None = None,
    ):
        param = next(unet.parameters())
        if capture and param.device.type != "cuda":
            raise ValueError("CUDA graphs need the UNet on a CUDA device")
        if capture and lora is not None and not getattr(lora.kernel, "reads_only_buffers", False):
            raise ValueError(
                f"CUDA graphs need a multi-LoRA kernel that reads only the routing buffers (lora.kernel: gather), "
                f"not {type(lora.kernel).__name__}"
            )
        self.unet = unet
        self.lora = lora
        self.capture = capture
        # Routing at the shape's width, every layer that carries adapters on its LoRA path (what capture needs).
        self.static_routing = capture if static_routing is None else static_routing
        self.buckets = tuple(sorted(buckets))
        self.warmup_iters = warmup_iters
        self.device, self.dtype = param.device, param.dtype
        self.entries: dict[StepShape, _Entry] = {}
        self.pool = None  # the graphs' shared memory pool
        self.captured = 0
        self.eager_calls = 0  # steps beyond the largest bucket
        self.stale: set[StepShape] = set()  # shapes dropped for an older layout (layout 0 here), for ``rewarm``
        self._lock = threading.Lock()

    def width_of(self, adapters: Sequence | None) -> int:
        """The routing width a tick's ``adapters`` are written at (0 without static routing or adapters)."""
        if self.lora is None or not self.static_routing or not adapters:
            return 0
        return self.lora.routing_width(adapters)

    def shape_of(
        self, sample: torch.Tensor, context: torch.Tensor, added: dict | None, width: int = 0
    ) -> StepShape | None:
        rows = bucket_rows(sample.shape[0], self.buckets)
        if rows is None:
            return None
        return StepShape(
            rows=rows,
            sample=tuple(sample.shape[1:]),
            context=tuple(context.shape[1:]),
            text_embeds=None if added is None else added["text_embeds"].shape[1],
            time_ids=None if added is None else added["time_ids"].shape[1],
            width=width,
            layout=self.layout,
        )

    @property
    def layout(self) -> int:
        return 0 if self.lora is None else self.lora.state.layout

    def _drop_stale(self) -> None:
        """Forget the steps of an older layout (their graphs skip or take layers' LoRA paths as they were);
        ``rewarm`` captures them again. Caller holds the lock."""
        layout = self.layout
        stale = [shape for shape in self.entries if shape.layout != layout]
        for shape in stale:
            self.stale.add(dataclasses.replace(shape, layout=0))
            del self.entries[shape]
        if stale and not self.entries:
            self.pool = None  # its last graph is gone, and the allocator with it: the next capture opens a new one

    def rewarm(self) -> int:
        """Build again (on CUDA, capture) the steps dropped when layers began or ceased to carry adapters, for the
        current layout; returns how many. A replica calls it once its adapters are loaded, ahead of traffic."""
        with self._lock:
            self._drop_stale()
            shapes = [dataclasses.replace(shape, layout=self.layout) for shape in self.stale]
            self.stale.clear()
        self.warm_up(shapes)
        return len(shapes)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        added: dict | None,
        adapters: Sequence | None,
    ) -> torch.Tensor:
        """The UNet's noise prediction for ``sample`` [rows, c, h, w] at per-row ``timestep`` [rows];
        ``adapters``: each row's ((slot, weight), ...), or None for a tick without adapters."""
        shape = self.shape_of(sample, context, added, self.width_of(adapters))
        rows = sample.shape[0]
        if shape is None:  # beyond the largest bucket: eager, as without graphs
            self.eager_calls += 1
            return self._eager(sample, timestep, context, added, adapters)
        with self._lock:
            entry = self.entries.get(shape)
            if entry is None:
                self._drop_stale()
                entry = self.entries[shape] = _Entry(shape, self.device, self.dtype)
            entry.write(sample, timestep, context, added)
            padded = None
            if self.lora is not None:
                padded = list(adapters or ()) + [()] * (shape.rows - rows)
            out = self._run(entry, padded)
            return out[:rows].clone()

    def warm_up(self, shapes: Sequence[StepShape]) -> None:
        """Build (and on CUDA capture) the steps of ``shapes`` ahead of traffic."""
        for shape in shapes:
            with self._lock:
                entry = self.entries.get(shape)
                if entry is None:
                    entry = self.entries[shape] = _Entry(shape, self.device, self.dtype)
                padded = [()] * shape.rows if self.lora is not None else None
                self._run(entry, padded)

    # -- running one entry ----------------------------------------------------------------------

    def _call(self, entry: _Entry) -> torch.Tensor:
        kwargs: dict = {"encoder_hidden_states": entry.context, "return_dict": False}
        if entry.added is not None:
            kwargs["added_cond_kwargs"] = entry.added
        return self.unet(entry.sample, entry.timestep, **kwargs)[0]

    def _routed(self, padded, width: int):
        if padded is None:
            return _NoRouting()
        if self.static_routing:  # a captured graph's shapes: the routing is written at the shape's width
            return self.lora.routed(padded, width=width)
        return self.lora.routed(padded)

    def _run(self, entry: _Entry, padded) -> torch.Tensor:
        with self._routed(padded, entry.shape.width):
            if not self.capture:
                return self._call(entry)
            if entry.graph is None:
                self._capture(entry)
            entry.graph.replay()
            return entry.out

    def _capture(self, entry: _Entry) -> None:
        """Warm up on a side stream (cuDNN/cuBLAS pick their kernels), then capture into the shared pool."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup_iters):
                self._call(entry)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the adapter loader's copies on its own thread (another stream) stay legal meanwhile.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            entry.out = self._call(entry)
        self.pool = graph.pool()
        entry.graph = graph
        self.captured += 1

    def _eager(self, sample, timestep, context, added, adapters) -> torch.Tensor:
        kwargs: dict = {"encoder_hidden_states": context, "return_dict": False}
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        if self.lora is not None and adapters:
            with self.lora.routed(adapters):
                return self.unet(sample, timestep, **kwargs)[0]
        return self.unet(sample, timestep, **kwargs)[0]


class _NoRouting:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


WARM_WIDTHS = (0, 16)  # captured at start: ticks without adapters, and rank-16 adapters (the commonest rank)


def make_step_graphs(
    unet: torch.nn.Module,
    lora,
    setting: str,
    *,
    max_rows: int,
    native_latent_side: int | None = None,
    widths: Sequence[int] = WARM_WIDTHS,
) -> StepGraphs | None:
    """The Denoiser's ``StepGraphs`` for ``denoiser.cuda_graphs`` (``auto``/``on``/``off``), or None.

    ``auto``: on CUDA, when the multi-LoRA kernel reads only its routing buffers (else a warning, and plain
    forwards). ``on``: the same, an error instead of the warning; on the CPU the static buffers run eagerly.
    With ``native_latent_side``, the steps of the model's native size (77-token prompts) are built, and on
    CUDA captured, for every row bucket up to ``max_rows`` and every routing width of ``widths`` (0 alone
    without LoRA layers) before the replica takes traffic.
    """
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"denoiser.cuda_graphs must be auto, on or off, got {setting!r}")
    on_cuda = next(unet.parameters()).device.type == "cuda"
    if setting == "off" or (setting == "auto" and not on_cuda):
        return None
    if on_cuda and lora is not None and not getattr(lora.kernel, "reads_only_buffers", False):
        why = f"the multi-LoRA kernel {type(lora.kernel).__name__} loops over adapters on the host"
        if setting == "on":
            raise ValueError(f"denoiser.cuda_graphs: on needs lora.kernel: gather ({why})")
        logger.warning("CUDA graphs off: %s; set lora.kernel: gather to capture the UNet step", why)
        return None
    graphs = StepGraphs(unet, lora, capture=on_cuda)
    if native_latent_side is not None:
        warm = sorted(set(widths)) if lora is not None and graphs.static_routing else [0]
        for width in warm:
            graphs.warm_up(native_shapes(unet, width, native_latent_side, max_rows, graphs.buckets))
    return graphs


def native_shapes(
    unet: torch.nn.Module, width: int, latent_side: int, max_rows: int, buckets: Sequence[int] = ROW_BUCKETS
) -> list[StepShape]:
    """The step shapes of native-size images with one-chunk (77-token) prompts, every bucket up to ``max_rows``."""
    cfg = unet.config
    text_embeds = time_ids = None
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        time_ids = 6
        text_embeds = cfg.projection_class_embeddings_input_dim - time_ids * cfg.addition_time_embed_dim
    rows = [b for b in buckets if b <= max_rows] or [min(buckets)]
    return [
        StepShape(
            rows=r,
            sample=(cfg.in_channels, latent_side, latent_side),
            context=(77, cfg.cross_attention_dim),
            text_embeds=text_embeds,
            time_ids=time_ids,
            width=width,
        )
        for r in rows
    ]
