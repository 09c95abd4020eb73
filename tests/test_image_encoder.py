"""The ImageEncoder (issue 22), without Ray: the engine's embeddings equal ``StableDiffusionPipeline.encode_image``
(the pipeline's ``feature_extractor`` + ``image_encoder``) bit for bit, its digest-keyed LRU cache, batching through
the fair batcher (the deployment class itself, on the event loop), and the IP-Adapter files a model's config names:
builtin, a local directory, an S3 prefix (moto), and the one-line start-up errors."""

from __future__ import annotations

import asyncio
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deployments.config import ImageEncoderConfig
from deployments.engine.builtin import IP_ADAPTER_FILES
from deployments.engine.config import IPAdapterConfig, ModelConfig
from deployments.engine.image_encoder import (
    StyleImageEncoder,
    load_image_encoder,
    load_ip_adapter_weights,
    resolve_ip_adapter,
)
from deployments.engine.ip_adapter import IPAdapterError, resolve_ip_adapter_dir
from deployments.messages import ImageEmbeddings, StyleImage
from graph.style_inputs import image_digest

pytest_plugins = ["registry_helpers"]


def picture(seed: int, width: int = 40, height: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def ip_dir(cache_dir):
    return resolve_ip_adapter_dir("builtin:tiny-sd", cache_dir)


@pytest.fixture(scope="module")
def parts(ip_dir):
    return load_image_encoder(ip_dir / "image_encoder", torch.device("cpu"), torch.float32)


def pipeline_encode_image(parts, pixels: np.ndarray, plus: bool):
    """diffusers' own ``StableDiffusionPipeline.encode_image`` for one PIL image (its feature_extractor, its
    image_encoder): ``(image_embeds, uncond_image_embeds)`` for that image, as the pipeline computes them."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    encoder, processor = parts
    pipe = SimpleNamespace(image_encoder=encoder, feature_extractor=processor)
    image = Image.fromarray(pixels)
    embeds, negative = StableDiffusionPipeline.encode_image(pipe, image, torch.device("cpu"), 1, plus)
    return embeds[0], negative[0]


@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_embeddings_equal_the_pipelines_encode_image(parts, variant):
    enc = StyleImageEncoder(*parts, variant=variant, cache_size=8)
    images = [picture(1), picture(2, 64, 32), picture(3)]
    out = enc.encode_images([(image_digest(p), p) for p in images])
    for p, (embeds, negative) in zip(images, out, strict=True):
        ref_embeds, ref_negative = pipeline_encode_image(parts, p, plus=variant == "plus")
        assert embeds.shape == ref_embeds.shape == ((48,) if variant == "plain" else (17, 32))
        assert torch.equal(embeds, ref_embeds) and torch.equal(negative, ref_negative)
    assert not torch.equal(out[0][0], out[1][0])  # different images, different embeddings
    if variant == "plain":
        assert torch.count_nonzero(out[0][1]) == 0  # plain: the negative is zeros


def test_the_cache_is_keyed_by_the_digest_and_keeps_the_last_used(parts):
    enc = StyleImageEncoder(*parts, variant="plain", cache_size=2)
    a, b, c = picture(1), picture(2), picture(3)
    key = {name: (image_digest(p), p) for name, p in (("a", a), ("b", b), ("c", c))}
    first = enc.encode_images([key["a"], key["b"], key["a"]])  # a twice in one batch: encoded once
    assert enc.stats() == {"cache_hits": 0, "cache_misses": 2, "cache_entries": 2, "encoded": 2, "forwards": 2}
    assert torch.equal(first[0][0], first[2][0])
    again = enc.encode_images([key["a"]])  # a hit: no forward; a is now the most recent
    assert torch.equal(again[0][0], first[0][0])
    assert enc.stats() == {"cache_hits": 1, "cache_misses": 2, "cache_entries": 2, "encoded": 2, "forwards": 2}
    enc.encode_images([key["c"]])  # evicts b (least recently used), keeps a
    assert enc.stats() == {"cache_hits": 1, "cache_misses": 3, "cache_entries": 2, "encoded": 3, "forwards": 3}
    enc.encode_images([key["a"]])
    assert enc.stats()["cache_hits"] == 2 and enc.stats()["encoded"] == 3
    enc.encode_images([key["b"]])  # b was evicted: encoded again
    assert enc.stats()["encoded"] == 4
    off = StyleImageEncoder(*parts, variant="plain", cache_size=0)
    off.encode_images([key["a"]])
    off.encode_images([key["a"]])
    assert off.stats()["encoded"] == 2 and off.stats()["cache_entries"] == 0


def test_batched_forward_off_deterministic_mode_is_one_call(parts):
    rowwise = StyleImageEncoder(*parts, variant="plain", cache_size=0)
    batched = StyleImageEncoder(*parts, variant="plain", cache_size=0, rowwise=False)
    images = [(image_digest(p), p) for p in (picture(4), picture(5), picture(6))]
    one, many = rowwise.encode_images(images), batched.encode_images(images)
    assert (rowwise.forwards, batched.forwards) == (3, 1)
    for (e1, n1), (e2, n2) in zip(one, many, strict=True):
        assert (e1 - e2).abs().max().item() <= 1e-5 and torch.equal(n1, n2)


def test_the_deployment_batches_requests_fairly_and_answers_each(cache_dir):
    """The ImageEncoder class itself (no Ray): requests waiting together form one batch (no wait needed: they are
    all queued before the batch loop first runs); each gets its own embeddings."""
    from deployments.image_encoder import ImageEncoder

    cls = ImageEncoder.func_or_class
    model = ModelConfig(uri="builtin:tiny-sd", cache_dir=str(cache_dir), ip_adapter=IPAdapterConfig())
    deployment = cls(model, ImageEncoderConfig(max_batch_size=8, batch_wait_timeout_s=0.0, cache_size=16))
    images = [picture(7), picture(8), picture(7)]
    requests = [StyleImage(p, image_digest(p), tenant=f"t{i % 2}") for i, p in enumerate(images)]

    async def run():
        return await asyncio.gather(*(deployment.encode(r) for r in requests))

    out = asyncio.run(run())
    assert all(isinstance(o, ImageEmbeddings) for o in out)
    assert deployment.batcher.batches == 1
    stats = deployment.stats()
    assert (stats["encoded"], stats["cache_entries"]) == (2, 2)  # the repeated image: encoded once
    alone = deployment.encoder.encode_images([(requests[1].digest, images[1])])[0]
    assert torch.equal(out[1].image_embeds, alone[0])
    assert torch.equal(out[0].image_embeds, out[2].image_embeds)
    assert not torch.equal(out[0].image_embeds, out[1].image_embeds)


# -- the files a config names, and the start-up checks -----------------------------------------


def test_builtin_and_local_directories(ip_dir, tmp_path, tiny):
    files = resolve_ip_adapter(IPAdapterConfig(variant="plus"), "builtin:tiny-sd", ip_dir.parent.parent.parent.parent)
    assert files.weights.name == IP_ADAPTER_FILES["plus"] and (files.image_encoder / "config.json").is_file()
    local = tmp_path / "ip"
    shutil.copytree(ip_dir, local)
    (local / IP_ADAPTER_FILES["plain"]).rename(local / "ip-adapter_sd15.safetensors")
    config = IPAdapterConfig(uri=f"file://{local}", weights="ip-adapter_sd15.safetensors")
    files = resolve_ip_adapter(config, "/models/sd15")
    assert files.weights == local / "ip-adapter_sd15.safetensors"
    weights = load_ip_adapter_weights(config, "/models/sd15", tiny["unet"])
    assert weights.variant == "plain" and weights.embed_dim == 48


def test_an_s3_prefix_is_fetched_once_into_the_cache(ip_dir, tmp_path, moto_s3):
    client = moto_s3.client()
    bucket = moto_s3.new_bucket()
    for path in ip_dir.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            client.upload_file(str(path), bucket, f"ip/{path.relative_to(ip_dir)}")
    config = IPAdapterConfig(uri=f"s3://{bucket}/ip", variant="plus")
    files = resolve_ip_adapter(config, "s3://models/sd15", tmp_path / "cache", s3_client=client)
    assert files.weights.read_bytes() == (ip_dir / IP_ADAPTER_FILES["plus"]).read_bytes()
    assert str(files.weights).startswith(str(tmp_path / "cache"))
    again = resolve_ip_adapter(config, "s3://models/sd15", tmp_path / "cache", s3_client=client)
    assert again == files
    with pytest.raises(IPAdapterError, match=r"^model.ip_adapter.uri 's3://.*/none': no objects under"):
        resolve_ip_adapter(IPAdapterConfig(uri=f"s3://{bucket}/none"), "x", tmp_path / "cache", s3_client=client)


def test_start_up_errors_are_one_line_naming_the_setting(ip_dir, tmp_path, tiny, cache_dir):
    local = tmp_path / "ip"
    shutil.copytree(ip_dir, local)
    cases = [
        (IPAdapterConfig(uri=str(tmp_path / "nope")), r"^model.ip_adapter.uri '.*nope': no such directory$"),
        (
            IPAdapterConfig(uri=str(local), weights="x.safetensors"),
            r"^model.ip_adapter.weights: no file 'x.safetensors'",
        ),
        (
            IPAdapterConfig(uri=str(local), variant="plus", weights=IP_ADAPTER_FILES["plain"]),
            r"^model.ip_adapter.variant is plus, but ip-adapter.safetensors is a plain IP-Adapter$",
        ),
        (
            IPAdapterConfig(uri=str(local), image_encoder="missing"),
            r"^model.ip_adapter.image_encoder: no CLIP vision model \(missing/config.json\)",
        ),
    ]
    for config, message in cases:
        with pytest.raises(IPAdapterError, match=message) as caught:
            load_ip_adapter_weights(config, "/models/sd15", tiny["unet"])
        assert "\n" not in str(caught.value)
    # An image encoder of another width than the weights read.
    import json

    cfg = json.loads((local / "image_encoder" / "config.json").read_text())
    cfg["projection_dim"] = 64
    (local / "image_encoder" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IPAdapterError, match=r"^model.ip_adapter.image_encoder: its projection_dim is 64; .* 48-wide"):
        load_ip_adapter_weights(IPAdapterConfig(uri=str(local)), "/models/sd15", tiny["unet"])
    # Weights for another UNet: IPAdapterWeights' own one-line check (the SDXL builtin's against tiny-sd).
    xl = resolve_ip_adapter_dir("builtin:tiny-sdxl", cache_dir)
    with pytest.raises(IPAdapterError) as caught:
        load_ip_adapter_weights(IPAdapterConfig(uri=str(xl)), "/models/sd15", tiny["unet"])
    assert "\n" not in str(caught.value) and "served UNet" in str(caught.value)


def test_config_refuses_builtin_weights_for_a_non_builtin_model():
    with pytest.raises(ValueError, match="model.ip_adapter.uri: builtin is the builtin models' tiny IP-Adapter"):
        ModelConfig(uri="/models/sd15", ip_adapter=IPAdapterConfig())
    assert (
        ModelConfig(uri="builtin:tiny-sd", ip_adapter={"variant": "plus"}).ip_adapter.weights_name()
        == (IP_ADAPTER_FILES["plus"])
    )


def test_the_denoiser_fails_to_start_with_the_one_line(ip_dir, tmp_path, cache_dir):
    """The Denoiser deployment's own constructor (no Ray needed up to the check): a weights file of the other
    variant fails its start with the one-line error, before anything is served."""
    from deployments.config import DenoiserConfig
    from deployments.denoiser import Denoiser
    from deployments.engine.config import LoRAConfig
    from lora_registry.config import RegistryConfig

    local = tmp_path / "ip"
    shutil.copytree(ip_dir, local)
    ip = IPAdapterConfig(uri=str(local), variant="plus", weights=IP_ADAPTER_FILES["plain"])
    model = ModelConfig(uri="builtin:tiny-sd", cache_dir=str(cache_dir), ip_adapter=ip)
    registry = RegistryConfig(uri=str(tmp_path / "registry"), cache_dir=str(tmp_path / "adapter-cache"))
    with pytest.raises(
        IPAdapterError, match=r"^model.ip_adapter.variant is plus, but ip-adapter.safetensors is a plain"
    ):
        Denoiser.func_or_class(model, DenoiserConfig(), LoRAConfig(), registry)
