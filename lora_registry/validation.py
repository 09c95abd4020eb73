"""Validate an upload and convert it to the canonical form, refusing it before anything is stored.

Order matters: everything that can be checked from the header is checked
before any tensor data is read::

    size cap  ->  header (pickle? truncated?)  ->  key layout + module mapping  ->  shapes, rank
              ->  read data  ->  NaN / Inf  ->  canonical file + sha256

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

from .base_model import BaseModelSpec, ModuleShape
from .canonical import CanonicalAdapter, LoraWeights, save_canonical
from .errors import AdapterTooLargeError, InvalidAdapterError, keys_phrase
from .formats import ConversionPlan, ModulePlan, plan_conversion
from .safetensors_io import FLOAT_DTYPES, SafetensorsHeader, read_header

DEFAULT_MAX_RANK = 64
DEFAULT_MAX_ADAPTER_BYTES = 512 << 20


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
) -> PreparedAdapter:
    """Check an uploaded LoRA file against ``spec`` and convert it to the canonical form.

    ``source`` is the file's bytes or a seekable binary file object (only the
    header is read before the checks that need no data have passed).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        size = len(source)
    else:
        size = source.seek(0, io.SEEK_END)
    check_size(size, max_bytes)
    header = read_header(source, size)
    plan = plan_conversion(header.tensors, header.metadata, spec, adapter_config, source_format)
    ranks = check_shapes(header, plan, spec, max_rank)

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


def check_shapes(header: SafetensorsHeader, plan: ConversionPlan, spec: BaseModelSpec, max_rank: int) -> dict[str, int]:
    """Shapes, dtypes and ranks from the header alone; returns the rank of each module."""
    bad_dtype, mismatched, too_high = [], [], []
    ranks: dict[str, int] = {}
    for name, mp in plan.modules.items():
        module = spec.modules[name]
        a, b = header.tensors[mp.a_key], header.tensors[mp.b_key]
        alpha = header.tensors[mp.alpha_key] if mp.alpha_key else None
        for entry in (a, b, alpha):
            if entry is not None and entry.dtype not in FLOAT_DTYPES:
                bad_dtype.append(f"{entry.name} ({entry.dtype})")
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
        detail = "; ".join(f"{k}: {list(got)} != expected {list(want)}" for k, got, want in mismatched[:5])
        raise InvalidAdapterError(
            f"{len(mismatched)} tensors do not fit the base model's module shapes: {detail}",
            code="shape_mismatch",
            keys=[k for k, _, _ in mismatched],
        )
    if too_high:
        detail = ", ".join(f"{n} (r={r})" for n, r in too_high[:5])
        raise InvalidAdapterError(
            f"rank above the limit (max_rank={max_rank}) in {len(too_high)} modules: {detail}",
            code="rank_too_high",
            keys=[n for n, _ in too_high],
        )
    return ranks


def check_finite(tensors: dict[str, torch.Tensor], plan: ConversionPlan) -> None:
    bad = [key for mp in plan.modules.values() for key in mp.keys if not torch.isfinite(tensors[key]).all()]
    if bad:
        raise InvalidAdapterError(f"NaN or Inf values in {keys_phrase(bad)}", code="non_finite", keys=bad)


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
    tensors: dict[str, torch.Tensor], plan: ConversionPlan, spec: BaseModelSpec, ranks: dict[str, int]
) -> CanonicalAdapter:
    """Reshape to the canonical shapes; one dtype for the whole adapter (float16 if every weight is, else float32)."""
    weights = [tensors[k] for mp in plan.modules.values() for k in (mp.a_key, mp.b_key)]
    dtype = torch.float16 if all(t.dtype == torch.float16 for t in weights) else torch.float32
    modules = {}
    for name, mp in plan.modules.items():
        module, rank = spec.modules[name], ranks[name]
        a = tensors[mp.a_key].to(dtype).reshape(module.lora_a_shape(rank))  # [r, in] | [r, in, kh, kw]
        b = tensors[mp.b_key].to(dtype).reshape(module.lora_b_shape(rank))  # [out, r] | [out, r, 1, 1]
        alpha = _alpha(mp, tensors, rank)
        if not math.isfinite(alpha):
            raise InvalidAdapterError(f"alpha of {name} is {alpha}", code="non_finite", keys=[name])
        modules[name] = LoraWeights(A=a.contiguous(), B=b.contiguous(), alpha=alpha)
    return CanonicalAdapter(modules=modules)
