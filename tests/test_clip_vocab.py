"""The CLIP vocabulary derived offline equals the real one (known ids from OpenAI's tokenizer)."""

import hashlib
import inspect
import shutil
import subprocess
import sys
import zipfile

import pytest

from deployments.engine import clip_vocab
from deployments.engine.clip_vocab import CLIP_VOCAB_SIZE, bpe_file, build_clip_tokenizer, clip_vocab_and_merges

from conftest import ROOT


def test_vocab_size_and_specials():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == CLIP_VOCAB_SIZE == 49_408
    assert len(merges) == 48_894
    assert vocab["<|startoftext|>"] == 49_406
    assert vocab["<|endoftext|>"] == 49_407
    assert merges[0] == ("i", "n")


@pytest.mark.parametrize(
    "text, ids",
    [
        # Ids as OpenAI's CLIP tokenizer (and SD's tokenizer/vocab.json) gives them.
        ("a photograph of an astronaut riding a horse", [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]),
        ("a cat", [49406, 320, 2368, 49407]),
        ("", [49406, 49407]),
    ],
)
def test_known_token_ids(text, ids):
    assert build_clip_tokenizer()(text).input_ids == ids


def test_padding_to_context():
    ids = build_clip_tokenizer()("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[-1] == 49407


# ---- the vendored vocabulary file: package data, with its notice; open_clip is not needed ------------------

BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # OpenAI CLIP's, as open_clip ships it


def test_the_bpe_file_is_vendored_with_its_mit_notices():
    path = bpe_file()
    assert path == ROOT / "deployments" / "engine" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == BPE_SHA256
    notice = (path.parent / "LICENSE").read_text()
    assert BPE_SHA256 in notice and notice.count("Permission is hereby granted, free of charge") == 2
    assert "Copyright (c) 2021 OpenAI" in notice and "Copyright (c) 2012-2021 Gabriel Ilharco" in notice
    assert "importlib" not in inspect.getsource(clip_vocab)  # no lookup of an installed open_clip any more


# In a child interpreter: open_clip cannot be found or imported; the tokenizer comes from `where`.
NO_OPEN_CLIP = """
import importlib.abc, importlib.util, sys
class NoOpenClip(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "open_clip":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoOpenClip())
sys.path.insert(0, sys.argv[1])
try:
    import open_clip
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("open_clip imported")
from deployments.engine import clip_vocab
assert clip_vocab.__file__.startswith(sys.argv[1]), clip_vocab.__file__
ids = clip_vocab.build_clip_tokenizer()("a photograph of an astronaut riding a horse").input_ids
print(clip_vocab.bpe_file(), ids)
"""


def test_the_built_wheel_carries_the_vocabulary_and_serves_the_tokenizer_without_open_clip(tmp_path):
    """`pip install .` alone: the wheel setuptools builds from pyproject.toml holds the vocabulary and its
    notice, and the tokenizer loads from the unpacked wheel with open_clip made unimportable."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    src.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(ROOT / name, src / name)
    for package in ["graph", "deployments", "lora_registry", "loadtest", "training"]:
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    build = f"from setuptools import build_meta; print(build_meta.build_wheel({str(tmp_path / 'dist')!r}))"
    out = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = tmp_path / "dist" / out.stdout.split()[-1]
    packaged = "deployments/engine/clip_bpe/bpe_simple_vocab_16e6.txt.gz"
    with zipfile.ZipFile(wheel) as zf:
        assert {packaged, "deployments/engine/clip_bpe/LICENSE"} <= set(zf.namelist())
        assert hashlib.sha256(zf.read(packaged)).hexdigest() == BPE_SHA256
        zf.extractall(tmp_path / "site")
    site = str(tmp_path / "site")
    run = subprocess.run(
        [sys.executable, "-c", NO_OPEN_CLIP, site], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    path, ids = run.stdout.strip().split(" ", 1)
    assert path == f"{site}/deployments/engine/clip_bpe/bpe_simple_vocab_16e6.txt.gz"
    assert ids == str([49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407])
