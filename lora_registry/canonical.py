"""The one adapter form everything below registration uses.

A canonical adapter is a single safetensors file. For every adapted module
``m`` (``"unet.<path>"``, ``"text_encoder.<path>"`` or SDXL's
``"text_encoder_2.<path>"``, see ``base_model``)::

    m.lora_A   [r, in_features]        (Conv2d: [r, in_channels, kh, kw])   float32 or float16
    m.lora_B   [out_features, r]       (Conv2d: [out_channels, r, 1, 1])    same dtype as lora_A
    m.alpha    []                      float32

and the module's effective weight is ``W + (alpha / r) * B @ A`` (for a conv,
``B`` and ``A`` flattened to matrices and the product reshaped to ``W``). Files
from kohya, PEFT or diffusers are converted into this form once, at
registration (``validation.prepare_adapter``).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .base_model import COMPONENTS, TEXT_COMPONENTS, get_module
from .safetensors_io import write_safetensors

CANONICAL_FORMAT = "lorafleet.lora/1"
_SUFFIXES = ("lora_A", "lora_B", "alpha")


@dataclass(frozen=True)
class LoraWeights:
    A: torch.Tensor  # [r, in] | [r, in, kh, kw]
    B: torch.Tensor  # [out, r] | [out, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(alpha / r) * B @ A`` in the shape of the module's weight: [out, in] or [out, in, kh, kw]."""
        a = self.A.to(dtype).flatten(1)  # [r, in * kh * kw]
        b = self.B.to(dtype).flatten(1)  # [out, r]
        out_shape = (self.B.shape[0], *self.A.shape[1:])
        return (self.scale * (b @ a)).reshape(out_shape)

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size() + 4


@dataclass(frozen=True)
class CanonicalAdapter:
    """Loaded canonical weights: canonical module name -> ``LoraWeights``."""

    modules: Mapping[str, LoraWeights]

    @cached_property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.modules.values())

    @property
    def rank(self) -> int:
        return max(w.rank for w in self.modules.values())

    @property
    def alpha(self) -> float:
        """The most common alpha (each module keeps its own)."""
        return collections.Counter(w.alpha for w in self.modules.values()).most_common(1)[0][0]

    @property
    def has_text_encoder(self) -> bool:
        """Whether any text encoder (SDXL: either of the two) is adapted."""
        return any(name.partition(".")[0] in TEXT_COMPONENTS for name in self.modules)

    @property
    def components(self) -> tuple[str, ...]:
        """The adapted components, in ``COMPONENTS`` order, e.g. ``("unet", "text_encoder_2")``."""
        present = {name.partition(".")[0] for name in self.modules}
        return tuple(c for c in COMPONENTS if c in present)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.modules.values())).A.dtype

    def component(self, component: str) -> dict[str, LoraWeights]:
        """The modules of one component (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``), keyed by their
        path within it: ``component("text_encoder")`` never includes ``text_encoder_2`` modules."""
        if component not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
        prefix = component + "."
        return {name[len(prefix) :]: w for name, w in self.modules.items() if name.startswith(prefix)}


def to_state_dict(modules: Mapping[str, LoraWeights]) -> dict[str, torch.Tensor]:
    out = {}
    for name, w in modules.items():
        out[f"{name}.lora_A"] = w.A.contiguous()
        out[f"{name}.lora_B"] = w.B.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(w.alpha), dtype=torch.float32)
    return out


def save_canonical(adapter: CanonicalAdapter, metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise deterministically (same weights and metadata -> same bytes -> same sha256)."""
    md = {"format": "pt", "lorafleet_format": CANONICAL_FORMAT, **(metadata or {})}
    return write_safetensors(to_state_dict(adapter.modules), md)


def load_canonical(source: bytes | str | Path) -> CanonicalAdapter:
    """Load a canonical file (bytes or a path) into a ``CanonicalAdapter`` on the CPU.

    The file comes from the registry's own blobs (sha256-verified), so only its
    structure is checked here.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        state = safetensors.torch.load(bytes(source))
    else:
        state = safetensors.torch.load_file(str(source), device="cpu")
    grouped: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, tensor in state.items():
        module, _, suffix = key.rpartition(".")
        if suffix not in _SUFFIXES or module.partition(".")[0] not in COMPONENTS:
            raise ValueError(f"not a canonical adapter file: unexpected tensor {key!r}")
        grouped[module][suffix] = tensor
    modules = {}
    for module, parts in sorted(grouped.items()):
        if set(parts) != set(_SUFFIXES):
            raise ValueError(f"not a canonical adapter file: {module!r} has {sorted(parts)}, expected {_SUFFIXES}")
        modules[module] = LoraWeights(A=parts["lora_A"], B=parts["lora_B"], alpha=float(parts["alpha"]))
    if not modules:
        raise ValueError("not a canonical adapter file: no tensors")
    return CanonicalAdapter(modules=modules)


@torch.no_grad()
def merge_into(adapter: CanonicalAdapter, models: Mapping[str, nn.Module], scale: float = 1.0) -> int:
    """Add ``scale * delta`` to each adapted module's weight, in place; returns the number of modules changed.

    ``models`` maps component names to live models, e.g.
    ``{"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}``; components not
    given are skipped. This is the reference semantics of the canonical form
    (and a way to fuse an adapter); the serving path applies LoRA per request.
    """
    changed = 0
    for component, model in models.items():
        for path, w in adapter.component(component).items():
            module = get_module(model, path)
            module.weight += scale * w.delta_weight(torch.float32).to(module.weight.dtype)
            changed += 1
    return changed
