"""The training data path without a model: folder scanning and its errors, decoding, the sample stream, config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from training import TrainingInputError
from training.config import TrainingConfig
from training.data import CaptionedImages, load_dataset, load_image, sample_ids, scan_folder


def image(path: Path, colour=(255, 0, 0), size=(16, 16), caption: str | None = "a red square") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def _empty(root: Path) -> None:
    root.mkdir()
    (root / "notes.md").write_text("no pictures here")


def _uncaptioned(root: Path) -> None:
    image(root / "a.png")
    image(root / "b.png", caption=None)


def _empty_caption(root: Path) -> None:
    image(root / "a.png", caption="  \n")


def _metadata_missing_file(root: Path) -> None:
    image(root / "a.png", caption=None)
    rows = [{"file_name": "a.png", "text": "red"}, {"file_name": "gone.png", "text": "blue"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def _metadata_bad_json(root: Path) -> None:
    image(root / "a.png", caption=None)
    (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "red"}\n{"file_name": "a.png", \n')


def _metadata_no_text(root: Path) -> None:
    image(root / "a.png", caption=None)
    (root / "metadata.jsonl").write_text('{"file_name": "a.png", "title": "red"}\n')


def _metadata_outside(root: Path) -> None:
    image(root.parent / "elsewhere.png", caption=None)
    image(root / "a.png")
    (root / "metadata.jsonl").write_text('{"file_name": "../elsewhere.png", "text": "red"}\n')


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda root: None, ["does not exist"]),
        (_empty, ["has no images", ".png"]),
        (_uncaptioned, ["1 images", "no caption", "b.png"]),
        (_empty_caption, ["empty caption", "a.png"]),
        (_metadata_missing_file, ["metadata.jsonl, line 2", "'gone.png' does not exist"]),
        (_metadata_bad_json, ["metadata.jsonl, line 2", "not valid JSON"]),
        (_metadata_no_text, ["line 1", "'a.png' has no \"text\""]),
        (_metadata_outside, ["'../elsewhere.png' is outside"]),
    ],
    ids=["missing-folder", "empty", "uncaptioned", "empty-caption", "meta-missing", "meta-json", "meta-text", "escape"],
)
def test_bad_folders_are_refused_naming_the_problem(tmp_path, build, expected):
    root = tmp_path / "data"
    build(root)
    with pytest.raises(TrainingInputError) as e:
        scan_folder(root)
    for fragment in expected:
        assert fragment in str(e.value)


def test_unreadable_images_are_all_named_before_anything_trains(tmp_path):
    root = tmp_path / "data"
    image(root / "good.png")
    (root / "garbage.png").write_bytes(b"this is not a png")
    (root / "garbage.txt").write_text("broken")
    whole = (root / "good.png").read_bytes()
    (root / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "truncated.txt").write_text("broken")
    with pytest.raises(TrainingInputError) as e:
        load_dataset(root, 16)
    message = str(e.value)
    assert message.startswith("2 images in")
    assert "garbage.png (UnidentifiedImageError" in message and "truncated.png" in message
    assert "good.png" not in message


def test_captions_from_txt_and_metadata_recursive_sorted_hidden_ignored(tmp_path):
    root = tmp_path / "data"
    image(root / "b.png", caption="from txt")
    image(root / "sub" / "a.jpg", caption="txt loses to metadata")
    image(root / ".cache" / "x.png", caption="hidden")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/a.jpg", "caption": "from metadata"}) + "\n")
    examples = scan_folder(root)
    assert [(str(e.path.relative_to(root)), e.caption) for e in examples] == [
        ("b.png", "from txt"),
        ("sub/a.jpg", "from metadata"),
    ]


def test_load_image_resizes_the_shorter_side_and_center_crops(tmp_path):
    # 32x16: red | green | green | blue columns of 8 px; at 16 px the shorter side stays, the centre 16 columns stay.
    img = Image.new("RGB", (32, 16), (0, 255, 0))
    img.paste((255, 0, 0), (0, 0, 8, 16))
    img.paste((0, 0, 255), (24, 0, 32, 16))
    img.save(tmp_path / "wide.png")
    pixels = load_image(tmp_path / "wide.png", 16)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.uint8
    assert torch.equal(pixels, torch.tensor([0, 255, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16))
    # Upscaling: a 4x4 flat image becomes 16x16 of the same colour.
    Image.new("RGB", (4, 4), (10, 20, 30)).save(tmp_path / "small.png")
    assert load_image(tmp_path / "small.png", 16)[:, 7, 7].tolist() == [10, 20, 30]


@pytest.mark.parametrize(
    "step, rank, world, batch, accumulation, micro, expected",
    [
        (0, 0, 1, 2, 1, 0, [0, 1]),
        (3, 0, 1, 2, 1, 0, [6, 7]),
        (3, 1, 2, 1, 1, 0, [7]),  # worker 1 of 2, batch 1: the second half of single-process step 3 (batch 2)
        (3, 0, 1, 1, 2, 1, [7]),  # one process, 2 passes of 1: pass 1 is what worker 1 sees
        (2, 1, 2, 3, 2, 1, [33, 34, 35]),  # ((2*2 + 1)*2 + 1)*3
    ],
)
def test_sample_ids_cut_one_stream(step, rank, world, batch, accumulation, micro, expected):
    assert sample_ids(step, rank, world, batch, accumulation, micro) == expected


def test_each_epoch_visits_every_image_once_in_a_seeded_order():
    data = CaptionedImages(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), ("c",) * 5, ("f",) * 5, "fp")
    epochs = [[data.index(i, seed=7) for i in range(e * 5, e * 5 + 5)] for e in range(3)]
    assert all(sorted(order) == [0, 1, 2, 3, 4] for order in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # reshuffled
    assert epochs == [[data.index(i, seed=7) for i in range(e * 5, e * 5 + 5)] for e in range(3)]  # reproducible
    assert [data.index(i, seed=8) for i in range(15)] != sum(epochs, [])


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"resolution": 60}, "resolution: Value error, resolution must be a multiple of 8"),
        ({"rank": 0}, "rank: Input should be greater than or equal to 1"),
        ({"target_modules": ()}, "target_modules: "),
        ({"target_modules": ("to_q", " to_k")}, "module names must be non-empty path suffixes"),
        ({"learning_rate": 0}, "learning_rate: Input should be greater than 0"),
    ],
)
def test_config_errors_name_the_field(fields, expected):
    from pydantic import ValidationError

    from training.config import config_error

    with pytest.raises(ValidationError) as e:
        TrainingConfig(data_dir="d", output_dir="o", **fields)
    assert expected in str(config_error(e.value))


def test_config_defaults():
    config = TrainingConfig(data_dir="d", output_dir="o", rank=8)
    assert (config.lora_alpha, config.world_size, config.target_modules) == (
        8.0,
        1,
        ("to_q", "to_k", "to_v", "to_out.0"),
    )
    assert TrainingConfig(data_dir="d", output_dir="o", rank=8, alpha=4, num_workers=3).lora_alpha == 4.0
    assert TrainingConfig(data_dir="d", output_dir="o", num_workers=3).world_size == 3
