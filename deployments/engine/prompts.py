"""Prompt tokenisation and CLIP encoding, with an LRU cache of embeddings.

``encode_prompt`` mirrors diffusers' ``StableDiffusionPipeline.encode_prompt``
(pad to the tokenizer's context, truncate, take the last hidden state), so an
embedding made here equals the pipeline's for the same text.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

TokenIds = tuple[int, ...]
# An adapter set as the text encoder sees it: ((slot, weight, identity), ...). The identity
# (e.g. "name@version") keys the cache, since slots are reused for other adapters.
TextAdapters = tuple[tuple[int, float, str], ...]


def count_tokens(tokenizer, text: str) -> int:
    """Tokens ``text`` takes in the encoder's context, start and end tokens included."""
    return len(tokenizer(text, truncation=False).input_ids)


class EmbeddingCache:
    """A thread-safe LRU of prompt embeddings keyed by token ids (and the adapter set)."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple, value: torch.Tensor) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class PromptEncoder:
    """Tokenizes and encodes prompts in batches; repeated prompts come from the cache."""

    def __init__(self, tokenizer, text_encoder, cache_size: int = 1024, lora=None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.lora = lora  # a MultiLoRAModel over ``text_encoder``, or None
        self.cache = EmbeddingCache(cache_size)
        self.max_length = tokenizer.model_max_length

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def tokenize(self, texts: list[str]) -> list[TokenIds]:
        ids = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids  # [n, max_length]
        return [tuple(row) for row in ids.tolist()]

    @torch.inference_mode()
    def encode_prompt(self, texts: list[str], adapters: list[TextAdapters] | None = None) -> list[torch.Tensor]:
        """One embedding ``[max_length, hidden]`` per text; uncached texts share one forward.

        ``adapters[i]`` are the text-encoder LoRAs for ``texts[i]`` (resident slots of ``self.lora``).
        """
        adapters = adapters or [()] * len(texts)
        keys = [
            (ids, tuple((ident, w) for _, w, ident in a)) for ids, a in zip(self.tokenize(texts), adapters, strict=True)
        ]
        out: list[torch.Tensor | None] = [self.cache.get(k) for k in keys]
        todo: dict[tuple, TextAdapters] = {}
        for k, a, e in zip(keys, adapters, out, strict=True):
            if e is None:
                todo.setdefault(k, a)
        if todo:
            input_ids = torch.tensor([k[0] for k in todo], device=self.device)  # [m, max_length]
            attention_mask = None
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                attention_mask = (input_ids != self.tokenizer.pad_token_id).long()
            rows = [tuple((slot, w) for slot, w, _ in a) for a in todo.values()]
            if self.lora is not None and any(rows):
                with self.lora.routed(rows):
                    hidden = self.text_encoder(input_ids, attention_mask=attention_mask)[0]
            else:
                hidden = self.text_encoder(input_ids, attention_mask=attention_mask)[0]  # [m, max_length, hidden]
            fresh = {k: hidden[i].clone() for i, k in enumerate(todo)}
            for k, e in fresh.items():
                self.cache.put(k, e)
            out = [e if e is not None else fresh[k] for k, e in zip(keys, out, strict=True)]
        return out  # type: ignore[return-value]
