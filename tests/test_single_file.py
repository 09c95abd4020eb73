"""Single-file checkpoints: the builtin models exported in the original (LDM/SGM) key layout, loaded back
through ``resolve_model_dir`` (local and S3), converted once and cached by content; pickle files refused."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deployments.engine import models
from deployments.engine import single_file as sf

from engine_helpers import Engine, SDXLEngine

CPU = torch.device("cpu")
KINDS = {"tiny-sd": "sd1", "tiny-sd-inpaint": "sd1", "tiny-sdxl": "sdxl", "tiny-sdxl-inpaint": "sdxl"}


def _weights(directory, part):
    out = {}
    for path in sorted((directory / part).glob("*.safetensors")):
        out |= load_file(str(path))
    return out


def _parts(uri, d):
    """As conftest's ``tiny`` / ``tiny_sdxl``: every part loaded through models.py's loaders."""
    parts = {
        "info": models.read_model_info(uri, d),
        "tokenizer": models.load_tokenizer(d),
        "text_encoder": models.load_text_encoder(d, CPU, torch.float32),
        "unet": models.load_unet(d, CPU, torch.float32),
        "vae": models.load_vae(d, CPU, torch.float32),
    }
    if (d / "text_encoder_2").is_dir():
        parts["tokenizer_2"] = models.load_tokenizer(d, "tokenizer_2")
        parts["text_encoder_2"] = models.load_text_encoder(d, CPU, torch.float32, "text_encoder_2")
    return parts


@pytest.fixture(scope="module")
def builtin_dir(cache_dir):
    return lambda name: models.resolve_model_dir(f"builtin:{name}", cache_dir)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, builtin_dir):
    """``name -> path`` of the builtin exported as one .safetensors (once per module)."""
    root = tmp_path_factory.mktemp("single-files")
    done = {}

    def export(name):
        if name not in done:
            done[name] = sf.export_single_file(builtin_dir(name), root / f"{name}.safetensors")
        return done[name]

    return export


@pytest.fixture(scope="module")
def converted(tmp_path_factory, exported):
    """``name -> diffusers dir`` resolved from the exported file, in a cache of this module's own."""
    cache = tmp_path_factory.mktemp("single-file-cache")
    return lambda name: models.resolve_model_dir(str(exported(name)), cache)


def _keys(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# -- the exporter writes the real layout ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd-inpaint", "tiny-sdxl"])
def test_export_uses_the_original_key_layout(exported, name):
    keys = _keys(exported(name))
    kind = KINDS[name]
    prefixes = (sf.UNET_PREFIX, sf.VAE_PREFIX, *sf.TEXT_ENCODER_PREFIXES[kind].values())
    assert all(k.startswith(prefixes) for k in keys)
    # diffusers' names never appear in the UNet and VAE of an original checkpoint
    diffusers_words = ("down_blocks", "up_blocks", "mid_block", "resnets", "conv_shortcut", "time_embedding")
    model_keys = [k for k in keys if k.startswith((sf.UNET_PREFIX, sf.VAE_PREFIX))]
    assert [k for k in model_keys if any(w in k for w in diffusers_words)] == []
    assert [k for k in keys if k.startswith(sf.VAE_PREFIX) and ("to_q" in k or "group_norm" in k)] == []
    assert keys["model.diffusion_model.input_blocks.0.0.weight"][1] == (9 if "inpaint" in name else 4)
    assert keys["first_stage_model.encoder.mid.attn_1.q.weight"] == (64, 64, 1, 1)  # a 1x1 conv, as in LDM
    assert keys["first_stage_model.decoder.up.3.block.0.conv1.weight"] == (64, 64, 3, 3)  # reversed up levels
    if kind == "sd1":
        assert keys["cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight"] == (64, 64)
        assert keys["model.diffusion_model.output_blocks.1.1.conv.weight"] == (64, 64, 3, 3)  # 1 layer/level, no attn
    else:
        assert keys["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] == (64,)
        assert keys["conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"] == (3 * 96, 96)
        assert keys["conditioner.embedders.1.model.text_projection"] == (96, 96)
        assert keys["conditioner.embedders.1.model.positional_embedding"] == (77, 96)
        assert keys["model.diffusion_model.label_emb.0.0.weight"] == (32 * 4, 96 + 6 * 16)
        assert keys["model.diffusion_model.output_blocks.2.2.conv.weight"] == (64, 64, 3, 3)  # after attention


# Real SD 1.5 and SDXL base names and shapes (as in v1-5-pruned-emaonly / sd_xl_base_1.0.safetensors).
REAL_KEYS = {
    "sd15": {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    },
    "sdxl-base": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    },
}


@pytest.mark.parametrize("name, kind", [("sd15", "sd1"), ("sdxl-base", "sdxl")])
def test_shipped_configs_match_real_checkpoints(name, kind, tmp_path):
    """A full-size file's names and shapes (built on meta: no weights) select the shipped config; extra
    entries of real files (EMA, schedule buffers, position ids) are ignored; 9 channels select inpainting."""
    expected = sf._expected_shapes(sf.CONFIG_DIR / name, kind)
    assert REAL_KEYS[name].items() <= expected.items()
    extras = {"model_ema.decay": (), "alphas_cumprod": (1000,), f"{sf.TEXT_ENCODER_PREFIXES[kind]['text_encoder']}"
              "text_model.embeddings.position_ids": (1, 77)}  # fmt: skip
    arch, config_dir = sf.match_architecture(expected | extras, torch.float16, tmp_path / "a", "'real.safetensors'")
    assert (arch.name, arch.kind, arch.in_channels, arch.dtype) == (name, kind, 4, torch.float16)
    assert (config_dir / "tokenizer" / "vocab.json").is_file()
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    inpaint = expected | {conv_in: (320, 9, 3, 3)}
    arch, config_dir = sf.match_architecture(inpaint, torch.float16, tmp_path / "b", "'real-inpainting.safetensors'")
    index = json.loads((config_dir / "model_index.json").read_text())
    assert arch.in_channels == 9 and index["_class_name"] == sf._INPAINT_PIPELINES[kind]
    if kind == "sdxl":
        assert models.load_tokenizer(config_dir, "tokenizer_2").pad_token == "!"  # SDXL's tokenizer_2 pads with "!"
    assert models.load_tokenizer(config_dir).pad_token == "<|endoftext|>"


# -- loading back ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KINDS))
def test_loaded_weights_equal_the_original_exactly(converted, builtin_dir, name):
    d, original = converted(name), builtin_dir(name)
    models.check_model_dir(d)
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if KINDS[name] == "sdxl" else [])
    for part in parts:
        a, b = _weights(original, part), _weights(d, part)
        assert a.keys() == b.keys(), part
        assert [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])] == [], part
    for part in ["scheduler", "tokenizer", "tokenizer_2"]:
        if (original / part).is_dir():
            for path in (original / part).iterdir():
                assert (d / part / path.name).read_bytes() == path.read_bytes(), (part, path.name)
    info, expected = models.read_model_info("m", d), models.read_model_info("m", original)
    assert info.family == expected.family == KINDS[name] + ("-inpaint" if "inpaint" in name else "")
    assert (info.default_side, info.scheduler_class, info.scheduler_config) == (
        expected.default_side,
        expected.scheduler_class,
        expected.scheduler_config,
    )
    index = json.loads((d / "model_index.json").read_text())
    assert "_lorafleet_builtin" not in index
    assert index["_lorafleet_single_file"]["architecture"] == name.removesuffix("-inpaint")


def test_served_images_equal_the_source_directory(converted, tiny):
    engine = Engine(_parts("tiny-sd", converted("tiny-sd")))
    reference = Engine(tiny)
    kwargs = dict(size=64, steps=3, seed=7)
    got = engine.run([engine.request("a red fox in the snow", "blurry", **kwargs)])
    want = reference.run([reference.request("a red fox in the snow", "blurry", **kwargs)])
    assert got.std() > 0.01 and torch.equal(got, want)


def test_served_sdxl_latents_equal_the_source_directory(converted, tiny_sdxl):
    engine = SDXLEngine(_parts("tiny-sdxl", converted("tiny-sdxl")))
    reference = SDXLEngine(tiny_sdxl)
    kwargs = dict(size=64, steps=3, seed=11)
    got = engine.run_latents([engine.request("a lighthouse at dusk", **kwargs)])
    want = reference.run_latents([reference.request("a lighthouse at dusk", **kwargs)])
    assert got.std() > 0.01 and torch.equal(got, want)


# -- converted once, keyed by content -------------------------------------------------------------------------------


@pytest.fixture
def conversions(monkeypatch):
    """Counts conversions (the real one still runs)."""
    calls = []
    real = models.convert_single_file

    def counting(path, out, where=None):
        calls.append(where)
        return real(path, out, where=where)

    monkeypatch.setattr(models, "convert_single_file", counting)
    return calls


def test_converted_once_and_keyed_by_content_not_path(exported, tmp_path, conversions):
    source = tmp_path / "models" / "tiny-sd.safetensors"
    source.parent.mkdir()
    source.write_bytes(exported("tiny-sd").read_bytes())
    first = models.resolve_model_dir(str(source), tmp_path / "cache")
    assert len(conversions) == 1
    assert models.resolve_model_dir(f"file://{source}", tmp_path / "cache") == first
    copy = tmp_path / "elsewhere" / "tiny-sd.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(source.read_bytes())
    assert models.resolve_model_dir(str(copy), tmp_path / "cache") == first  # same bytes, same entry
    assert len(conversions) == 1
    assert first.parent == tmp_path / "cache" / "models" / "single-file"

    # New contents at the same path: a new entry holding the new weights.
    state_dict = load_file(str(source))
    state_dict["model.diffusion_model.out.2.bias"] = state_dict["model.diffusion_model.out.2.bias"] + 1.0
    save_file(state_dict, str(source))
    second = models.resolve_model_dir(str(source), tmp_path / "cache")
    assert second != first and len(conversions) == 2
    assert torch.equal(_weights(second, "unet")["conv_out.bias"], _weights(first, "unet")["conv_out.bias"] + 1.0)


def test_cli_exports_a_single_file(tmp_path, exported):
    from graph.cli import main

    assert main(["export-model", "builtin:tiny-sdxl", str(tmp_path), "--single-file"]) == 0
    path = tmp_path / "tiny-sdxl.safetensors"
    got, want = load_file(str(path)), load_file(str(exported("tiny-sdxl")))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert main(["export-model", "builtin:tiny-sd", str(tmp_path / "named.safetensors"), "--single-file"]) == 0
    assert (tmp_path / "named.safetensors").is_file()


def test_display_name_drops_the_suffix():
    assert models.model_display_name("s3://models/ckpt/dreamshaper_8.safetensors") == "dreamshaper_8"
    assert models.model_display_name("/m/sdxl.SAFETENSORS") == "sdxl"


# -- S3 ---------------------------------------------------------------------------------------------------------------


def _s3(s3_server, bucket):
    import boto3

    client = boto3.client("s3", **s3_server)
    client.create_bucket(Bucket=bucket)
    calls = {"GetObject": 0, "HeadObject": 0, "ListObjectsV2": 0}
    for op in calls:
        client.meta.events.register(f"before-call.s3.{op}", lambda op=op, **kw: calls.__setitem__(op, calls[op] + 1))
    return client, calls


def test_s3_single_file_is_converted_once_per_etag(exported, tmp_path, s3_server, builtin_dir):
    client, calls = _s3(s3_server, "checkpoints")
    client.upload_file(str(exported("tiny-sdxl")), "checkpoints", "xl/tiny-sdxl.safetensors")
    uri = "s3://checkpoints/xl/tiny-sdxl.safetensors"
    first = models.resolve_model_dir(uri, tmp_path, s3_client=client)
    assert calls["GetObject"] >= 1
    original = builtin_dir("tiny-sdxl")
    for part in ("unet", "text_encoder_2"):
        a, b = _weights(first, part), _weights(original, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    gets = calls["GetObject"]
    assert models.resolve_model_dir(uri, tmp_path, s3_client=client) == first
    assert calls["GetObject"] == gets  # cached: one HEAD, no download

    state_dict = load_file(str(exported("tiny-sdxl")))
    state_dict["model.diffusion_model.out.2.bias"] = state_dict["model.diffusion_model.out.2.bias"] * 2
    changed = tmp_path / "changed.safetensors"
    save_file(state_dict, str(changed))
    client.upload_file(str(changed), "checkpoints", "xl/tiny-sdxl.safetensors")
    second = models.resolve_model_dir(uri, tmp_path, s3_client=client)
    assert second != first and calls["GetObject"] > gets
    assert torch.equal(_weights(second, "unet")["conv_out.bias"], _weights(first, "unet")["conv_out.bias"] * 2)


def test_s3_directory_is_keyed_by_its_listing(tiny_dir, tmp_path, s3_server):
    client, calls = _s3(s3_server, "dirs")
    for path in tiny_dir.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "dirs", f"sd/tiny/{path.relative_to(tiny_dir)}")
    first = models.resolve_model_dir("s3://dirs/sd/tiny", tmp_path, s3_client=client)
    gets = calls["GetObject"]
    assert models.resolve_model_dir("s3://dirs/sd/tiny", tmp_path, s3_client=client) == first
    assert calls["GetObject"] == gets and calls["ListObjectsV2"] == 2  # one LIST per resolve, no download

    scheduler = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    body = json.dumps({**scheduler, "timestep_spacing": "trailing"}).encode()
    client.put_object(Bucket="dirs", Key="sd/tiny/scheduler/scheduler_config.json", Body=body)
    second = models.resolve_model_dir("s3://dirs/sd/tiny", tmp_path, s3_client=client)
    assert second != first
    assert json.loads((second / "scheduler" / "scheduler_config.json").read_text())["timestep_spacing"] == "trailing"
    assert json.loads((first / "scheduler" / "scheduler_config.json").read_text()) == scheduler  # untouched


# -- refusals -------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: proof that a refused checkpoint is never unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_checkpoints_are_refused_unread(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    checkpoint = tmp_path / f"model{suffix}"
    checkpoint.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    for uri in (str(checkpoint), f"file://{checkpoint}", f"s3://bucket/models/model{suffix}"):
        with pytest.raises(ValueError, match=r"^model\.uri .* is a pickle checkpoint .*never unpickles") as e:
            models.resolve_model_dir(uri, tmp_path / "cache")
        assert "\n" not in str(e.value)
    assert not marker.exists()


def _corrupt(exported, tmp_path, change):
    state_dict = load_file(str(exported("tiny-sd")))
    change(state_dict)
    path = tmp_path / "bad.safetensors"
    save_file(state_dict, str(path))
    return str(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda sd: sd.pop("first_stage_model.decoder.conv_out.weight"),
            r"1 tensors missing \(e\.g\. first_stage_model",
        ),
        (lambda sd: sd.__setitem__("model.diffusion_model.extra.weight", torch.zeros(1)), r"1 unexpected"),
        (
            lambda sd: sd.__setitem__("model.diffusion_model.out.2.bias", torch.zeros(5)),
            r"of other shapes \(e\.g\. model\.diffusion_model\.out\.2\.bias: \(5,\), expected \(4,\)\)",
        ),
        (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("model.")], r"has no model\.diffusion_model\.\* UNet"),
        (
            lambda sd: sd.__setitem__("model.diffusion_model.input_blocks.0.0.weight", torch.zeros(32, 8, 3, 3)),
            r"8 input channels",
        ),
        (lambda sd: sd.__setitem__("cond_stage_model.model.token_embedding.weight", torch.zeros(1)), r"SD 2\.x"),
    ],
)
def test_other_architectures_are_refused_with_what_differs(exported, tmp_path, change, message):
    with pytest.raises(ValueError, match=rf"^model\.uri: .*{message}"):
        models.resolve_model_dir(_corrupt(exported, tmp_path, change), tmp_path / "cache")
    entries = tmp_path / "cache" / "models" / "single-file"
    assert [p.name for p in entries.iterdir() if p.is_dir()] == []  # nothing cached, nothing half-written


def test_unreadable_or_missing_files(tmp_path):
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="is not a readable .safetensors file"):
        models.resolve_model_dir(str(fake), tmp_path / "cache")
    with pytest.raises(ValueError, match="no such file"):
        models.resolve_model_dir(str(tmp_path / "absent.safetensors"), tmp_path / "cache")
    other = tmp_path / "weights.onnx"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"is a file but not \.safetensors"):
        models.resolve_model_dir(str(other), tmp_path / "cache")


def test_half_precision_files_keep_their_dtype(exported, builtin_dir, tmp_path):
    """Downloaded checkpoints are mostly float16: the directory keeps it, and loads at the served dtype."""
    half = {k: v.half() for k, v in load_file(str(exported("tiny-sd"))).items()}
    path = tmp_path / "tiny-sd-fp16.safetensors"
    save_file(half, str(path))
    d = models.resolve_model_dir(str(path), tmp_path / "cache")
    assert json.loads((d / "model_index.json").read_text())["_lorafleet_single_file"]["dtype"] == "float16"
    for part in ("unet", "vae", "text_encoder"):
        got, original = _weights(d, part), _weights(builtin_dir("tiny-sd"), part)
        assert all(got[k].dtype == torch.float16 and torch.equal(got[k], original[k].half()) for k in original)
    unet = models.load_unet(d, CPU, torch.float32)
    assert unet.conv_in.weight.dtype == torch.float32


def test_a_local_checkpoint_is_hashed_once_until_it_changes(exported, tmp_path, monkeypatch):
    """Every replica resolves the URI at start: the sha256 of an unchanged file is remembered (path, inode, size,
    mtime), a rewrite is hashed again."""
    source = tmp_path / "m" / "tiny-sd.safetensors"
    source.parent.mkdir()
    source.write_bytes(exported("tiny-sd").read_bytes())
    hashed = []
    real = models._file_sha256
    monkeypatch.setattr(models, "_file_sha256", lambda p: hashed.append(p) or real(p))
    first = models.resolve_model_dir(str(source), tmp_path / "cache")
    assert models.resolve_model_dir(str(source), tmp_path / "cache") == first
    assert len(hashed) == 1
    state_dict = load_file(str(source))
    state_dict["model.diffusion_model.out.2.bias"] = state_dict["model.diffusion_model.out.2.bias"] + 1.0
    save_file(state_dict, str(source))
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 1_000_000))  # coarse clocks
    assert models.resolve_model_dir(str(source), tmp_path / "cache") != first
    assert len(hashed) == 2
