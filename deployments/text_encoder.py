"""TextEncoder deployment: CLIP prompt encoding, batched across requests, with an embedding cache."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from .engine import models
from .engine.config import ModelConfig, TextEncoderConfig
from .engine.prompts import PromptEncoder
from .engine.runtime import prepare_runtime


@serve.deployment(name="TextEncoder")
class TextEncoder:
    def __init__(self, model: ModelConfig, config: TextEncoderConfig):
        rt = prepare_runtime(model)
        directory = rt.info.directory
        text_encoder = rt.prepare(models.load_text_encoder(directory, rt.device, rt.dtype))
        self.encoder = PromptEncoder(models.load_tokenizer(directory), text_encoder, config.cache_size)
        self._encode_batch.set_max_batch_size(config.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    async def encode(self, prompt: str, negative_prompt: str) -> dict:
        """``{prompt_embeds [tokens, hidden], negative_prompt_embeds [tokens, hidden], encode_ms}``."""
        start = time.perf_counter()
        pos, neg = await self._encode_batch((prompt, negative_prompt))
        return {
            "prompt_embeds": pos,
            "negative_prompt_embeds": neg,
            "encode_ms": 1000.0 * (time.perf_counter() - start),
        }

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _encode_batch(self, pairs: list[tuple[str, str]]) -> list[tuple]:
        texts = [text for pair in pairs for text in pair]
        embeds = await asyncio.to_thread(self.encoder.encode_prompt, texts)
        return [(embeds[2 * i].cpu(), embeds[2 * i + 1].cpu()) for i in range(len(pairs))]

    def stats(self) -> dict:
        cache = self.encoder.cache
        return {"cache_hits": cache.hits, "cache_misses": cache.misses, "cache_entries": len(cache)}

    def ready(self) -> bool:
        return True
