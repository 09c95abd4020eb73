"""Validate an upload and convert it to the canonical form, refusing it before anything is stored.

Order matters: everything that can be checked from the header is checked
before any tensor data is read::

    size cap  ->  header (pickle? truncated?)  ->  key layout + module mapping  ->  shapes, rank
              (an upload that fits another model family: ``base_mismatch``, see ``families``)
              ->  modules the server carries slots on (``ServedTargets``, when the caller passes them)
              ->  read data  ->  NaN / Inf  ->  canonical form (LyCORIS converted exactly, ``lycoris``)
              ->  weight range, update size (``WeightLimits``)  ->  canonical file + sha256

Each refusal is an ``InvalidAdapterError`` (``AdapterTooLargeError`` for the
size cap) with a ``code`` and the first offending keys.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import BinaryIO

import safetensors.torch
import torch

from . import lycoris
from .base_model import BaseModelSpec, ModuleShape
from .canonical import CanonicalAdapter, LoraWeights, save_canonical
from .errors import AdapterTooLargeError, InvalidAdapterError, keys_phrase
from .families import check_base_family
from .formats import ConversionPlan, ModulePlan, plan_conversion
from .safetensors_io import FLOAT_DTYPES, SafetensorsHeader, read_header
from .targets import ServedTargets

DEFAULT_MAX_RANK = 128
DEFAULT_MAX_ADAPTER_BYTES = 512 << 20
FP16_MAX = 65504.0  # the largest finite float16: GPU replicas serve in fp16
DEFAULT_MAX_DELTA_RMS = 1.0


@dataclass(frozen=True)
class WeightLimits:
    """Numeric bounds an adapter's canonical weights must meet to be registered, so that serving it cannot
    overflow into inf/NaN (which the VAE turns into a silent black image).

    - ``max_abs_weight``: every entry of every ``A`` and ``B``. Default: fp16's range (65504), since
      GPU replicas cast adapters to fp16; a registry that only serves fp32/bf16 may raise it.
    - ``max_delta_rms``: per layer, the root mean square of the update the layer adds at scale 1,
      ``ΔW = alpha / r · B @ A`` (flattened to ``[out, in·kh·kw]``). The registry knows the base model's
      shapes, not its weights, so the bound is absolute rather than relative to the base weight: Stable
      Diffusion's weights have an RMS of about 0.02-0.1 and trained LoRAs' updates far less, so 1.0
      refuses only updates 10x-50x larger than the weights they modify. It also bounds every entry of
      ``ΔW`` (at most ``rms · sqrt(numel)``) far inside fp16's range.
    """

    max_abs_weight: float = FP16_MAX
    max_delta_rms: float = DEFAULT_MAX_DELTA_RMS

    def __post_init__(self):
        if not (self.max_abs_weight > 0 and self.max_delta_rms > 0):
            raise ValueError(f"WeightLimits must be > 0, got {self}")


DEFAULT_WEIGHT_LIMITS = WeightLimits()


@dataclass(frozen=True)
class PreparedAdapter:
    """A validated upload in canonical form, ready to store."""

    adapter: CanonicalAdapter
    blob: bytes  # the canonical safetensors file
    sha256: str  # of blob
    source_format: str
    source_sha256: str
    source_bytes: int


def check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise AdapterTooLargeError(
            f"adapter file is {size} bytes; the limit (max_adapter_bytes) is {max_bytes} bytes", code="too_large"
        )


def prepare_adapter(
    source: bytes | BinaryIO,
    spec: BaseModelSpec,
    *,
    max_rank: int = DEFAULT_MAX_RANK,
    max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
    adapter_config: dict | None = None,
    source_format: str | None = None,
    weight_limits: WeightLimits = DEFAULT_WEIGHT_LIMITS,
    targets: ServedTargets | None = None,
) -> PreparedAdapter:
    """Check an uploaded LoRA file against ``spec`` and convert it to the canonical form.

    ``source`` is the file's bytes or a seekable binary file object (only the
    header is read before the checks that need no data have passed). ``targets``:
    the modules the serving side carries adapter slots on; an adapter with weights
    elsewhere is refused (``untargeted_modules``). ``None``: any module of ``spec``.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        size = len(source)
    else:
        size = source.seek(0, io.SEEK_END)
    check_size(size, max_bytes)
    header = read_header(source, size)
    try:
        plan = plan_conversion(header.tensors, header.metadata, spec, adapter_config, source_format)
        ranks = check_shapes(header, plan, spec, max_rank)
    except InvalidAdapterError as e:
        if e.code in ("unknown_modules", "shape_mismatch"):  # made for another base model?
            check_base_family(header, spec, e, adapter_config, source_format)
        raise
    if targets is not None:
        targets.check(plan.modules)

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        source.seek(0)
        data = source.read()
        if len(data) != size:
            raise InvalidAdapterError(f"read {len(data)} bytes of a {size}-byte upload", code="truncated")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise InvalidAdapterError(f"safetensors could not read the file: {e}", code="not_safetensors") from e
    check_finite(tensors, plan)
    adapter = build_canonical(tensors, plan, spec, ranks)
    check_weights(adapter, weight_limits)
    blob = save_canonical(adapter, metadata={"base_fingerprint": spec.fingerprint})
    return PreparedAdapter(
        adapter=adapter,
        blob=blob,
        sha256=hashlib.sha256(blob).hexdigest(),
        source_format=plan.source_format,
        source_sha256=hashlib.sha256(data).hexdigest(),
        source_bytes=size,
    )


def _as_module_shape(shape: tuple[int, ...], module: ModuleShape) -> tuple[int, ...]:
    """Tolerate [r, in, 1, 1] for a Linear and [r, in] for a 1x1 Conv2d (kohya / LDM conventions)."""
    if module.kind == "linear" and len(shape) == 4 and shape[2:] == (1, 1):
        return shape[:2]
    if module.kind == "conv2d" and module.kernel_size == (1, 1) and len(shape) == 2:
        return (*shape, 1, 1)
    return shape


def check_shapes(
    header: SafetensorsHeader, plan: ConversionPlan, spec: BaseModelSpec, max_rank: int
) -> dict[str, int | lycoris.SourceRank]:
    """Shapes, dtypes and ranks from the header alone; returns the rank of each module (a LyCORIS module's:
    its ``lycoris.SourceRank``, whose ``rank`` is the canonical rank it converts to)."""
    bad_dtype, mismatched, too_high = [], [], []
    ranks: dict[str, int | lycoris.SourceRank] = {}
    for name, mp in plan.modules.items():
        module = spec.modules[name]
        alpha = header.tensors[mp.alpha_key] if mp.alpha_key else None
        for key in [*mp.role_keys().values(), mp.alpha_key]:
            entry = header.tensors[key] if key is not None else None
            if entry is not None and entry.dtype not in FLOAT_DTYPES:
                bad_dtype.append(f"{entry.name} ({entry.dtype})")
        if mp.algorithm != lycoris.LORA:
            roles = mp.role_keys()
            try:
                source = lycoris.source_rank(
                    mp.algorithm, {role: tuple(header.tensors[key].shape) for role, key in roles.items()}, module
                )
            except lycoris.ShapeError as e:
                mismatched.append((roles.get(e.role, name), e.got, e.expected))
                continue
            if alpha is not None and alpha.numel != 1:
                mismatched.append((alpha.name, alpha.shape, ()))
            elif source.rank > max_rank:
                too_high.append((name, f"{source.rank}, {source.detail}"))
            ranks[name] = source
            continue
        a, b = header.tensors[mp.a_key], header.tensors[mp.b_key]
        a_shape, b_shape = _as_module_shape(a.shape, module), _as_module_shape(b.shape, module)
        rank = a_shape[0] if a_shape else 0
        if rank < 1 or a_shape != module.lora_a_shape(rank):
            mismatched.append((a.name, a.shape, module.lora_a_shape(max(rank, 1))))
        elif b_shape != module.lora_b_shape(rank):
            mismatched.append((b.name, b.shape, module.lora_b_shape(rank)))
        elif alpha is not None and alpha.numel != 1:
            mismatched.append((alpha.name, alpha.shape, ()))
        elif rank > max_rank:
            too_high.append((name, rank))
        ranks[name] = rank
    if bad_dtype:
        raise InvalidAdapterError(
            f"LoRA tensors must be floating point: {keys_phrase(bad_dtype)}",
            code="invalid_dtype",
            keys=[k.split(" ")[0] for k in bad_dtype],
        )
    if mismatched:
        detail = "; ".join(
            f"{k}: {list(got)} != expected {want if isinstance(want, str) else list(want)}"
            for k, got, want in mismatched[:5]
        )
        raise InvalidAdapterError(
            f"{len(mismatched)} tensors do not fit the base model's module shapes: {detail}",
            code="shape_mismatch",
            keys=[k for k, _, _ in mismatched],
        )
    if too_high:
        detail = ", ".join(f"{n} (r={r})" for n, r in too_high[:5])
        why = ""
        if any(not isinstance(r, int) for _, r in too_high):
            why = (
                "; LoHa and LoKr are served as the exactly equal LoRA, whose rank is the product of their factors' "
                "ranks"
            )
        raise InvalidAdapterError(
            f"rank above the limit (max_rank={max_rank}) in {len(too_high)} modules: {detail}{why}",
            code="rank_too_high",
            keys=[n for n, _ in too_high],
        )
    return ranks


def check_finite(tensors: dict[str, torch.Tensor], plan: ConversionPlan) -> None:
    bad = [key for mp in plan.modules.values() for key in mp.keys if not torch.isfinite(tensors[key]).all()]
    if bad:
        raise InvalidAdapterError(f"NaN or Inf values in {keys_phrase(bad)}", code="non_finite", keys=bad)


def check_weights(adapter: CanonicalAdapter, limits: WeightLimits) -> None:
    """``InvalidAdapterError`` naming the first offending layers and the limit, unless every layer is within
    ``limits`` (``WeightLimits``): ``weight_out_of_range`` for an entry beyond ``max_abs_weight``,
    ``delta_too_large`` for an update whose RMS is above ``max_delta_rms``."""
    out_of_range = []
    for name, w in adapter.modules.items():
        for label, t in (("A", w.A), ("B", w.B)):
            peak = float(t.abs().max()) if t.numel() else 0.0
            if peak > limits.max_abs_weight:
                out_of_range.append((name, label, peak))
    if out_of_range:
        detail = ", ".join(f"{n}.{label} (max |w| = {peak:.4g})" for n, label, peak in out_of_range[:3])
        raise InvalidAdapterError(
            f"weights beyond the serving range in {len(out_of_range)} tensors: {detail}; the limit is "
            f"{limits.max_abs_weight:g} (registry.max_abs_weight: float16's range)",
            code="weight_out_of_range",
            keys=sorted({n for n, _, _ in out_of_range}),
        )
    too_large = []
    for name, w in adapter.modules.items():
        rms = delta_rms(w)
        if rms > limits.max_delta_rms:
            too_large.append((name, rms))
    if too_large:
        detail = ", ".join(f"{n} (RMS {rms:.4g})" for n, rms in too_large[:3])
        raise InvalidAdapterError(
            f"the update alpha/r * B @ A is too large in {len(too_large)} layers: {detail}; the limit is an RMS "
            f"of {limits.max_delta_rms:g} (registry.max_delta_rms)",
            code="delta_too_large",
            keys=[n for n, _ in too_large],
        )


def delta_rms(w: LoraWeights) -> float:
    """RMS of ``ΔW = alpha / r · B @ A`` without forming it: ``‖BA‖²_F = Σ (BᵀB) ⊙ (AAᵀ)``, r x r matrices,
    in float64 (no overflow for any weights within ``max_abs_weight``)."""
    rank = w.A.shape[0]
    a = w.A.double().reshape(rank, -1)  # [r, in * kh * kw]
    b = w.B.double().reshape(w.B.shape[0], rank)  # [out, r]
    squared = float(((b.T @ b) * (a @ a.T)).sum().clamp(min=0.0))
    numel = b.shape[0] * a.shape[1]
    return abs(w.alpha / rank) * math.sqrt(squared / numel)


def _alpha(mp: ModulePlan, tensors: dict[str, torch.Tensor], rank: int) -> float:
    if mp.alpha is not None:
        alpha = mp.alpha
        if mp.rslora:  # PEFT rsLoRA scales by alpha / sqrt(r); canonical scale is alpha / r
            alpha = alpha * math.sqrt(rank)
        return alpha
    if mp.alpha_key is not None:
        return float(tensors[mp.alpha_key].float().reshape(()))
    return float(rank)  # no alpha anywhere: diffusers' convention, scale 1


def build_canonical(
    tensors: dict[str, torch.Tensor],
    plan: ConversionPlan,
    spec: BaseModelSpec,
    ranks: dict[str, int | lycoris.SourceRank],
) -> CanonicalAdapter:
    """Reshape to the canonical shapes, LyCORIS modules converted (``lycoris.to_lora``); one dtype for the whole
    adapter (float16 if every weight is and nothing was converted, else float32)."""
    weights = [tensors[k] for mp in plan.modules.values() for k in mp.role_keys().values()]
    converted = any(mp.algorithm != lycoris.LORA for mp in plan.modules.values())
    dtype = torch.float16 if not converted and all(t.dtype == torch.float16 for t in weights) else torch.float32
    modules = {}
    for name, mp in plan.modules.items():
        module, rank = spec.modules[name], ranks[name]
        if isinstance(rank, lycoris.SourceRank):
            modules[name] = _convert(name, mp, tensors, module, rank, dtype)
            continue
        a = tensors[mp.a_key].to(dtype).reshape(module.lora_a_shape(rank))  # [r, in] | [r, in, kh, kw]
        b = tensors[mp.b_key].to(dtype).reshape(module.lora_b_shape(rank))  # [out, r] | [out, r, 1, 1]
        alpha = _alpha(mp, tensors, rank)
        if not math.isfinite(alpha):
            raise InvalidAdapterError(f"alpha of {name} is {alpha}", code="non_finite", keys=[name])
        modules[name] = LoraWeights(A=a.contiguous(), B=b.contiguous(), alpha=alpha)
    return CanonicalAdapter(modules=modules)


def _convert(
    name: str,
    mp: ModulePlan,
    tensors: dict[str, torch.Tensor],
    module: ModuleShape,
    source: lycoris.SourceRank,
    dtype: torch.dtype,
) -> LoraWeights:
    """A LyCORIS module as the exactly equal LoRA: ``ΔW = scale · B @ A`` with ``alpha = scale · rank``."""
    alpha = float(tensors[mp.alpha_key].float().reshape(())) if mp.alpha_key is not None else None
    scale = lycoris.source_scale(source, alpha)
    if not math.isfinite(scale):
        raise InvalidAdapterError(f"alpha of {name} is {alpha}", code="non_finite", keys=[name])
    A, B = lycoris.to_lora(mp.algorithm, {role: tensors[key] for role, key in mp.role_keys().items()}, module, source)
    return LoraWeights(A=A.to(dtype).contiguous(), B=B.to(dtype).contiguous(), alpha=scale * source.rank)
