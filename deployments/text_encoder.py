"""TextEncoder deployment: CLIP prompt encoding (A1111 weighting, 77-token chunks), batched across
requests, with an embedding cache and per-request text-encoder LoRA.

SDXL models run both text encoders here (``SDXLPromptEncoder``), each with its own LoRA slots."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from lora_registry.config import RegistryConfig

from .config import TextEncoderConfig
from .engine import models
from .engine.adapters import ModelAdapters, open_model_registry
from .engine.config import LoRAConfig, ModelConfig
from .engine.fair_batcher import FairBatcher
from .engine.prompt_syntax import PromptPlan, plan_prompts
from .engine.prompts import PromptEncoder, SDXLPromptEncoder, encode_prompt_schedules
from .engine.runtime import prepare_runtime
from .messages import EncodeRequest, PromptEmbeddings, PromptSchedule, ScheduledConditioning


@serve.deployment(name="TextEncoder")
class TextEncoder:
    def __init__(
        self,
        model: ModelConfig,
        config: TextEncoderConfig,
        lora: LoRAConfig,
        registry: RegistryConfig,
        tenant_weights: dict[str, float] | None = None,
    ):
        """``tenant_weights``: the fair-share weights (``denoiser.tenant_weights``, as ``build_app`` passes them)."""
        rt = prepare_runtime(model)
        info = rt.info
        directory = info.directory
        self.registry, _ = open_model_registry(registry, directory)
        self.sdxl = info.sdxl
        # Deterministic mode encodes one row per call (PromptEncoder.rowwise): plain kernels suffice.
        text_encoder = models.load_text_encoder(directory, rt.device, rt.dtype)
        self.adapters = ModelAdapters(
            text_encoder, "text_encoder", self.registry, lora, deterministic=False, tenant_weights=tenant_weights
        )
        if not self.sdxl:
            self.adapters_2 = None
            self.encoder = PromptEncoder(
                models.load_tokenizer(directory),
                text_encoder,
                config.cache_size,
                lora=self.adapters.lora,
                rowwise=rt.deterministic,
            )
        else:
            text_encoder_2 = models.load_text_encoder(directory, rt.device, rt.dtype, "text_encoder_2")
            self.adapters_2 = ModelAdapters(
                text_encoder_2,
                "text_encoder_2",
                self.registry,
                lora,
                deterministic=False,
                tenant_weights=tenant_weights,
            )
            common = {"rowwise": rt.deterministic, "hidden_layer": "penultimate"}
            self.encoder = SDXLPromptEncoder(
                PromptEncoder(
                    models.load_tokenizer(directory), text_encoder, config.cache_size, lora=self.adapters.lora, **common
                ),
                PromptEncoder(
                    models.load_tokenizer(directory, "tokenizer_2"),
                    text_encoder_2,
                    config.cache_size,
                    lora=self.adapters_2.lora,
                    pooled=True,
                    **common,
                ),
                force_zeros_for_empty_prompt=info.force_zeros_for_empty_prompt,
            )
        # Batches across requests, filled tenant by tenant in weighted-fair order (engine/fair_batcher.py).
        self.batcher = FairBatcher(
            self._encode_items, config.max_batch_size, config.batch_wait_timeout_s, tenant_weights
        )

    async def encode(self, request: EncodeRequest) -> PromptEmbeddings:
        """Both prompts' embeddings, with the same number of 77-token chunks (SDXL: and pooled).

        The prompts may use A1111's syntax (``(word:1.3)``, ``BREAK``); the planner has bounded
        their length by ``limits.max_prompt_chunks``. ``request.adapters`` are those with
        text-encoder weights (SDXL: ``adapters_2`` on the second encoder).

        Prompt editing, alternation and ``AND`` (``prompt_syntax.plan_prompts`` over
        ``request.steps``) add ``schedule``: every distinct text of it encoded once. A prompt
        without them is encoded exactly as before, with no schedule.
        """
        start = time.perf_counter()
        refs = [a.ref for a in request.adapters]
        refs_2 = [a.ref for a in request.adapters_2]
        if refs_2 and self.adapters_2 is None:
            raise ValueError("adapters_2 needs an SDXL model (text_encoder_2)")
        who = {"tenant": request.tenant, "weight": request.tenant_weight}  # slot waits in the fair order too
        slots = await self.adapters.acquire(refs, **who)  # pinned only once it returns: release below
        try:
            slots_2 = await self.adapters_2.acquire(refs_2, **who) if refs_2 else []
            try:
                text = tuple((slot, a.weight, a.ref) for slot, a in zip(slots, request.adapters, strict=True))
                text_2 = tuple((slot, a.weight, a.ref) for slot, a in zip(slots_2, request.adapters_2, strict=True))
                plan = None
                if request.steps is not None:
                    plan = plan_prompts(request.prompt, request.negative_prompt, request.steps)
                item = (request.prompt, request.negative_prompt, text, text_2, plan)
                slots_ms = 1000.0 * (time.perf_counter() - start)
                out, queued_ms = await self.batcher.submit_timed(request.tenant, item, weight=request.tenant_weight)
            finally:
                if refs_2:
                    self.adapters_2.release(refs_2)
        finally:
            self.adapters.release(refs)
        encode_ms = 1000.0 * (time.perf_counter() - start)
        return PromptEmbeddings(*out[:2], encode_ms, *out[2:], encode_wait_ms=slots_ms + queued_ms)

    async def _encode_items(self, items: list[tuple[str, str, tuple, tuple, PromptPlan | None]]) -> list[tuple]:
        # Positive and negative come back with the same chunk count (77 tokens each): CFG stacks them.
        # Requests whose plan has one text per step (no syntax, or an edit that never switches) are a
        # plain pair; the others get their schedule, encoded together.
        plain = [k for k, item in enumerate(items) if item[4] is None or not item[4].scheduled]
        scheduled = [k for k in range(len(items)) if k not in set(plain)]
        out: list[tuple] = [()] * len(items)
        if plain:
            pairs = await asyncio.to_thread(self._encode_pairs, [_plain_texts(items[k]) for k in plain])
            for k, pair in zip(plain, pairs, strict=True):
                out[k] = pair
        if scheduled:
            schedules = await asyncio.to_thread(self._encode_schedules, [items[k] for k in scheduled])
            for k, schedule in zip(scheduled, schedules, strict=True):
                out[k] = schedule
        return out

    def _encode_pairs(self, items: list[tuple[str, str, tuple, tuple]]) -> list[tuple]:
        prompts = [prompt for prompt, _, _, _ in items]
        negatives = [negative for _, negative, _, _ in items]
        adapters = [a for _, _, a, _ in items]
        if not self.sdxl:
            pairs = self.encoder.encode_prompt_pairs(prompts, negatives, adapters)
            return [(pos.cpu(), neg.cpu()) for pos, neg in pairs]
        adapters_2 = [a for _, _, _, a in items]
        out = self.encoder.encode_prompt_pairs(prompts, negatives, adapters, adapters_2)
        return [
            (
                e.prompt_embeds.cpu(),
                e.negative_prompt_embeds.cpu(),
                e.pooled_prompt_embeds.cpu(),
                e.negative_pooled_prompt_embeds.cpu(),
            )
            for e in out
        ]

    def _encode_schedules(self, items: list[tuple[str, str, tuple, tuple, PromptPlan]]) -> list[tuple]:
        plans = [plan for *_, plan in items]
        if not self.sdxl:
            encoders, adapters, zeros = [self.encoder], [[a for _, _, a, _, _ in items]], False
        else:
            encoders = list(self.encoder.encoders)
            adapters = [[a for _, _, a, _, _ in items], [a for _, _, _, a, _ in items]]
            zeros = self.encoder.force_zeros_for_empty_prompt
        schedules = encode_prompt_schedules(encoders, plans, adapters, zeros_for_empty_negative=zeros)
        return [_embeddings_of(_to_cpu(schedule), self.sdxl) for schedule in schedules]

    def stats(self) -> dict:
        # SDXL: both encoders see the same prompts; the first one's cache counts them.
        cache = self.encoder.encoders[0].cache if self.sdxl else self.encoder.cache
        stats = {
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "cache_entries": len(cache),
            "adapters": self.adapters.stats(),
            "batches": self.batcher.batches,
            "waiting_by_tenant": self.batcher.depths(),
        }
        if self.adapters_2 is not None:
            stats["adapters_2"] = self.adapters_2.stats()
        return stats

    def ready(self) -> bool:
        return True


def _plain_texts(item: tuple) -> tuple[str, str, tuple, tuple]:
    """A request with one text per step: its prompt and negative, as the plan has them (an edit at
    step 0 already applied)."""
    prompt, negative, text, text_2, plan = item
    if plan is not None:
        prompt, negative = plan.parts[0][0][1], plan.negative[0][1]
    return prompt, negative, text, text_2


def _to_cpu(schedule: PromptSchedule) -> PromptSchedule:
    def move(c: ScheduledConditioning) -> ScheduledConditioning:
        return ScheduledConditioning(c.ends, c.embeds.cpu(), None if c.pooled is None else c.pooled.cpu())

    return PromptSchedule(tuple(move(c) for c in schedule.parts), schedule.weights, move(schedule.negative))


def _embeddings_of(schedule: PromptSchedule, sdxl: bool) -> tuple:
    """``PromptEmbeddings``' fields after ``encode_ms``: the first part's and the negative's step-0 entries."""
    first, negative = schedule.parts[0], schedule.negative
    if not sdxl:
        return first.embeds[0], negative.embeds[0], None, None, schedule
    return first.embeds[0], negative.embeds[0], first.pooled[0], negative.pooled[0], schedule
