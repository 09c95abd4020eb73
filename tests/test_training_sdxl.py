"""SDXL LoRA training on builtin:tiny-sdxl: the step conditions the UNet as diffusers' SDXL pipeline does (both
encoders' penultimate states, the pooled embedding, size-and-crop time ids), the loss falls, the exported adapter
changes what StableDiffusionXLPipeline generates, runs are deterministic and resume exactly, registration works,
bad input fails before the first step."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image

from deployments.messages import MicroConditioning
from lora_registry.canonical import load_canonical
from lora_registry.validation import prepare_adapter
from training import Trainer, TrainingConfig, TrainingInputError, open_target_registry, prepare, register_adapter, train
from training.checkpoints import checkpoint_dirs
from training.cli import add_train_parser
from training.data import CropGeometry
from training.lora import LORA_FILE

CAPTION = "a red square"
REDS = [(255, 0, 0), (230, 20, 20), (200, 0, 30), (255, 40, 0)]
LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))


def write_folder(root: Path, size=(80, 64)) -> Path:
    """Four flat red patches, 80x64 (wider than tall: the crop's corner is (0, 8) after resizing to 64)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(REDS):
        Image.new("RGB", size, colour).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(CAPTION)
    return root


def config_for(data_dir, output_dir, cache_dir, **overrides) -> TrainingConfig:
    fields = {
        "data_dir": str(data_dir),
        "output_dir": str(output_dir),
        "cache_dir": str(cache_dir),
        "base_model": "builtin:tiny-sdxl",
        "resolution": 64,
        "rank": 4,
        "learning_rate": 1e-2,
        "batch_size": 2,
        **overrides,
    }
    return TrainingConfig(**fields)


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def red_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("red-xl"))


@pytest.fixture(scope="module")
def trained(red_folder, cache_dir, tiny_sdxl_dir, tmp_path_factory):
    """20 steps of batch 2 on the UNet (10 epochs of the 4 images), checkpoints every 10."""
    config = config_for(
        red_folder, tmp_path_factory.mktemp("run-xl"), cache_dir, steps=20, checkpoint_every=10, learning_rate=5e-2
    )
    plan = prepare(config)
    return plan, train(plan, progress=False)


@pytest.fixture
def sdxl_pipeline(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt=CAPTION, seed=0) -> torch.Tensor:
    """Final latents ``[1, 4, 8, 8]`` of a 4-step 64 px generation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe(
            prompt, height=64, width=64, num_inference_steps=4, generator=generator, output_type="latent"
        ).images


# -- the step ------------------------------------------------------------------------------------


def test_the_data_records_each_images_original_size_and_crop(trained):
    plan, _ = trained
    # 80x64 -> shorter side 64 -> 80x64 resized, centre-cropped from column 8: (height, width) and (top, left).
    assert plan.dataset.geometry == (CropGeometry((64, 80), (0, 8)),) * 4


def test_the_step_conditions_the_unet_as_stable_diffusion_xl_pipeline_does(
    trained, tiny_sdxl_dir, sdxl_pipeline, tmp_path
):
    """Both text encoders with LoRA, 3 steps; then the checkpoint's file loaded with diffusers' load_lora_weights:
    its encode_prompt and UNet give what the training step computed."""
    plan, _ = trained
    config = plan.config.model_copy(update={"train_text_encoder": True, "output_dir": str(tmp_path / "te")})
    trainer = Trainer(config, plan.model_dir, plan.dataset, plan.record, device=torch.device("cpu"))
    for _ in range(3):
        trainer.train_step()
    trainer.write_checkpoint(tmp_path / "ckpt")
    keys = lora_tensors(tmp_path / "ckpt" / LORA_FILE)
    assert {k.split(".", 1)[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}

    captions = [CAPTION, "a blue square"]
    base_embeds, _, base_pooled, _ = sdxl_pipeline.encode_prompt(captions, do_classifier_free_guidance=False)
    sdxl_pipeline.load_lora_weights(str(tmp_path / "ckpt"), weight_name=LORA_FILE)
    embeds, _, pooled, _ = sdxl_pipeline.encode_prompt(captions, do_classifier_free_guidance=False)
    with torch.no_grad():
        cond = trainer.conditioning(captions, [plan.dataset.geometry[0]] * 2, 64)
    text_embeds, time_ids = cond.added_cond_kwargs["text_embeds"], cond.added_cond_kwargs["time_ids"]
    print(f"text-encoder LoRA moved the prompt embeddings by {(embeds - base_embeds).abs().max():.3g} (max abs)")
    assert (embeds - base_embeds).abs().max() > 1e-3 and (pooled - base_pooled).abs().max() > 1e-3
    torch.testing.assert_close(cond.encoder_hidden_states, embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(text_embeds, pooled, rtol=0, atol=1e-5)
    # Time ids as the pipeline's micro-conditioning builds them: original size, crop corner, target size.
    expected = MicroConditioning(original_size=(64, 80), crops_coords_top_left=(0, 8)).time_ids(64, 64)[0]
    assert time_ids.tolist() == [list(map(float, expected))] * 2 == [[64.0, 80.0, 0.0, 8.0, 64.0, 64.0]] * 2

    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ours = trainer.unet(x_t, t, cond.encoder_hidden_states, added_cond_kwargs=cond.added_cond_kwargs).sample
        theirs = sdxl_pipeline.unet(x_t, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    torch.testing.assert_close(ours, theirs.sample, rtol=0, atol=1e-5)


def test_sdxl_training_lowers_the_loss(trained):
    plan, result = trained
    held_out = list(range(10_000, 10_032))  # 32 fixed (image, noise, timestep) samples the run never drew
    trainer = Trainer(plan.config, plan.model_dir, plan.dataset, plan.record, device=torch.device("cpu"))
    base = trainer.evaluate(held_out)  # LoRA B starts at zero: this is the base model
    trainer.restore(plan.checkpoint_root / "step-00000020")
    after = trainer.evaluate(held_out)
    first, last = sum(result.losses[:10]) / 10, result.record["final_loss"]
    print(
        f"held-out loss: base {base:.4f}, trained {after:.4f}; training loss first 10 {first:.4f}, last 10 {last:.4f}"
    )
    assert after < 0.98 * base
    assert last < first
    b_norm = sum(v.norm() ** 2 for k, v in lora_tensors(result.lora_file).items() if "lora_B" in k) ** 0.5
    assert b_norm > 0  # B starts at zero


def test_the_exported_adapter_changes_what_stable_diffusion_xl_pipeline_generates(trained, sdxl_pipeline):
    plan, result = trained
    base = generate(sdxl_pipeline)
    sdxl_pipeline.load_lora_weights(str(result.lora_file.parent), weight_name=result.lora_file.name)
    with_lora = generate(sdxl_pipeline)
    sdxl_pipeline.unload_lora_weights()
    again = generate(sdxl_pipeline)
    change = (with_lora - base).pow(2).mean().sqrt() / base.pow(2).mean().sqrt()
    print(f"exported adapter changes the pipeline's final latents by {change:.3f} (relative RMS)")
    assert change > 0.01
    assert torch.equal(again, base)  # the change is the adapter's


# -- determinism, checkpoints and resume --------------------------------------------------------


def test_sdxl_training_is_deterministic_for_a_seed(red_folder, cache_dir, tmp_path):
    settings = {"steps": 3, "checkpoint_every": 3, "batch_size": 1, "random_flip": True}
    runs = [train(prepare(config_for(red_folder, tmp_path / n, cache_dir, **settings)), progress=False) for n in "ab"]
    other = train(prepare(config_for(red_folder, tmp_path / "c", cache_dir, seed=1, **settings)), progress=False)
    assert runs[0].losses == runs[1].losses
    assert same_tensors(lora_tensors(runs[0].lora_file), lora_tensors(runs[1].lora_file))
    assert runs[0].adapter_file.read_bytes() == runs[1].adapter_file.read_bytes()
    assert other.losses != runs[0].losses
    assert not same_tensors(lora_tensors(other.lora_file), lora_tensors(runs[0].lora_file))


class Interrupt(Exception):
    pass


def test_a_resumed_sdxl_run_ends_exactly_where_an_uninterrupted_run_ends(red_folder, cache_dir, tmp_path):
    settings = {"steps": 6, "checkpoint_every": 3, "batch_size": 1, "random_flip": True}
    straight = train(prepare(config_for(red_folder, tmp_path / "straight", cache_dir, **settings)), progress=False)
    config = config_for(red_folder, tmp_path / "resumed", cache_dir, **settings)

    def stop_at_4(step, loss):
        if step == 4:
            raise Interrupt  # after step 4; the newest checkpoint is step 3

    with pytest.raises(Interrupt):
        train(prepare(config), progress=False, on_step=stop_at_4)
    plan = prepare(config)
    assert plan.resume_from is not None and plan.resume_from.name == "step-00000003"
    steps_run = []
    resumed = train(plan, progress=False, on_step=lambda step, loss: steps_run.append(step))
    assert steps_run == [4, 5, 6]
    assert resumed.losses == straight.losses
    assert same_tensors(lora_tensors(resumed.lora_file), lora_tensors(straight.lora_file))
    assert resumed.adapter_file.read_bytes() == straight.adapter_file.read_bytes()


def test_with_both_text_encoders_a_restored_trainer_continues_exactly(trained, tmp_path):
    plan, _ = trained
    config = plan.config.model_copy(update={"train_text_encoder": True, "batch_size": 1, "random_flip": True})

    def trainer() -> Trainer:
        return Trainer(config, plan.model_dir, plan.dataset, plan.record, device=torch.device("cpu"))

    straight = trainer()
    for _ in range(4):
        straight.train_step()
        if straight.step == 2:
            straight.write_checkpoint(tmp_path / "step-2")
    straight.write_checkpoint(tmp_path / "straight")
    resumed = trainer()
    resumed.restore(tmp_path / "step-2")
    for _ in range(2):
        resumed.train_step()
    resumed.write_checkpoint(tmp_path / "resumed")
    assert resumed.losses == straight.losses
    ours, theirs = lora_tensors(tmp_path / "resumed" / LORA_FILE), lora_tensors(tmp_path / "straight" / LORA_FILE)
    assert same_tensors(ours, theirs)
    moved = [k for k in ours if k.startswith("text_encoder_2.") and "lora_B" in k and ours[k].abs().max() > 0]
    assert moved  # the second encoder's LoRA trained too


# -- registration and the command ----------------------------------------------------------------


def test_the_unet_adapter_registers_in_canonical_form(trained, tmp_path):
    plan, result = trained
    prepared = prepare_adapter(result.lora_file.read_bytes(), plan.spec)
    assert prepared.blob == result.adapter_file.read_bytes() and prepared.sha256 == result.sha256
    adapter = load_canonical(result.adapter_file)
    assert adapter.rank == 4 and adapter.alpha == 4.0 and not adapter.has_text_encoder
    suffixes = (".to_q", ".to_k", ".to_v", ".to_out.0")
    targeted = {n for n in plan.spec.modules if n.startswith("unet.") and n.endswith(suffixes)}
    assert set(adapter.modules) == targeted and len(targeted) == 4 * 2 * 17  # 17 transformer blocks
    registry = open_target_registry(str(tmp_path / "registry"), plan.spec)
    manifest = register_adapter(registry, result, name="red-xl")
    assert (manifest.ref, manifest.sha256) == ("red-xl@1", result.sha256)
    assert manifest.training["base_model"] == "builtin:tiny-sdxl" and manifest.training["steps"] == 20


def test_an_adapter_on_both_text_encoders_registers(red_folder, cache_dir, tmp_path):
    config = config_for(red_folder, tmp_path / "run", cache_dir, steps=2, checkpoint_every=2, train_text_encoder=True)
    plan = prepare(config)
    result = train(plan, progress=False)
    adapter = load_canonical(result.adapter_file)
    components = {name.split(".", 1)[0] for name in adapter.modules}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    registry = open_target_registry(str(tmp_path / "registry"), plan.spec)
    manifest = register_adapter(registry, result, name="red-xl-te")
    assert manifest.sha256 == result.sha256
    _, loaded = registry.load("red-xl-te")
    assert loaded.component("text_encoder_2")


def test_cli_trains_and_registers_an_sdxl_adapter(red_folder, cache_dir, tmp_path):
    out, registry_dir = tmp_path / "cli", tmp_path / "registry"
    args = [LORAFLEET, "train", str(red_folder), "--output-dir", str(out), "--base-model", "builtin:tiny-sdxl"]
    args += ["--steps", "2", "--checkpoint-every", "1", "--resolution", "64", "--name", "red-xl"]
    args += ["--registry", str(registry_dir), "--quiet", "--json"]
    env = {**os.environ, "LORAFLEET_CACHE_DIR": str(cache_dir)}
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "base builtin:tiny-sdxl" in r.stderr
    result = json.loads(r.stdout)
    manifest = result["manifest"]
    assert (manifest["name"], manifest["version"], manifest["sha256"]) == ("red-xl", 1, result["sha256"])
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == ["step-00000001", "step-00000002"]


def test_train_help_names_sdxl():
    parser = argparse.ArgumentParser(prog="lorafleet")
    text = add_train_parser(parser.add_subparsers()).format_help()
    assert "SDXL" in text and "builtin:tiny-sdxl" in text
    assert "SDXL: on both encoders" in " ".join(text.split())


# -- bad input, before any training step ---------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"resolution": 48}, "resolution 48 does not suit base model 'builtin:tiny-sdxl': it must be a multiple of 32"),
        ({"base_model": "builtin:tiny-sdxl-inpaint"}, "is an inpainting model (UNet in_channels 9)"),
        (
            {"train_text_encoder": True, "text_encoder_target_modules": ("q_proj", "to_q")},
            "text_encoder_target_modules: ['to_q'] match no Linear/Conv2d module of the text_encoder",
        ),
    ],
)
def test_bad_sdxl_input_fails_before_training(red_folder, cache_dir, tmp_path, overrides, expected):
    config = config_for(red_folder, tmp_path / "out", cache_dir, steps=2, **overrides)
    with pytest.raises(TrainingInputError) as e:
        prepare(config)
    assert expected in str(e.value)
    assert not (tmp_path / "out").exists()
