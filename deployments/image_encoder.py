"""ImageEncoder deployment: IP-Adapter's CLIP vision encoder for ``style_image``, batched across requests in
weighted-fair order, with an embedding cache keyed by the image's digest (``engine/image_encoder.py``).

Bound per served model only when the model has an ``ip_adapter`` section (``graph/app.py``)."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from .config import ImageEncoderConfig
from .engine.config import ModelConfig
from .engine.fair_batcher import FairBatcher
from .engine.image_encoder import StyleImageEncoder, load_image_encoder, resolve_ip_adapter
from .engine.runtime import prepare_runtime
from .messages import ImageEmbeddings, StyleImage


@serve.deployment(name="ImageEncoder")
class ImageEncoder:
    def __init__(self, model: ModelConfig, config: ImageEncoderConfig, tenant_weights: dict[str, float] | None = None):
        """``tenant_weights``: the fair-share weights (``denoiser.tenant_weights``, as ``build_app`` passes them)."""
        if model.ip_adapter is None:
            raise ValueError("the ImageEncoder needs model.ip_adapter")
        rt = prepare_runtime(model)
        files = resolve_ip_adapter(model.ip_adapter, model.uri, model.cache_dir)
        encoder, processor = load_image_encoder(files.image_encoder, rt.device, rt.dtype)
        self.encoder = StyleImageEncoder(
            encoder, processor, variant=model.ip_adapter.variant, cache_size=config.cache_size, rowwise=rt.deterministic
        )
        self.batcher = FairBatcher(
            self._encode_items, config.max_batch_size, config.batch_wait_timeout_s, tenant_weights
        )

    async def encode(self, image: StyleImage) -> ImageEmbeddings:
        """The image's IP-Adapter embeddings (``ip_adapter.encode_image``'s), from the cache or a batch."""
        start = time.perf_counter()
        embeds, negative = await self.batcher.submit(image.tenant, image, weight=image.tenant_weight)
        return ImageEmbeddings(embeds, negative, 1000.0 * (time.perf_counter() - start))

    async def _encode_items(self, items: list[StyleImage]) -> list[tuple]:
        return await asyncio.to_thread(self.encoder.encode_images, [(i.digest, i.pixels) for i in items])

    def stats(self) -> dict:
        return {**self.encoder.stats(), "batches": self.batcher.batches, "waiting_by_tenant": self.batcher.depths()}

    def ready(self) -> bool:
        return True
