"""IP-Adapter per row: one UNet forward serves rows with different reference images, scales, or none.

IP-Adapter (Ye et al., 2023) adds to every cross-attention layer (``attn2``) of the UNet a second
attention over *image tokens*: ``hidden += scale * attention(query, to_k_ip(tokens), to_v_ip(tokens))``,
before ``to_out``. The tokens come from a CLIP vision encoder's output through a projection
(``image_proj``): the "plain" variant projects the pooled ``image_embeds`` [dim] to 4 tokens
(diffusers' ``ImageProjection``); the "plus" variant reads the encoder's penultimate hidden states
[257, dim] through a resampler (``IPAdapterPlusImageProjection``) to 16 tokens.

Weights are read in diffusers' IP-Adapter format (``load_ip_adapter``: a ``.safetensors`` file with
``image_proj.*`` and ``ip_adapter.*`` keys, or a ``.bin`` dict ``{"image_proj": ..., "ip_adapter": ...}``),
the projection converted by diffusers' own ``_convert_ip_adapter_image_proj_to_diffusers``, and
``ip_adapter.{k}.to_k_ip.weight`` / ``to_v_ip.weight`` numbered as diffusers' ``_convert_ip_adapter_attn_
to_diffusers`` numbers them: over the UNet's attention processors in order, cross-attention ones get
1, 3, 5, ... Everything is checked against the served UNet at load (``IPAdapterWeights.load``: one-line
errors naming the key and the shapes).

Per row, unlike diffusers (one image and one scale for the whole batch):

- ``IPAdapterModel.install`` replaces each ``attn2`` processor with an ``IPAdapterRowsProcessor``: the
  UNet's own attention (``InvariantAttnProcessor``'s or ``AttnProcessor2_0``'s operations, calling
  ``attn.to_q``/``to_k``/``to_v``/``to_out`` — ``multi_lora``'s layers where they are wrapped), then
  the image term added to the rows that have an image only. Rows without one get no added term at
  all: exactly the base result.
- The rows' data live in ``IPAdapterBuffers``, preallocated per model like ``multi_lora``'s
  ``RoutingBuffers``: the image rows' indices, their projected tokens and their scale per layer.
  ``IPAdapterModel.routed(rows)`` writes them once per forward; every layer reads views of them
  (no tensor is built on the host per layer).
- Scales: a number for every layer, or per-block scales as diffusers' ``set_ip_adapter_scale``
  accepts (``{"up": {"block_0": [0.0, 1.0, 0.0]}}``, InstantStyle's style-only transfer), expanded by
  diffusers' own ``_maybe_expand_lora_scales`` (unnamed blocks: 0). A layer at scale 0 adds
  ``0 * term`` for an image row (diffusers skips it: equal values).

The image tokens of a request are projected once, at admission (``IPAdapterModel.prepare``), as the
pipeline projects them (negative and image together), so a row's tokens never depend on its batch-mates;
with classifier-free guidance the negative row reads the negative embeddings: zeros for the plain variant, the encoding
of an all-zero image for "plus" (``StableDiffusionPipeline.encode_image``), as ``encode_image`` here
returns them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .batch_invariance import InvariantAttnProcessor, invariant_attention, invariant_linear

PLAIN = "plain"
PLUS = "plus"

# What the projection's state dict looks like per variant (diffusers' converter picks by these keys).
_UNSUPPORTED_PROJ = {
    "proj.3.weight": "IP-Adapter Full Face",
    "perceiver_resampler.proj_in.weight": "IP-Adapter FaceID Plus",
    "norm.weight": "IP-Adapter FaceID",
}


class IPAdapterError(ValueError):
    """IP-Adapter weights that do not fit the served UNet (a one-line message naming the key)."""


def read_ip_adapter_file(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` from a file in diffusers' IP-Adapter format.

    ``.safetensors``: keys prefixed ``image_proj.`` / ``ip_adapter.`` (as ``load_ip_adapter`` splits
    them); ``.bin``/``.pt``: a dict with those two entries, loaded with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise IPAdapterError(f"ip_adapter weights {str(path)!r}: no such file")
    if path.suffix == ".safetensors":
        import safetensors.torch

        state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in safetensors.torch.load_file(str(path)).items():
            part, _, rest = key.partition(".")
            if part in state:
                state[part][rest] = value
        return state
    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        raise IPAdapterError(f"ip_adapter weights {path.name!r}: expected a dict with image_proj and ip_adapter")
    return loaded


def cross_attention_layers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
    """``(name, Attention module, key id)`` of each cross-attention layer, in diffusers' numbering.

    ``_convert_ip_adapter_attn_to_diffusers``: over ``unet.attn_processors`` in order, the cross-
    attention processors (not ``attn1``, not motion modules) take the ids 1, 3, 5, ...
    """
    modules = dict(unet.named_modules())
    layers, key_id = [], 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        module_name = name.removesuffix(".processor")
        layers.append((module_name, modules[module_name], key_id))
        key_id += 2
    return layers


@dataclass(frozen=True)
class IPAdapterWeights:
    """IP-Adapter weights checked against one UNet: the projection and each cross-attention layer's K/V."""

    variant: str  # PLAIN (pooled image_embeds) or PLUS (penultimate hidden states through the resampler)
    projection: torch.nn.Module  # diffusers' ImageProjection / IPAdapterPlusImageProjection
    embed_dim: int  # the image encoder's output width the projection reads
    num_tokens: int  # image tokens per row after the projection
    layers: tuple[str, ...]  # the attn2 modules' names
    to_k_ip: tuple[torch.Tensor, ...]  # per layer [inner_dim, cross_attention_dim]
    to_v_ip: tuple[torch.Tensor, ...]

    @classmethod
    def load(cls, state: dict, unet: torch.nn.Module) -> IPAdapterWeights:
        """Check ``state`` (``read_ip_adapter_file``'s) against ``unet`` and build the projection.

        Raises ``IPAdapterError`` (one line: the key, its shape and the shape the UNet needs).
        """
        from diffusers import UNet2DConditionModel

        for part in ("image_proj", "ip_adapter"):
            if not isinstance(state.get(part), dict) or not state[part]:
                raise IPAdapterError(f"ip_adapter weights lack {part!r} (diffusers' IP-Adapter format)")
        proj, attn = state["image_proj"], state["ip_adapter"]
        cross = unet.config.cross_attention_dim
        unsupported = [key for key in _UNSUPPORTED_PROJ if key in proj]
        if "proj.weight" not in proj and unsupported:  # diffusers' converter tells the variants apart in this order
            key = unsupported[0]
            raise IPAdapterError(
                f"image_proj.{key}: {_UNSUPPORTED_PROJ[key]} is not supported (plain and plus IP-Adapters are)"
            )
        if "proj.weight" in proj:
            variant, embed_key = PLAIN, "proj.weight"
            w = proj["proj.weight"]
            if w.ndim != 2 or w.shape[0] != 4 * cross:
                raise IPAdapterError(
                    f"image_proj.proj.weight is {list(w.shape)}; the served UNet needs [{4 * cross}, dim] "
                    f"(4 tokens x cross_attention_dim {cross})"
                )
        elif "latents" in proj and "proj_in.weight" in proj and "proj_out.weight" in proj:
            variant, embed_key = PLUS, "proj_in.weight"
            w = proj["proj_out.weight"]
            if w.ndim != 2 or w.shape[0] != cross:
                raise IPAdapterError(
                    f"image_proj.proj_out.weight is {list(w.shape)}; the served UNet needs [{cross}, hidden] "
                    f"(cross_attention_dim {cross})"
                )
        else:
            raise IPAdapterError("image_proj has neither proj.weight (plain) nor latents/proj_in/proj_out (plus)")
        try:
            projection = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
                unet, proj, low_cpu_mem_usage=False
            )
        except (RuntimeError, KeyError, IndexError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise IPAdapterError(f"image_proj does not load as a {variant} IP-Adapter projection: {first}") from None
        layers = cross_attention_layers(unet)
        expected = set()
        to_k, to_v = [], []
        for name, module, key_id in layers:
            want = [module.inner_dim, module.cross_attention_dim]
            for role, out in (("to_k_ip", to_k), ("to_v_ip", to_v)):
                key = f"{key_id}.{role}.weight"
                expected.add(key)
                if key not in attn:
                    raise IPAdapterError(f"ip_adapter.{key} is missing: the served UNet's {name} needs {want}")
                if list(attn[key].shape) != want:
                    raise IPAdapterError(
                        f"ip_adapter.{key} is {list(attn[key].shape)}; the served UNet's {name} needs {want}"
                    )
                out.append(attn[key])
        extra = sorted(set(attn) - expected, key=lambda k: (len(k), k))
        if extra:
            raise IPAdapterError(
                f"ip_adapter.{extra[0]} has no cross-attention layer in the served UNet "
                f"({len(layers)} layers, keys 1..{2 * len(layers) - 1}); weights for another model?"
            )
        device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
        projection = projection.to(device, dtype).eval().requires_grad_(False)
        num_tokens = 4 if variant == PLAIN else proj["latents"].shape[1]
        return cls(
            variant=variant,
            projection=projection,
            embed_dim=int(proj[embed_key].shape[1]),
            num_tokens=int(num_tokens),
            layers=tuple(name for name, _, _ in layers),
            to_k_ip=tuple(t.to(device, dtype) for t in to_k),
            to_v_ip=tuple(t.to(device, dtype) for t in to_v),
        )

    @classmethod
    def from_file(cls, path: str | Path, unet: torch.nn.Module) -> IPAdapterWeights:
        return cls.load(read_ip_adapter_file(path), unet)


class IPAdapterBuffers:
    """The image rows of one forward, preallocated: a later CUDA-graph capture replays these tensors.

    ``rows[:n]``: the batch rows that have an image; ``tokens[:n]`` their projected image tokens;
    ``scales[:n, layer]`` their scale at each cross-attention layer. ``n`` (a Python int) is 0 when
    no row has an image.
    """

    def __init__(self, max_rows: int, num_tokens: int, dim: int, num_layers: int, device, dtype):
        self.max_rows = max_rows
        self.rows = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.tokens = torch.zeros(max_rows, num_tokens, dim, dtype=dtype, device=device)
        self.scales = torch.zeros(max_rows, num_layers, dtype=dtype, device=device)
        self.n = 0

    def write(self, rows: Sequence[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """``rows``: ``(batch row, tokens [T, D], scales [layers])`` for each row with an image."""
        n = len(rows)
        if n > self.max_rows:
            raise ValueError(f"{n} image rows in one forward; the IP-Adapter buffers hold {self.max_rows}")
        if n:
            index = torch.tensor([r for r, _, _ in rows], dtype=torch.int64)
            self.rows[:n].copy_(index, non_blocking=True)
            torch.stack([t for _, t, _ in rows], out=self.tokens[:n])
            torch.stack([s for _, _, s in rows], out=self.scales[:n])
        self.n = n


class IPAdapterRowsProcessor(InvariantAttnProcessor):
    """An ``attn2`` processor: the UNet's own cross-attention, plus each image row's IP-Adapter term.

    The base computation is ``InvariantAttnProcessor``'s (deterministic mode) or ``AttnProcessor2_0``'s,
    operation for operation, so rows without an image get exactly what the UNet gives without
    IP-Adapter. Image rows add ``scale * attention(query, to_k_ip(tokens), to_v_ip(tokens))`` before
    ``to_out``, as ``IPAdapterAttnProcessor2_0``.
    """

    def __init__(self, layer: int, buffers: IPAdapterBuffers, to_k_ip, to_v_ip, invariant: bool):
        self.layer = layer
        self.buffers = buffers
        self.to_k_ip = to_k_ip
        self.to_v_ip = to_v_ip
        self.invariant = invariant

    def _attend(self, q, k, v, mask=None):
        if self.invariant:
            return invariant_attention(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)

    def _linear(self, x, weight):
        if self.invariant:
            return invariant_linear(x, weight, None)
        return F.linear(x, weight)

    def _added(self, attn, query, hidden_states, head_dim):
        n = self.buffers.n
        if not n:  # the image rows only: the others get no added term at all
            return hidden_states
        b = self.buffers
        rows = b.rows[:n]
        q = query.index_select(0, rows)  # [n, heads, q_len, head_dim]
        tokens = b.tokens[:n]  # [n, T, cross]
        ip_key = self._linear(tokens, self.to_k_ip).view(n, -1, attn.heads, head_dim).transpose(1, 2)
        ip_value = self._linear(tokens, self.to_v_ip).view(n, -1, attn.heads, head_dim).transpose(1, 2)
        ip = self._attend(q, ip_key, ip_value)
        ip = ip.transpose(1, 2).reshape(n, -1, attn.heads * head_dim).to(query.dtype)
        scale = b.scales[:n, self.layer].view(n, 1, 1)
        return hidden_states.index_add(0, rows, scale * ip)


@dataclass(frozen=True)
class RowImage:
    """A job's image conditioning: each of its UNet rows' projected tokens, and its scale per layer."""

    tokens: torch.Tensor  # [rows, T, cross_attention_dim]
    scales: torch.Tensor  # [layers]


class IPAdapterModel:
    """IP-Adapter installed on a UNet for per-row use (see the module docstring).

    >>> ip = IPAdapterModel(unet, IPAdapterWeights.from_file(path, unet), max_rows=16)   # doctest: +SKIP
    >>> ip.install()                                                                       # doctest: +SKIP
    >>> with ip.routed([(1, ip.prepare(embeds, negative, 2, 1.0))]): unet(...)             # doctest: +SKIP

    Install it after ``make_batch_invariant`` and ``MultiLoRAModel`` (it keeps their layers and reads
    which attention the UNet ran to run the same).
    """

    def __init__(self, unet: torch.nn.Module, weights: IPAdapterWeights, max_rows: int = 64):
        self.unet = unet
        self.weights = weights
        p = next(unet.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.buffers = IPAdapterBuffers(
            max_rows, weights.num_tokens, unet.config.cross_attention_dim, len(weights.layers), p.device, p.dtype
        )
        self._lock = threading.Lock()
        self.installed = False

    @property
    def variant(self) -> str:
        return self.weights.variant

    def install(self) -> None:
        """Replace every cross-attention processor with an ``IPAdapterRowsProcessor`` (idempotent)."""
        modules = dict(self.unet.named_modules())
        for i, name in enumerate(self.weights.layers):
            attn = modules[name]
            current = attn.get_processor()
            if isinstance(current, IPAdapterRowsProcessor):
                invariant = current.invariant
            else:
                invariant = isinstance(current, InvariantAttnProcessor)
            attn.set_processor(
                IPAdapterRowsProcessor(i, self.buffers, self.weights.to_k_ip[i], self.weights.to_v_ip[i], invariant)
            )
        self.installed = True

    # -- per request --------------------------------------------------------------------------------

    def layer_scales(self, scale) -> torch.Tensor:
        """``[layers]``: a number for every layer, or per-block scales as ``set_ip_adapter_scale`` takes them."""
        from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

        if isinstance(scale, bool) or not isinstance(scale, int | float | dict):
            raise ValueError(f"ip_adapter_scale must be a number or a dict of per-block scales, got {scale!r}")
        if isinstance(scale, dict):
            try:
                (expanded,) = _maybe_expand_lora_scales(self.unet, [scale], default_scale=0.0)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise ValueError(f"ip_adapter_scale: {str(e).strip().splitlines()[0]}") from None
            values = []
            for name in self.weights.layers:
                s = 0.0
                for prefix, v in expanded.items():  # set_ip_adapter_scale: every matching key, in order
                    if f"{name}.processor".startswith(prefix):
                        s = v
                values.append(float(s))
        else:
            values = [float(scale)] * len(self.weights.layers)
        if not all(torch.isfinite(torch.tensor(values))):
            raise ValueError(f"ip_adapter_scale must be finite, got {scale!r}")
        return torch.tensor(values, dtype=self.dtype, device=self.device)

    def check_embeds(self, embeds: torch.Tensor, name: str = "ip_adapter_embeds") -> None:
        """One image's embeddings: ``[dim]`` (plain) or ``[tokens, dim]`` (plus), ``dim`` the projection's."""
        want = 1 if self.variant == PLAIN else 2
        if embeds.ndim != want or embeds.shape[-1] != self.weights.embed_dim:
            shape = "[dim]" if want == 1 else "[tokens, dim]"
            raise ValueError(
                f"{name} is {list(embeds.shape)}; this {self.variant} IP-Adapter reads {shape} with "
                f"dim {self.weights.embed_dim}"
            )

    @torch.inference_mode()
    def project(self, embeds: torch.Tensor) -> torch.Tensor:
        """Images' embeddings ``[n, dim]`` / ``[n, tokens, dim]`` through the projection: ``[n, T, cross_dim]``."""
        return self.weights.projection(embeds.to(self.device, self.dtype))

    def prepare(
        self, embeds: torch.Tensor, negative: torch.Tensor | None, rows: int, negative_rows: int, scale
    ) -> RowImage:
        """A job's ``RowImage``: its first ``negative_rows`` rows read ``negative`` (None: zeros, as
        diffusers' plain ``encode_image``), the others ``embeds``.

        Projected as ``StableDiffusionPipeline`` projects them (``MultiIPAdapterImageProjection``): with
        guidance, ``[negative, image]`` in one call, else the image alone; a job's tokens depend on it alone.
        """
        self.check_embeds(embeds)
        if negative_rows and negative is None:
            if self.variant == PLUS:
                raise ValueError("negative_ip_adapter_embeds is required with guidance for a plus IP-Adapter")
            negative = torch.zeros_like(embeds)
        if not negative_rows:
            (pos,) = self.project(embeds[None])
            return RowImage(tokens=torch.stack([pos] * rows), scales=self.layer_scales(scale))
        self.check_embeds(negative, "negative_ip_adapter_embeds")
        if negative.shape != embeds.shape:
            raise ValueError(
                f"negative_ip_adapter_embeds {list(negative.shape)} must have the shape of "
                f"ip_adapter_embeds {list(embeds.shape)}"
            )
        neg, pos = self.project(torch.stack([negative.to(embeds.device, embeds.dtype), embeds]))
        tokens = torch.stack([neg] * negative_rows + [pos] * (rows - negative_rows))
        return RowImage(tokens=tokens, scales=self.layer_scales(scale))

    # -- per forward --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def routed(self, rows: Sequence[tuple[int, RowImage]]):
        """Within: the UNet's image rows are ``rows`` (``(first batch row, RowImage)`` per job with an image)."""
        entries = [
            (start + r, image.tokens[r], image.scales) for start, image in rows for r in range(len(image.tokens))
        ]
        with self._lock:
            self.buffers.write(entries)
            try:
                yield self.buffers
            finally:
                self.buffers.n = 0


def encode_image(image_encoder, images, *, hidden_states: bool, feature_extractor=None):
    """``(embeds, negative)`` per image, as ``StableDiffusionPipeline.encode_image`` (one image per prompt).

    ``images``: pixel values ``[n, 3, H, W]`` (already the encoder's input), or PIL images with a
    ``feature_extractor`` (a ``CLIPImageProcessor``). ``hidden_states=False`` (plain IP-Adapter):
    ``image_embeds`` ``[n, dim]`` and zeros. ``True`` ("plus"): the penultimate hidden states
    ``[n, tokens, dim]``, and those of an all-zero image.
    """
    p = next(image_encoder.parameters())
    if not isinstance(images, torch.Tensor):
        if feature_extractor is None:
            raise ValueError("encode_image needs pixel values, or PIL images and a feature_extractor")
        images = feature_extractor(images, return_tensors="pt").pixel_values
    images = images.to(p.device, p.dtype)
    with torch.inference_mode():
        if hidden_states:
            embeds = image_encoder(images, output_hidden_states=True).hidden_states[-2]
            negative = image_encoder(torch.zeros_like(images), output_hidden_states=True).hidden_states[-2]
            return embeds, negative
        embeds = image_encoder(images).image_embeds
        return embeds, torch.zeros_like(embeds)


def resolve_ip_adapter_dir(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local directory laid out as h94/IP-Adapter's ``models/``: ``image_encoder/`` and the weights files.

    ``builtin:<model>``: the builtin model's tiny IP-Adapter, built once from its seed into the cache
    (``builtin.write_builtin_ip_adapter``); a path: that directory.
    """
    import hashlib
    import json

    from filelock import FileLock

    from .builtin import (
        BUILTIN_IP_ADAPTERS,
        BUILTIN_MODELS,
        BUILTIN_PREFIX,
        IP_ADAPTER_SEED,
        builtin_name,
        write_builtin_ip_adapter,
    )

    if not uri.startswith(BUILTIN_PREFIX):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise IPAdapterError(f"ip_adapter uri {uri!r}: no such directory")
        return path
    import diffusers
    import transformers

    from .models import default_cache_dir

    name = builtin_name(uri)
    blob = json.dumps(
        [BUILTIN_IP_ADAPTERS[name], BUILTIN_MODELS[name]["unet"], IP_ADAPTER_SEED, diffusers.__version__]
        + [transformers.__version__, torch.__version__],
        sort_keys=True,
    )
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / "models" / "builtin" / "ip-adapter" / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    marker = target / ".complete"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not marker.exists():
            write_builtin_ip_adapter(uri, target)
            marker.touch()
    return target
