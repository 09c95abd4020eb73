"""Adapters on one model of one replica: registry -> host memory -> slots of a ``MultiLoRAModel``.

The registry keeps the disk cache (sha256-verified) and the host-memory cache
of loaded tensors; ``AdapterSlots`` keeps which adapter sits in which slot.
Adapters are keyed by their pinned reference ``name@version`` (immutable).
"""

from __future__ import annotations

import asyncio
import time

import torch

from lora_registry.base_model import BaseModelSpec, base_model_spec_from_dir
from lora_registry.config import RegistryConfig, open_registry
from lora_registry.registry import Registry

from .adapter_slots import AdapterSlots, NoFreeSlotError
from .config import LoRAConfig
from .multi_lora import MultiLoRAModel, text_encoder_key_prefix


class SlotWaitTimeoutError(RuntimeError):
    """No adapter slot freed up in time."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        super().__init__(f"no adapter slot became free within {timeout_s:.0f}s; retry later")

    def __reduce__(self):
        return type(self), (self.timeout_s,)


def open_model_registry(config: RegistryConfig, model_dir) -> tuple[Registry, BaseModelSpec]:
    spec = base_model_spec_from_dir(model_dir)
    return open_registry(config, base=spec), spec


class ModelAdapters:
    """Adapter slots on one component (``"unet"`` or ``"text_encoder"``) of one replica."""

    def __init__(
        self, model: torch.nn.Module, component: str, registry: Registry, config: LoRAConfig, *, deterministic: bool
    ):
        targets = config.unet_target_modules if component == "unet" else config.text_encoder_target_modules
        prefix = text_encoder_key_prefix(model) if component == "text_encoder" else ""
        self.component = component
        self.registry = registry
        self.lora = MultiLoRAModel(
            model,
            targets,
            num_slots=config.max_loras_per_replica + 1,
            max_rank=config.max_rank,
            deterministic=deterministic,
            key_prefix=prefix,
            kernel=config.kernel,
        )
        self.slots = AdapterSlots(config.max_loras_per_replica + 1, self._load, self.lora.clear)
        self.slot_wait_timeout_s = config.slot_wait_timeout_s
        self._released: asyncio.Condition | None = None

    def _load(self, slot: int, ref: str) -> None:
        _, adapter = self.registry.load(ref)
        weights = {path: (w.A, w.B, w.alpha) for path, w in adapter.component(self.component).items()}
        self.lora.load(slot, weights)

    async def acquire(self, refs: list[str]) -> list[int]:
        """Pin ``refs`` into slots, loading beside the running batch; wait (bounded) when all are pinned."""
        if not refs:
            return []
        if self._released is None:
            self._released = asyncio.Condition()
        deadline = time.monotonic() + self.slot_wait_timeout_s
        while True:
            try:
                return await asyncio.to_thread(self.slots.acquire, refs)
            except NoFreeSlotError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SlotWaitTimeoutError(self.slot_wait_timeout_s) from None
                async with self._released:
                    try:
                        await asyncio.wait_for(self._released.wait(), timeout=min(remaining, 1.0))
                    except asyncio.TimeoutError:
                        pass

    async def release(self, refs: list[str]) -> None:
        if not refs:
            return
        self.slots.release(refs)
        if self._released is not None:
            async with self._released:
                self._released.notify_all()

    def stats(self) -> dict:
        s = self.slots
        resident = s.resident()
        return {
            "loads": s.loads,
            "hits": s.hits,
            "evictions": s.evictions,
            "load_seconds": s.load_seconds,
            "slots_total": s.capacity,
            "slots_used": len(resident),
            "slots_pinned": len(s.pinned()),
            "resident": sorted(resident),
        }
