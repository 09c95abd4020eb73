"""A folder of captioned images -> training pixels, checked in full before training starts.

Two ways to caption, as in 🤗 datasets' ``imagefolder`` and diffusers' examples::

    red/                            red/
      a.png   a.txt                   metadata.jsonl   {"file_name": "a.png", "text": "a red square"}
      b.jpg   b.txt                   a.png  b.jpg

``metadata.jsonl`` (one JSON object per line, ``file_name`` relative to the
folder, caption in ``text`` or ``caption``) wins over a ``.txt`` file. Every
image is decoded, resized (shorter side to ``resolution``) and center-cropped
once, here, so an unreadable file or a missing caption is an error naming the
file before any training step — not a crash an hour in.

Which image a training step sees is a pure function of the seed and the
step (``sample_ids`` / ``CaptionedImages.index``): a resumed run and a run
spread over N workers draw exactly the samples an uninterrupted single-process
run draws.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .config import TrainingInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"
CAPTION_COLUMNS = ("text", "caption")
MAX_NAMED = 5  # files named in one error message


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one purpose (``derive_seed(0, "sample", 17)``), independent across purposes."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _named(paths: list, root: Path) -> str:
    names = [str(p.relative_to(root)) if isinstance(p, Path) and p.is_relative_to(root) else str(p) for p in paths]
    more = f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else ""
    return ", ".join(names[:MAX_NAMED]) + more


def _read_metadata(root: Path) -> dict[Path, str]:
    path = root / METADATA_FILE
    captions: dict[Path, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingInputError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise TrainingInputError(f'{where}: expected an object with "file_name" and "text"')
        column = next((c for c in CAPTION_COLUMNS if c in row), None)
        if column is None or not isinstance(row[column], str):
            raise TrainingInputError(f'{where}: {row["file_name"]!r} has no "text" (or "caption") string')
        image = (root / row["file_name"]).resolve()
        if not image.is_relative_to(root.resolve()):
            raise TrainingInputError(f"{where}: {row['file_name']!r} is outside {root}")
        if not image.is_file():
            raise TrainingInputError(f"{where}: image {row['file_name']!r} does not exist")
        if image in captions:
            raise TrainingInputError(f"{where}: {row['file_name']!r} is listed twice")
        captions[image] = row[column].strip()
    return captions


def scan_folder(data_dir: str | Path) -> list[Example]:
    """Every image under ``data_dir`` (recursively, sorted) with its caption; raises ``TrainingInputError``."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise TrainingInputError(f"data folder {str(root)!r} does not exist or is not a directory")
    metadata = _read_metadata(root) if (root / METADATA_FILE).is_file() else {}
    images = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not images:
        raise TrainingInputError(f"data folder {str(root)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    examples, missing, empty = [], [], []
    for image in images:
        caption = metadata.get(image.resolve())
        if caption is None:
            text_file = image.with_suffix(".txt")
            if not text_file.is_file():
                missing.append(image)
                continue
            caption = text_file.read_text(encoding="utf-8").strip()
        if not caption:
            empty.append(image)
            continue
        examples.append(Example(image, caption))
    if missing:
        raise TrainingInputError(
            f"{len(missing)} images in {str(root)!r} have no caption (no .txt beside them, not in {METADATA_FILE}): "
            f"{_named(missing, root)}"
        )
    if empty:
        raise TrainingInputError(f"{len(empty)} images in {str(root)!r} have an empty caption: {_named(empty, root)}")
    return examples


Size = tuple[int, int]  # (height, width) in pixels, diffusers' order


@dataclass(frozen=True)
class CropGeometry:
    """Where a training image came from, as SDXL's size and crop conditioning describes it.

    ``original_size`` is the decoded image's ``(height, width)``; ``crop_top_left`` the
    ``(top, left)`` corner of the square crop in the resized image, as diffusers'
    ``train_text_to_image_lora_sdxl.py`` records them.
    """

    original_size: Size
    crop_top_left: tuple[int, int]


def load_image_and_geometry(path: Path, resolution: int) -> tuple[torch.Tensor, CropGeometry]:
    """``load_image``, with the original size and the crop's corner (SDXL's micro-conditioning)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    original = (image.height, image.width)
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = data.view(resolution, resolution, 3).permute(2, 0, 1).contiguous()  # [3, H, W]
    return pixels, CropGeometry(original, (top, left))


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Decode, resize the shorter side to ``resolution``, center-crop: uint8 ``[3, resolution, resolution]``."""
    return load_image_and_geometry(path, resolution)[0]


@dataclass(frozen=True)
class CaptionedImages:
    """The decoded training set; small enough to keep in memory as uint8 (512 px: 0.75 MiB an image)."""

    pixels: torch.Tensor  # [n, 3, resolution, resolution] uint8
    captions: tuple[str, ...]
    files: tuple[str, ...]  # paths relative to the data folder, for the record
    fingerprint: str  # sha256 over (file, file bytes' sha256, caption)
    geometry: tuple[CropGeometry, ...] = ()  # per image; SDXL's time ids (empty: not recorded)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def resolution(self) -> int:
        return self.pixels.shape[-1]

    def index(self, sample_id: int, seed: int) -> int:
        """The image a global sample id refers to: each epoch visits every image once, in a seeded order."""
        epoch, offset = divmod(sample_id, len(self))
        return _epoch_order(len(self), seed, epoch)[offset]


@lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
    return tuple(torch.randperm(n, generator=generator).tolist())


def sample_ids(
    step: int, rank: int, world_size: int, batch_size: int, accumulation: int = 1, micro: int = 0
) -> list[int]:
    """Global sample ids of one forward pass: pass ``micro`` of ``accumulation`` at ``step`` (0-based) on ``rank``.

    One stream of samples, cut in consecutive slices: worker-major, then pass, then batch. So
    N workers each accumulating A passes of b samples see exactly what one process does with
    N * A passes of b, and the gradient they average is the same sum.
    """
    start = ((step * world_size + rank) * accumulation + micro) * batch_size
    return list(range(start, start + batch_size))


def load_dataset(data_dir: str | Path, resolution: int) -> CaptionedImages:
    """Scan and decode the whole folder; every unreadable image is named in one ``TrainingInputError``."""
    root = Path(data_dir).expanduser()
    examples = scan_folder(root)
    pixels, geometry, bad = [], [], []
    digest = hashlib.sha256()
    for example in examples:
        try:
            image, crop = load_image_and_geometry(example.path, resolution)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's decode errors
            bad.append(f"{example.path.relative_to(root)} ({type(e).__name__}: {e})")
            continue
        pixels.append(image)
        geometry.append(crop)
        rel = str(example.path.relative_to(root))
        digest.update(
            json.dumps([rel, hashlib.sha256(example.path.read_bytes()).hexdigest(), example.caption]).encode()
        )
    if bad:
        more = f" and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
        raise TrainingInputError(
            f"{len(bad)} images in {str(root)!r} cannot be read: {'; '.join(bad[:MAX_NAMED])}{more}"
        )
    return CaptionedImages(
        pixels=torch.stack(pixels),
        captions=tuple(e.caption for e in examples),
        files=tuple(str(e.path.relative_to(root)) for e in examples),
        fingerprint=digest.hexdigest(),
        geometry=tuple(geometry),
    )
