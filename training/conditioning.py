"""What the UNet is conditioned on, per model kind: the one part of a training step that differs.

``sd1`` (Stable Diffusion 1.x/2.x), as diffusers' ``train_text_to_image_lora.py``::

    encoder_hidden_states = clip(caption).last_hidden_state                      [b, 77, hidden]

``sdxl``, as diffusers' ``train_text_to_image_lora_sdxl.py`` (and ``StableDiffusionXLPipeline.encode_prompt``)::

    encoder_hidden_states = concat(clip_l(caption).hidden_states[-2],
                                   clip_g(caption).hidden_states[-2])            [b, 77, hidden_l + hidden_g]
    text_embeds           = clip_g(caption).text_embeds                          [b, pooled]
    time_ids              = original_size + crop_top_left + target_size          [b, 6]  (height, width order)

The strategy owns the text encoders' part of the step (tokenizing, encoding,
caching the embeddings of a frozen encoder); the trainer owns the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .data import CropGeometry

TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


@dataclass(frozen=True)
class UNetConditioning:
    encoder_hidden_states: torch.Tensor  # [batch, max_length, cross_attention_dim]
    added_cond_kwargs: dict[str, torch.Tensor] | None  # SDXL: text_embeds [batch, pooled], time_ids [batch, 6]


class Conditioning:
    """A model kind's text conditioning over its tokenizers and (possibly LoRA-carrying) text encoders.

    ``text_encoders`` maps each part of ``TEXT_ENCODERS`` to its module (or its DDP wrapper).
    With ``trainable=False`` each caption is encoded once and its embeddings kept.
    """

    TEXT_ENCODERS: tuple[str, ...] = ()
    PIPELINE = ""  # the diffusers pipeline whose save_lora_weights writes this kind's LoRA file
    # Text encoders whose last layer the conditioning never reads: its LoRA gets no gradient (DDP must know).
    PARTLY_USED: frozenset[str] = frozenset()

    def __init__(
        self,
        tokenizers: Mapping[str, object],
        text_encoders: Mapping[str, torch.nn.Module],
        *,
        trainable: bool,
        device: torch.device,
    ):
        if set(text_encoders) != set(self.TEXT_ENCODERS):
            raise ValueError(
                f"{type(self).__name__} needs text encoders {self.TEXT_ENCODERS}, got {sorted(text_encoders)}"
            )
        self.tokenizers = {part: tokenizers[part] for part in self.TEXT_ENCODERS}
        self.text_encoders = dict(text_encoders)
        self.trainable = trainable
        self.device = device
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # caption -> (hidden, pooled)

    def tokenize(self, part: str, texts: Sequence[str]) -> torch.Tensor:
        tokenizer = self.tokenizers[part]
        return tokenizer(
            list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)  # fmt: skip

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(hidden [b, max_length, dim], pooled [b, pooled] or None)`` straight from the encoders."""
        raise NotImplementedError

    def encode_prompt(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``encode``, through the cache when the text encoders are frozen."""
        if self.trainable:
            return self.encode(captions)
        todo = sorted({c for c in captions if c not in self._cache})
        if todo:
            with torch.no_grad():
                hidden, pooled = self.encode(todo)
            for i, caption in enumerate(todo):
                self._cache[caption] = (hidden[i], None if pooled is None else pooled[i])
        hidden = torch.stack([self._cache[c][0] for c in captions])
        pooled_rows = [self._cache[c][1] for c in captions]
        return hidden, None if pooled_rows[0] is None else torch.stack(pooled_rows)

    def __call__(self, captions: Sequence[str], geometry: Sequence[CropGeometry], resolution: int) -> UNetConditioning:
        raise NotImplementedError


class SD1Conditioning(Conditioning):
    TEXT_ENCODERS = ("text_encoder",)
    PIPELINE = "StableDiffusionPipeline"

    def encode(self, captions):
        ids = self.tokenize("text_encoder", captions)
        return self.text_encoders["text_encoder"](ids, return_dict=False)[0], None

    def __call__(self, captions, geometry, resolution):
        hidden, _ = self.encode_prompt(captions)
        return UNetConditioning(hidden, None)


class SDXLConditioning(Conditioning):
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
    PIPELINE = "StableDiffusionXLPipeline"
    PARTLY_USED = frozenset({"text_encoder"})  # penultimate states only; text_encoder_2's last layer feeds the pool

    def encode(self, captions):
        hidden = []
        for part in self.TEXT_ENCODERS:
            out = self.text_encoders[part](self.tokenize(part, captions), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # the penultimate layer, as SDXL was trained
        pooled = out.text_embeds  # text_encoder_2's projected pooled output
        return torch.cat(hidden, dim=-1), pooled

    def __call__(self, captions, geometry, resolution):
        if len(geometry) != len(captions):
            raise ValueError(
                f"SDXL conditioning needs each sample's crop geometry ({len(geometry)} for {len(captions)})"
            )
        hidden, pooled = self.encode_prompt(captions)
        time_ids = torch.tensor(
            [[*g.original_size, *g.crop_top_left, resolution, resolution] for g in geometry],
            dtype=hidden.dtype,
            device=self.device,
        )  # [b, 6]
        return UNetConditioning(hidden, {"text_embeds": pooled, "time_ids": time_ids})


STRATEGIES: dict[str, type[Conditioning]] = {"sd1": SD1Conditioning, "sdxl": SDXLConditioning}


def strategy_for(kind: str) -> type[Conditioning]:
    """The conditioning class of a ``ModelInfo.kind`` (``"sd1"``, ``"sdxl"``)."""
    try:
        return STRATEGIES[kind]
    except KeyError:
        raise ValueError(f"no training conditioning for model kind {kind!r} (known: {sorted(STRATEGIES)})") from None
