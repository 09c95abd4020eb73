"""The `lorafleet` command as users run it: a subprocess, the builtin base model, a local registry."""

import json
import subprocess
import sys
from pathlib import Path

from lora_helpers import UNET_ATTN, make_peft_lora_file

LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))


def run(*args, env):
    return subprocess.run([LORAFLEET, *args], capture_output=True, text=True, timeout=300, env=env)


def test_adapters_register_list_show_delete(tiny, tmp_path, cache_dir):
    import os

    env = {**os.environ, "LORAFLEET_REGISTRY": str(tmp_path / "registry"), "LORAFLEET_CACHE_DIR": str(cache_dir)}
    lora = make_peft_lora_file(tiny, tmp_path / "lora", seed=3, rank=4, alpha=4, unet_targets=UNET_ATTN)
    r = run("adapters", "register", str(lora), "--name", "ink", "--trigger-words", "inky,bold", "--json", env=env)
    assert r.returncode == 0, r.stderr
    manifest = json.loads(r.stdout)
    assert (manifest["name"], manifest["version"], manifest["trigger_words"]) == ("ink", 1, ["inky", "bold"])
    r = run("adapters", "list", "--json", env=env)
    assert [a["name"] for a in json.loads(r.stdout)["data"]] == ["ink"]
    r = run("adapters", "show", "ink@1", "--json", env=env)
    assert json.loads(r.stdout)["sha256"] == manifest["sha256"]
    r = run("adapters", "register", str(tmp_path / "missing.safetensors"), "--name", "x", env=env)
    assert r.returncode != 0 and "missing.safetensors" in r.stderr
    r = run("adapters", "delete", "ink", "--json", env=env)
    assert r.returncode == 0
    assert json.loads(run("adapters", "list", "--json", env=env).stdout)["data"] == []


def test_export_model_writes_a_diffusers_directory(tmp_path, cache_dir):
    import os

    out = tmp_path / "tiny"
    r = run("export-model", "builtin:tiny-sd", str(out), env={**os.environ, "LORAFLEET_CACHE_DIR": str(cache_dir)})
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} >= {
        "model_index.json",
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
    }


def test_adapters_register_refuses_what_the_served_targets_cannot_reach(tiny, tmp_path, cache_dir):
    """As HTTP registration does: with a serve config whose UNet slots are on to_q only, a to_k adapter is refused
    (untargeted_modules, naming the config key) and nothing is stored; with the defaults it registers."""
    import os

    import yaml

    env = {**os.environ, "LORAFLEET_REGISTRY": str(tmp_path / "registry"), "LORAFLEET_CACHE_DIR": str(cache_dir)}
    lora = make_peft_lora_file(tiny, tmp_path / "lora", seed=4, rank=2, alpha=2, unet_targets=["to_k"])
    narrow = tmp_path / "serve_config.yaml"
    args = {"model": {"uri": "builtin:tiny-sd"}, "lora": {"unet_target_modules": ["to_q"]}}
    narrow.write_text(
        yaml.safe_dump({"applications": [{"name": "x", "import_path": "graph.app:build_app", "args": args}]})
    )
    r = run("adapters", "register", str(lora), "--name", "keys", "--serve-config", str(narrow), env=env)
    assert r.returncode != 0
    assert "untargeted" in r.stderr and "lora.unet_target_modules" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(run("adapters", "list", "--json", env=env).stdout)["data"] == []
    r = run("adapters", "register", str(lora), "--name", "keys", "--json", env=env)
    assert r.returncode == 0, r.stderr
