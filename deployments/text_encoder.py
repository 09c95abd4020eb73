"""TextEncoder deployment: CLIP prompt encoding (A1111 weighting, 77-token chunks), batched across
requests, with an embedding cache and per-request text-encoder LoRA."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from lora_registry.config import RegistryConfig

from .config import TextEncoderConfig
from .engine import models
from .engine.adapters import ModelAdapters, open_model_registry
from .engine.config import LoRAConfig, ModelConfig
from .engine.prompts import PromptEncoder
from .engine.runtime import prepare_runtime
from .messages import EncodeRequest, PromptEmbeddings


@serve.deployment(name="TextEncoder")
class TextEncoder:
    def __init__(self, model: ModelConfig, config: TextEncoderConfig, lora: LoRAConfig, registry: RegistryConfig):
        rt = prepare_runtime(model)
        directory = rt.info.directory
        text_encoder = models.load_text_encoder(directory, rt.device, rt.dtype)
        self.registry, _ = open_model_registry(registry, directory)
        # Deterministic mode encodes one row per call (PromptEncoder.rowwise): plain kernels suffice.
        self.adapters = ModelAdapters(text_encoder, "text_encoder", self.registry, lora, deterministic=False)
        self.encoder = PromptEncoder(
            models.load_tokenizer(directory),
            text_encoder,
            config.cache_size,
            lora=self.adapters.lora,
            rowwise=rt.deterministic,
        )
        self._encode_batch.set_max_batch_size(config.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    async def encode(self, request: EncodeRequest) -> PromptEmbeddings:
        """Both prompts' embeddings, with the same number of 77-token chunks.

        The prompts may use A1111's weighting syntax (``(word:1.3)``); the planner has bounded
        their length by ``limits.max_prompt_chunks``. ``request.adapters`` are those with
        text-encoder weights.
        """
        start = time.perf_counter()
        refs = [a.ref for a in request.adapters]
        slots = await self.adapters.acquire(refs)  # pinned only once it returns: release below
        try:
            text = tuple((slot, a.weight, a.ref) for slot, a in zip(slots, request.adapters, strict=True))
            pos, neg = await self._encode_batch((request.prompt, request.negative_prompt, text))
        finally:
            self.adapters.release(refs)
        return PromptEmbeddings(pos, neg, encode_ms=1000.0 * (time.perf_counter() - start))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _encode_batch(self, items: list[tuple[str, str, tuple]]) -> list[tuple]:
        # Positive and negative come back with the same chunk count (77 tokens each): CFG stacks them.
        prompts = [prompt for prompt, _, _ in items]
        negatives = [negative for _, negative, _ in items]
        adapters = [a for _, _, a in items]
        pairs = await asyncio.to_thread(self.encoder.encode_prompt_pairs, prompts, negatives, adapters)
        return [(pos.cpu(), neg.cpu()) for pos, neg in pairs]

    def stats(self) -> dict:
        cache = self.encoder.cache
        return {
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "cache_entries": len(cache),
            "adapters": self.adapters.stats(),
        }

    def ready(self) -> bool:
        return True
