"""Adapters on one model of one replica: registry -> host memory -> paged slots of a ``MultiLoRAModel``.

The registry keeps the disk cache (sha256-verified) and the host-memory cache
of loaded tensors; ``AdapterResidency`` keeps which adapter is resident, loads
in the background and pins at admission. Adapters are keyed by their pinned
reference ``name@version`` (immutable).

The Denoiser's ``StepScheduler`` drives the residency itself (pins at
admission, from its fair queue). The TextEncoder, which has no queue of its
own, waits here: ``acquire`` (bounded by ``lora.slot_wait_timeout_s``) and
``release``. Its waiters are a ``FairQueue`` by tenant (the weights every stage
uses): the residency loads their adapters in weighted-fair order, so a flood of
rare adapters from one tenant does not delay another tenant's load.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from lora_registry.base_model import BaseModelSpec, base_model_spec_from_dir
from lora_registry.config import RegistryConfig, open_registry
from lora_registry.registry import Registry
from lora_registry.targets import ServedTargets

from .adapter_slots import AdapterResidency, Weights
from .config import LoRAConfig
from .fair_queue import FairQueue
from .multi_lora import MultiLoRAModel, text_encoder_key_prefix


class SlotWaitTimeoutError(RuntimeError):
    """A request's adapters did not become resident in time."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        super().__init__(f"no adapter slot became free within {timeout_s:.0f}s; retry later")

    def __reduce__(self):
        return type(self), (self.timeout_s,)


def served_targets(lora: LoRAConfig) -> ServedTargets:
    """The modules ``lora`` gives adapter slots (per component: path suffixes, and the config key for messages)."""
    text, text_key = lora.text_encoder_target_modules, "lora.text_encoder_target_modules"
    return ServedTargets(
        {"unet": lora.unet_target_modules, "text_encoder": text, "text_encoder_2": text},  # SDXL's 2nd: CLIP names
        config_keys={"unet": "lora.unet_target_modules", "text_encoder": text_key, "text_encoder_2": text_key},
    )


def open_model_registry(
    config: RegistryConfig, model_dir, lora: LoRAConfig | None = None
) -> tuple[Registry, BaseModelSpec]:
    """The registry for the model in ``model_dir``, and its spec.

    With ``lora`` (the serving configuration), registration refuses what the replicas could never apply:
    adapters with weights outside ``lora.*_target_modules`` (``untargeted_modules``) and ranks above
    ``lora.max_rank`` (the registry's ``max_rank`` is the lower of the two), so an adapter that registers is
    one the server serves. Without it (a replica that only reads), the registry checks the base model alone.
    """
    spec = base_model_spec_from_dir(model_dir)
    if lora is None:
        return open_registry(config, base=spec), spec
    config = config.model_copy(update={"max_rank": min(config.max_rank, lora.max_rank)})
    return open_registry(config, base=spec, targets=served_targets(lora)), spec


@dataclass(eq=False)
class _SlotWaiter:
    """One ``acquire`` waiting: its adapters (a ``FairQueue`` item, by identity)."""

    refs: list[str]


class ModelAdapters:
    """Adapter memory on one component of one replica: ``"unet"``, ``"text_encoder"`` or SDXL's ``"text_encoder_2"``."""

    def __init__(
        self,
        model: torch.nn.Module,
        component: str,
        registry: Registry,
        config: LoRAConfig,
        *,
        deterministic: bool,
        tenant_weights: dict[str, float] | None = None,
    ):
        targets = config.unet_target_modules if component == "unet" else config.text_encoder_target_modules
        prefix = text_encoder_key_prefix(model) if component.startswith("text_encoder") else ""
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
            memory_bytes=config.memory_bytes(next(model.parameters()).device),
        )
        self.residency = AdapterResidency(self.lora, self._fetch, on_change=self._changed)
        self.slot_wait_timeout_s = config.slot_wait_timeout_s
        self.on_change = None  # the Denoiser's loop wakes on it
        # acquire(): waiting callers in weighted-fair order by tenant (what the residency loads first), and a
        # wake-up. A prompt costs 1, as in the TextEncoder's batches.
        self._waiters: FairQueue[_SlotWaiter] = FairQueue(tenant_weights)
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def _fetch(self, ref: str) -> Weights:
        _, adapter = self.registry.load(ref)
        return {path: (w.A, w.B, w.alpha) for path, w in adapter.component(self.component).items()}

    def _changed(self) -> None:
        """From the loader thread: an adapter became resident, or failed."""
        if self.on_change is not None:
            self.on_change()
        if self._event_loop is not None and self._wake is not None:
            self._event_loop.call_soon_threadsafe(self._wake.set)

    async def acquire(self, refs: list[str], tenant: str = "anonymous", weight: float | None = None) -> list[int]:
        """Pin ``refs`` once resident and return their slots; waits (bounded) while they load.

        Waiters' adapters load in weighted-fair order by ``tenant`` (``weight``: its key's; None: the configured
        weights). A waiter whose adapters are resident goes at once, whatever its place.
        Cancellation-safe at every await: a pin is taken only in ``try_pin``, synchronously,
        and returned to the caller, who releases it in its own ``finally``.
        """
        if not refs:
            return []
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._event_loop, self._wake = loop, asyncio.Event()
        deadline = loop.time() + self.slot_wait_timeout_s
        waiter = _SlotWaiter(list(refs))
        self._waiters.push(tenant, waiter, 1.0, weight=weight)
        try:
            while True:
                self._wake.clear()
                self.residency.want([w.refs for w in self._waiters.in_order()])
                slots = self.residency.try_pin(refs)
                if slots is not None:
                    self._waiters.take(waiter)  # served: the virtual time moves on, as a pop
                    return slots
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise SlotWaitTimeoutError(self.slot_wait_timeout_s)
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=remaining)
                except TimeoutError:
                    pass
        finally:
            self._waiters.remove(waiter)  # timed out or cancelled (a no-op once taken)
            self.residency.want([w.refs for w in self._waiters.in_order()])

    def release(self, refs: list[str]) -> None:
        self.residency.release(refs)
        if self._wake is not None:
            self._wake.set()

    def stats(self) -> dict:
        r = self.residency
        resident = r.resident()
        used, total = r.memory_bytes()
        return {
            "loads": r.loads,
            "hits": r.hits,
            "misses": r.misses,
            "prefetches": r.prefetches,
            "evictions": r.evictions,
            "load_seconds": r.load_seconds,
            "slots_total": r.capacity,
            "slots_used": len(resident),
            "slots_pinned": len(r.pinned()),
            "memory_bytes_used": used,
            "memory_bytes_total": total,
            "resident_by_rank": r.resident_by_rank(),
            "resident": sorted(resident),
        }
