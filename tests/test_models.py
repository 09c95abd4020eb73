"""Model directories: the builtin default is written as an ordinary diffusers directory and loaded back
through the same loader as real checkpoints, locally or from S3."""

import hashlib
import json

import pytest
import torch

from deployments.engine import models
from deployments.engine.builtin import write_builtin


def _digest(directory):
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*.safetensors"))
    }


def test_builtin_is_a_diffusers_directory(tiny_dir, tiny):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (tiny_dir / "tokenizer").iterdir()}
    assert type(tiny["unet"]).__name__ == "UNet2DConditionModel"
    assert type(tiny["vae"]).__name__ == "AutoencoderKL"
    assert type(tiny["text_encoder"]).__name__ == "CLIPTextModel"
    assert tiny["info"].vae_scale_factor == 8
    assert tiny["info"].default_side == 256
    assert tiny["info"].scheduler_class == "PNDMScheduler"


def test_builtin_is_deterministic(tiny_dir, tmp_path):
    again = write_builtin("builtin:tiny-sd", tmp_path / "again")
    assert _digest(again) == _digest(tiny_dir)
    assert len(_digest(tiny_dir)) == 3


def test_diffusers_pipeline_loads_the_directory(tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), local_files_only=True)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]


@pytest.mark.parametrize(
    "uri, message",
    [
        ("/nonexistent/model", "does not exist"),
        ("builtin:nope", "unknown builtin model"),
        ("s3:///prefix", "has no bucket"),
    ],
)
def test_bad_model_uris(uri, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        models.resolve_model_dir(uri, tmp_path)


def test_incomplete_directory_names_missing_parts(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match=r"lacks \['vae', 'text_encoder', 'tokenizer', 'scheduler'\]"):
        models.resolve_model_dir(str(tmp_path), tmp_path)


def test_dtype_and_device_resolution():
    cpu = torch.device("cpu")
    assert models.resolve_dtype("auto", cpu) == torch.float32
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert models.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert models.resolve_device("cpu") == cpu


def test_s3_model_is_downloaded_once(tiny_dir, tmp_path, s3_server):
    import boto3

    client = boto3.client("s3", **s3_server)
    client.create_bucket(Bucket="models")
    for path in tiny_dir.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "models", f"sd/tiny/{path.relative_to(tiny_dir)}")
    calls = []
    client.meta.events.register("before-call.s3.GetObject", lambda **kw: calls.append(1))
    local = models.resolve_model_dir("s3://models/sd/tiny", tmp_path, s3_client=client)
    assert _digest(local) == _digest(tiny_dir)
    first = len(calls)
    assert first >= 3
    assert models.resolve_model_dir("s3://models/sd/tiny", tmp_path, s3_client=client) == local
    assert len(calls) == first  # cached: no second download
    unet = models.load_unet(local, torch.device("cpu"), torch.float32)
    assert unet.config.block_out_channels == (32, 64, 64, 64) or list(unet.config.block_out_channels) == [
        32,
        64,
        64,
        64,
    ]


def test_s3_empty_prefix_is_an_error(tmp_path, s3_server):
    import boto3

    client = boto3.client("s3", **s3_server)
    client.create_bucket(Bucket="empty")
    with pytest.raises(ValueError, match="no objects under s3://empty/nothing/"):
        models.resolve_model_dir("s3://empty/nothing", tmp_path, s3_client=client)
