"""``lorafleet adapters ...`` through the registry's own entry point, on a local directory and on S3."""

from __future__ import annotations

import hashlib
import json

import pytest

from lora_registry import base_model_spec_from_dir
from lora_registry.cli import main

from registry_helpers import small_lora_bytes, torch_save_bytes

pytest_plugins = ["registry_helpers"]


@pytest.fixture
def cli(tiny_dir, capsys):
    provided = []

    def provider(uri):
        provided.append(uri)
        return base_model_spec_from_dir(tiny_dir)

    def run(*argv):
        code = main(list(argv), base_spec_provider=provider)
        out, err = capsys.readouterr()
        return code, out, err

    run.provided = provided
    return run


def test_cli_round_trip_on_a_local_registry(cli, tmp_path, registry_tiny_spec):
    registry = str(tmp_path / "registry")
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(small_lora_bytes(registry_tiny_spec))
    code, out, err = cli(
        "adapters", "register", str(lora), "--name", "watercolor", "--registry", registry,
        "--description", "soft", "--trigger-words", "wc style, paint", "--tags", "art,soft", "--json",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads(out)
    assert (manifest["name"], manifest["version"], manifest["source_format"]) == ("watercolor", 1, "diffusers")
    assert manifest["trigger_words"] == ["wc style", "paint"] and manifest["tags"] == ["art", "soft"]
    assert cli.provided == ["builtin:tiny-sd"]

    code, out, _ = cli("adapters", "register", str(lora), "--name", "watercolor", "--registry", registry)
    assert code == 0 and out.startswith("registered watercolor@2  rank 4  alpha 4")

    code, out, _ = cli("adapters", "list", "--registry", registry)
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "LATEST", "VERSIONS", "RANK", "SIZE", "TAGS", "DESCRIPTION"]
    assert lines[1].split()[:4] == ["watercolor", "2", "1,2", "4"]

    code, out, _ = cli("adapters", "show", "watercolor@1", "--registry", registry)
    assert code == 0 and json.loads(out)["version"] == 1

    dest = tmp_path / "pulled.safetensors"
    code, out, _ = cli("adapters", "pull", "watercolor", "-o", str(dest), "--registry", registry, "--json")
    assert code == 0 and json.loads(out) == {"ref": "watercolor@2", "path": str(dest), "sha256": manifest["sha256"]}
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == manifest["sha256"]

    code, out, _ = cli("adapters", "delete", "watercolor@2", "--registry", registry)
    assert (code, out.strip()) == (0, "deleted watercolor@2")
    code, out, _ = cli("adapters", "list", "--registry", registry, "--json")
    assert [(a["name"], a["versions"]) for a in json.loads(out)["data"]] == [("watercolor", [1])]


def test_cli_errors(cli, tmp_path):
    registry = str(tmp_path / "registry")
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(torch_save_bytes({"w": 1}))
    code, _, err = cli("adapters", "register", str(bad), "--name", "x", "--registry", registry)
    assert code == 1 and err.startswith("error: pickle_refused: ")
    code, _, err = cli("adapters", "show", "nope", "--registry", registry)
    assert code == 1 and err.strip() == "error: not_found: no adapter named 'nope'"
    code, _, err = cli("adapters", "show", "Bad@x", "--registry", registry)
    assert code == 1 and "invalid_name" in err
    code, _, err = cli("adapters", "list", "--registry", "ftp://x")
    assert code == 2 and "unsupported scheme" in err


def test_cli_on_s3(cli, moto_s3, tmp_path, registry_tiny_spec, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint)  # the standard chain, as on a real cluster
    monkeypatch.setenv("LORAFLEET_REGISTRY", f"s3://{moto_s3.new_bucket()}/team")
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(small_lora_bytes(registry_tiny_spec))
    code, out, err = cli("adapters", "register", str(lora), "--name", "pixel", "--json")
    assert code == 0, err
    code, out, _ = cli("adapters", "list", "--json")
    assert [a["name"] for a in json.loads(out)["data"]] == ["pixel"]
    code, out, _ = cli("adapters", "pull", "pixel", "-o", str(tmp_path / "p.safetensors"))
    assert (
        code == 0
        and (tmp_path / "p.safetensors").stat().st_size == json.loads(cli("adapters", "show", "pixel")[1])["size_bytes"]
    )
