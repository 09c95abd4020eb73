"""Find, fetch and load diffusers-format model directories.

One path for every model: a URI resolves to a local diffusers directory
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``), then each deployment loads the parts it needs from disk.

- ``/path/to/model`` or ``file:///path``: used in place.
- ``s3://bucket/prefix``: downloaded once with boto3 into the local cache, keyed by the listing's ETags and
  sizes (new contents at the same prefix are fetched again).
- ``/path/model.safetensors``, ``file://…`` or ``s3://bucket/key.safetensors``: a single-file checkpoint in
  the original SD 1.x / SDXL layout, converted once into a diffusers directory in the cache, keyed by the
  file's content (its sha256, or its S3 ETag and size), never by the URI (``single_file.py``). Pickle
  checkpoints (``.ckpt`` ...) are refused.
- ``builtin:tiny-sd`` (``builtin:tiny-sd-inpaint``: its 9-channel inpainting variant), and
  ``builtin:tiny-sdxl`` / ``builtin:tiny-sdxl-inpaint`` (SDXL's architecture): built from their
  config and seed into the local cache.

SDXL directories (``model_index.json`` names ``StableDiffusionXLPipeline``) also have
``text_encoder_2/`` and ``tokenizer_2/``.

Nothing here talks to a model hub: every ``from_pretrained`` call is given a
local directory and ``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from .builtin import BUILTIN_MODELS, BUILTIN_PREFIX, BUILTIN_SEED, builtin_name, write_builtin
from .single_file import CONVERTER_VERSION, SINGLE_FILE_SUFFIX, convert_single_file, is_single_file, refuse_pickle

# Belt and braces: a library that falls back to the hub must fail, not download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")  # StableDiffusionXL*Pipeline's second text encoder
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
_COMPLETE_MARKER = ".lorafleet-complete"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORAFLEET_CACHE_DIR", Path.home() / ".cache" / "lorafleet"))


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"``: float32 on the CPU (half precision is slow and inexact there), float16 on CUDA."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got {dtype!r}")
    return DTYPES[dtype]


def model_display_name(uri: str) -> str:
    """The name clients use for a model URI: ``builtin:tiny-sd`` -> ``tiny-sd``, ``s3://m/sd15.safetensors``
    -> ``sd15``."""
    if uri.startswith(BUILTIN_PREFIX):
        return builtin_name(uri)
    name = Path(uri.rstrip("/").removeprefix("file://")).name
    if is_single_file(name):
        name = name[: -len(SINGLE_FILE_SUFFIX)]
    return name or uri


def _builtin_fingerprint(name: str) -> str:
    import diffusers
    import transformers

    blob = json.dumps(
        [BUILTIN_MODELS[name], BUILTIN_SEED, diffusers.__version__, transformers.__version__, torch.__version__],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_model_dir(uri: str, cache_dir: str | Path | None = None, s3_client: Any = None) -> Path:
    """Return a local diffusers directory for ``uri``, fetching or building it once.

    Several replicas on one node may resolve the same URI at once: a file lock
    serialises them and the directory appears by atomic rename, complete.

    >>> resolve_model_dir("builtin:tiny-sd")          # doctest: +SKIP
    PosixPath('/root/.cache/lorafleet/models/builtin/tiny-sd-3f2a...')
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if uri.startswith(BUILTIN_PREFIX):
        name = builtin_name(uri)
        target = cache / "models" / "builtin" / f"{name}-{_builtin_fingerprint(name)}"
        return _materialise(target, lambda staging: write_builtin(uri, staging))
    refuse_pickle(uri)
    if uri.startswith("s3://"):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"model URI {uri!r} has no bucket; expected s3://bucket/prefix")
        prefix = prefix.strip("/")
        client = s3_client if s3_client is not None else _default_s3_client()
        if is_single_file(prefix):
            return _resolve_s3_file(uri, bucket, prefix, cache, client)
        objects = _list_s3(client, bucket, prefix)
        # The listing is the cache key: any new, changed or removed object gives a new directory.
        digest = hashlib.sha256(json.dumps([(o.rel, o.etag, o.size) for o in objects]).encode()).hexdigest()[:12]
        target = cache / "models" / "s3" / bucket / f"{prefix.replace('/', '_') or 'root'}-{digest}"
        return _materialise(target, lambda staging: _download_s3(client, bucket, objects, staging))
    path = Path(uri.removeprefix("file://")).expanduser()
    if is_single_file(str(path)):
        if not path.is_file():
            raise ValueError(f"model.uri {uri!r}: no such file")
        target = _single_file_target(cache, path.name, f"sha256:{_content_sha256(path, cache)}")
        return _materialise(target, lambda staging: convert_single_file(path, staging, where=repr(uri)))
    if path.is_file():
        raise ValueError(f"model.uri {uri!r} is a file but not {SINGLE_FILE_SUFFIX} (a checkpoint) nor a directory")
    check_model_dir(path)
    return path


def _content_sha256(path: Path, cache: Path) -> str:
    """The sha256 of a local checkpoint, remembered per (path, device, inode, size, mtime_ns).

    Hashing a 7 GB SDXL file takes seconds, and every replica resolves it at start; a write to the file
    changes its mtime (and usually its size), so a stale memo is never used. The memo is one small JSON
    file per path, replaced atomically, so concurrent replicas at worst hash twice.
    """
    st = path.stat()
    stamp = [str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
    name = hashlib.sha256(stamp[0].encode()).hexdigest()[:24]
    memo = cache / "models" / "sha256-memo" / f"{name}.json"
    try:
        saved = json.loads(memo.read_text())
        if saved.get("stamp") == stamp:
            return saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = _file_sha256(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".digest.", dir=memo.parent)
    with os.fdopen(fd, "w") as f:
        json.dump({"stamp": stamp, "sha256": digest}, f)
    os.replace(tmp, memo)
    return digest


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _single_file_target(cache: Path, filename: str, content: str) -> Path:
    """The cache directory of a converted checkpoint: its content (``sha256:…`` or ``s3-etag:…:size``) and the
    converter's version, never its URI."""
    import diffusers
    import transformers

    blob = json.dumps([content, CONVERTER_VERSION, diffusers.__version__, transformers.__version__])
    stem = filename[: -len(SINGLE_FILE_SUFFIX)] or "model"
    return cache / "models" / "single-file" / f"{stem}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _resolve_s3_file(uri: str, bucket: str, key: str, cache: Path, client: Any) -> Path:
    """One HEAD per resolve; the download and conversion happen once per ETag and size."""
    head = _head_s3(client, uri, bucket, key)
    target = _single_file_target(cache, key.rpartition("/")[2], f"s3-etag:{head['ETag']}:{head['ContentLength']}")

    def write(out: Path) -> None:
        local = out.parent / "checkpoint.safetensors"  # in _materialise's staging directory, removed after
        client.download_file(bucket, key, str(local))
        now = _head_s3(client, uri, bucket, key)
        if local.stat().st_size != head["ContentLength"] or now["ETag"] != head["ETag"]:
            raise ValueError(f"model.uri {uri!r} changed while it was being downloaded; start again")
        convert_single_file(local, out, where=repr(uri))

    return _materialise(target, write)


def _head_s3(client: Any, uri: str, bucket: str, key: str) -> dict:
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        raise ValueError(f"model.uri {uri!r}: {e}") from e


def check_model_dir(path: Path) -> None:
    """Raise a ``ValueError`` naming what is missing if ``path`` is not a diffusers model directory."""
    if not path.is_dir():
        raise ValueError(f"model directory {str(path)!r} does not exist")
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{str(path)!r} is not a diffusers model directory: model_index.json is missing")
    parts = REQUIRED_PARTS
    if json.loads((path / "model_index.json").read_text()).get("_class_name") in SDXL_PIPELINES:
        parts += SDXL_PARTS
    missing = [part for part in parts if not (path / part).is_dir()]
    if missing:
        raise ValueError(f"model directory {str(path)!r} lacks {missing}")


def _materialise(target: Path, write) -> Path:
    if (target / _COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _COMPLETE_MARKER).exists():  # another process finished while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            out = staging / "model"
            write(out)
            check_model_dir(out)
            (out / _COMPLETE_MARKER).touch()
            if target.exists():
                shutil.rmtree(target)
            out.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _default_s3_client() -> Any:
    import boto3

    # Endpoint, region and credentials come from the standard AWS chain
    # (AWS_ENDPOINT_URL for MinIO or any S3-compatible store).
    return boto3.client("s3")


@dataclass(frozen=True)
class _S3Object:
    key: str
    rel: str  # the path inside the model directory
    etag: str
    size: int


def _list_s3(client: Any, bucket: str, prefix: str) -> list[_S3Object]:
    """Every object under ``s3://bucket/prefix/``, sorted (one LIST call per 1,000 objects)."""
    key_prefix = f"{prefix}/" if prefix else ""
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(key_prefix) :]
            if not rel or rel.endswith("/"):
                continue
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise ValueError(f"S3 key {obj['Key']!r} escapes the model directory")
            objects.append(_S3Object(obj["Key"], rel, obj["ETag"], obj["Size"]))
    if not objects:
        raise ValueError(f"no objects under s3://{bucket}/{key_prefix}")
    return sorted(objects, key=lambda o: o.rel)


def _download_s3(client: Any, bucket: str, objects: list[_S3Object], out: Path) -> None:
    """Copy the listed objects into ``out``, keeping the layout."""
    out.mkdir(parents=True, exist_ok=True)
    for obj in objects:
        dest = out / obj.rel
        if not dest.resolve().is_relative_to(out.resolve()):
            raise ValueError(f"S3 key {obj.key!r} escapes the model directory")
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, obj.key, str(dest))


MODEL_KINDS = ("sd1", "sdxl")


@dataclass(frozen=True)
class ModelInfo:
    """What every stage needs to know about the model, without loading weights."""

    uri: str
    name: str
    directory: Path
    scheduler_class: str
    scheduler_config: dict
    vae_scale_factor: int
    latent_channels: int  # the VAE's latents (4 for SD)
    unet_in_channels: int  # 4, or 9 for an inpainting UNet (latents, mask, masked-image latents)
    max_prompt_tokens: int
    default_side: int  # native resolution: the UNet's sample_size x the VAE's scale factor
    kind: str = "sd1"  # "sd1" (SD 1.x / 2.x: one text encoder) or "sdxl" (two encoders, micro-conditioning)
    # SDXL only: UNet "text_time" conditioning (pooled text embeds + 6 time ids per row).
    addition_time_embed_dim: int = 0
    pooled_dim: int = 0  # text_encoder_2's projection_dim
    force_zeros_for_empty_prompt: bool = False  # an empty negative prompt is zeros, not encoded ""

    @property
    def sdxl(self) -> bool:
        return self.kind == "sdxl"

    @property
    def inpainting(self) -> bool:
        return self.unet_in_channels != self.latent_channels

    @property
    def family(self) -> str:
        """What clients see: ``"sd1"``, ``"sdxl"``, ``"sd1-inpaint"``, ``"sdxl-inpaint"``."""
        return f"{self.kind}-inpaint" if self.inpainting else self.kind


def _config(directory: Path, part: str) -> dict:
    return json.loads((directory / part / "config.json").read_text())


def read_model_info(uri: str, directory: Path) -> ModelInfo:
    index = json.loads((directory / "model_index.json").read_text())
    scheduler_config = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
    vae_config = _config(directory, "vae")
    unet_config = _config(directory, "unet")
    te_config = _config(directory, "text_encoder")
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    sdxl = index.get("_class_name") in SDXL_PIPELINES or unet_config.get("addition_embed_type") == "text_time"
    xl: dict = {}
    if sdxl:
        if not (directory / "text_encoder_2").is_dir():
            raise ValueError(f"SDXL model {uri!r} has no text_encoder_2/")
        xl = {
            "kind": "sdxl",
            "addition_time_embed_dim": unet_config["addition_time_embed_dim"],
            "pooled_dim": _config(directory, "text_encoder_2")["projection_dim"],
            "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
        }
    return ModelInfo(
        uri=uri,
        name=model_display_name(uri),
        directory=directory,
        scheduler_class=index["scheduler"][1],
        scheduler_config=scheduler_config,
        vae_scale_factor=scale,
        latent_channels=vae_config.get("latent_channels", 4),
        unet_in_channels=unet_config["in_channels"],
        max_prompt_tokens=te_config.get("max_position_embeddings", 77),
        default_side=unet_config.get("sample_size", 64) * scale,
        **xl,
    )


def load_tokenizer(directory: Path, part: str = "tokenizer"):
    """``part``: ``"tokenizer"``, or SDXL's ``"tokenizer_2"``."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(directory / part), local_files_only=True)


def load_text_encoder(directory: Path, device: torch.device, dtype: torch.dtype, part: str = "text_encoder"):
    """``part``: ``"text_encoder"`` (``CLIPTextModel``), or SDXL's ``"text_encoder_2"``
    (``CLIPTextModelWithProjection``: its pooled output goes through the text projection)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
    model = cls.from_pretrained(str(directory / part), local_files_only=True, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def load_unet(directory: Path, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(str(directory / "unet"), local_files_only=True, torch_dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def load_vae(directory: Path, device: torch.device, dtype: torch.dtype):
    """The VAE; SD's VAE overflows in float16, so it stays float32 where its config says so."""
    from diffusers import AutoencoderKL

    config = json.loads((directory / "vae" / "config.json").read_text())
    if dtype == torch.float16 and config.get("force_upcast", True):
        dtype = torch.float32
    model = AutoencoderKL.from_pretrained(str(directory / "vae"), local_files_only=True, torch_dtype=dtype)
    return model.to(device).eval().requires_grad_(False)
