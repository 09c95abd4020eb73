"""The ImageEncoder's engine: a reference image (``style_image``) -> the embeddings IP-Adapter reads. No Ray.

``StyleImageEncoder.encode_images`` is ``StableDiffusionPipeline.encode_image`` for a batch of requests' images:
each image through a ``CLIPImageProcessor`` as the pipeline's ``feature_extractor`` (resize, centre crop, CLIP
mean/std), then ``CLIPVisionModelWithProjection``; plain IP-Adapter: ``image_embeds`` and zeros, "plus": the
penultimate hidden states of the image and of an all-zero image (``ip_adapter.encode_image``). Results are kept in
an LRU keyed by the image's digest (sha256 of its pixels and size: ``graph/style_inputs.image_digest``), so a
style used again costs nothing; a batch encodes each distinct new image once.

In deterministic mode each image runs alone through the encoder (as the TextEncoder's ``rowwise``): its embeddings
never depend on its batch-mates, and equal diffusers' pipeline run for that image alone bit for bit.

``resolve_ip_adapter`` finds the files a model's ``ip_adapter`` config names: the builtin tiny IP-Adapter, a local
directory, or an S3 prefix copied once into the cache (the model store's S3 code, ``engine/models.py``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import IPAdapterConfig
from .ip_adapter import PLAIN, IPAdapterError, IPAdapterWeights, encode_image, resolve_ip_adapter_dir
from .prompts import EmbeddingCache


@dataclass(frozen=True)
class IPAdapterFiles:
    """Where a model's IP-Adapter lives on this node."""

    weights: Path  # the weights file (diffusers' IP-Adapter format)
    image_encoder: Path  # the CLIPVisionModelWithProjection directory


def resolve_ip_adapter(
    config: IPAdapterConfig, model_uri: str, cache_dir: str | Path | None = None, s3_client: Any = None
) -> IPAdapterFiles:
    """The weights file and image encoder directory ``config`` names, fetched into the cache if on S3.

    Raises ``IPAdapterError`` (one line naming ``model.ip_adapter`` and what is missing).
    """
    if config.uri == "builtin":
        root = resolve_ip_adapter_dir(model_uri, cache_dir)
    elif config.uri.startswith("s3://"):
        root = _fetch_s3_dir(config.uri, cache_dir, s3_client)
    else:
        root = Path(config.uri.removeprefix("file://")).expanduser()
        if not root.is_dir():
            raise IPAdapterError(f"model.ip_adapter.uri {config.uri!r}: no such directory")
    files = IPAdapterFiles(root / config.weights_name(), root / config.image_encoder)
    if not files.weights.is_file():
        raise IPAdapterError(f"model.ip_adapter.weights: no file {config.weights_name()!r} under {config.uri!r}")
    if not (files.image_encoder / "config.json").is_file():
        raise IPAdapterError(
            f"model.ip_adapter.image_encoder: no CLIP vision model ({config.image_encoder}/config.json) "
            f"under {config.uri!r}"
        )
    return files


def load_ip_adapter_weights(
    config: IPAdapterConfig, model_uri: str, unet: torch.nn.Module, cache_dir: str | Path | None = None
) -> IPAdapterWeights:
    """The Denoiser's start-up check: the weights ``config`` names, checked against the served ``unet``, of the
    configured variant, reading what the configured image encoder outputs. ``IPAdapterError``: one line."""
    files = resolve_ip_adapter(config, model_uri, cache_dir)
    weights = IPAdapterWeights.from_file(files.weights, unet)
    if weights.variant != config.variant:
        raise IPAdapterError(
            f"model.ip_adapter.variant is {config.variant}, but {config.weights_name()} is a {weights.variant} "
            "IP-Adapter"
        )
    encoder = json.loads((files.image_encoder / "config.json").read_text())
    encoder = encoder.get("vision_config", encoder)  # a full CLIPConfig nests it
    # plain reads image_embeds [projection_dim]; plus the hidden states [hidden_size]
    key = "projection_dim" if weights.variant == PLAIN else "hidden_size"
    if encoder.get(key) != weights.embed_dim:
        raise IPAdapterError(
            f"model.ip_adapter.image_encoder: its {key} is {encoder.get(key)}; {config.weights_name()} reads "
            f"{weights.embed_dim}-wide embeddings"
        )
    return weights


def _fetch_s3_dir(uri: str, cache_dir: str | Path | None, client: Any) -> Path:
    """``s3://bucket/prefix`` copied once into the cache; a changed listing (etags, sizes) is a new directory."""
    from filelock import FileLock

    from . import models

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise IPAdapterError(f"model.ip_adapter.uri {uri!r} has no bucket; expected s3://bucket/prefix")
    prefix = prefix.strip("/")
    client = client if client is not None else models._default_s3_client()
    try:
        objects = models._list_s3(client, bucket, prefix)
    except ValueError as e:
        raise IPAdapterError(f"model.ip_adapter.uri {uri!r}: {e}") from None
    digest = hashlib.sha256(json.dumps([(o.rel, o.etag, o.size) for o in objects]).encode()).hexdigest()[:12]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else models.default_cache_dir()
    target = cache / "ip-adapter" / "s3" / bucket / f"{prefix.replace('/', '_') or 'root'}-{digest}"
    marker = target / ".complete"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if marker.exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            out = staging / "dir"
            models._download_s3(client, bucket, objects, out)
            (out / ".complete").touch()
            if target.exists():
                shutil.rmtree(target)
            out.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_image_encoder(directory: Path, device: torch.device, dtype: torch.dtype):
    """``(CLIPVisionModelWithProjection, CLIPImageProcessor)``: the processor from the directory's
    ``preprocessor_config.json`` if it has one, else CLIP's (mean/std, bicubic) at the encoder's ``image_size``
    (224 for ViT-H/bigG: exactly Stable Diffusion's ``feature_extractor``)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(str(directory), torch_dtype=dtype)
    encoder = encoder.to(device).eval().requires_grad_(False)
    if (directory / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(str(directory))
    else:
        side = int(encoder.config.image_size)
        processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return encoder, processor


class StyleImageEncoder:
    """Reference images -> ``(embeds, negative)`` per image, cached by digest (see the module docstring).

    >>> enc = StyleImageEncoder(encoder, processor, variant="plain", cache_size=256)      # doctest: +SKIP
    >>> [(embeds, negative)] = enc.encode_images([(digest, pixels)])                   # doctest: +SKIP
    >>> embeds.shape                                                                      # doctest: +SKIP
    torch.Size([48])
    """

    def __init__(self, encoder, processor, *, variant: str, cache_size: int, rowwise: bool = True):
        self.encoder = encoder
        self.processor = processor
        self.hidden_states = variant != PLAIN  # plus: penultimate hidden states
        self.rowwise = rowwise
        self.cache = EmbeddingCache(cache_size)
        self.encoded = 0  # images that ran through the encoder (cache misses, each distinct image once)
        self.forwards = 0  # encoder calls (each counts the image and, for plus, its all-zero image)

    def encode_images(self, images: Sequence[tuple[str, np.ndarray]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(digest, pixels [H, W, 3] uint8)]`` -> ``[(embeds, negative)]`` on the CPU, in order.

        ``embeds``/``negative``: ``[dim]`` (plain) or ``[tokens, dim]`` (plus). Blocking: call in a thread.
        """
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        missing: dict[str, np.ndarray] = {}
        for digest, pixels in images:
            if digest in out or digest in missing:
                continue
            cached = self.cache.get((digest,))
            if cached is not None:
                out[digest] = cached
            else:
                missing[digest] = pixels
        if missing:
            digests = list(missing)
            for digest, result in zip(digests, self._encode([missing[d] for d in digests]), strict=True):
                self.cache.put((digest,), result)
                out[digest] = result
        return [out[digest] for digest, _ in images]

    def _encode(self, images: list[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from PIL import Image

        pil = [Image.fromarray(pixels, "RGB") for pixels in images]
        pixel_values = self.processor(pil, return_tensors="pt").pixel_values  # [n, 3, side, side]
        groups = [pixel_values[i : i + 1] for i in range(len(pil))] if self.rowwise else [pixel_values]
        results = []
        for group in groups:
            embeds, negative = encode_image(self.encoder, group, hidden_states=self.hidden_states)
            self.forwards += 1
            results += [(e.cpu().clone(), n.cpu().clone()) for e, n in zip(embeds, negative, strict=True)]
        self.encoded += len(images)
        return results

    def stats(self) -> dict:
        return {
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
            "cache_entries": len(self.cache),
            "encoded": self.encoded,
            "forwards": self.forwards,
        }
