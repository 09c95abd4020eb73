"""Configuration: typed, validated at start, errors name the field; serve_config.yaml is valid for Serve."""

import pytest
import yaml

from graph.config import AppConfig, ConfigError, load_serve_config

from conftest import ROOT


@pytest.mark.parametrize(
    "args, field",
    [
        ({"denoiser": {"max_rows_per_tick": 1}}, "denoiser.max_rows_per_tick"),
        ({"model": {"dtype": "float8"}}, "model.dtype"),
        ({"limits": {"max_side": 32}}, "limits.max_side"),
        ({"limits": {"min_side": 512, "max_side": 256}}, "limits"),
        ({"text_encoder": {"max_batch_size": 0}}, "text_encoder.max_batch_size"),
        ({"vae": {"num_gpus": -1}}, "vae.num_gpus"),
        ({"denoiser": {"max_rows": 8}}, "denoiser.max_rows"),
        ({"modle": {}}, "modle"),
        ({"model": {"uri": "s3://models/v1-5-pruned.ckpt"}}, "model.uri"),  # pickle: refused at start
    ],
)
def test_bad_config_names_the_field(args, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        AppConfig.load(args)


def test_build_app_fails_at_start_on_bad_config():
    from graph.app import build_app

    with pytest.raises(ConfigError, match=r"denoiser\.max_queued_images"):
        build_app({"denoiser": {"max_queued_images": 0}})


def test_serve_config_is_valid_for_serve_and_lorafleet():
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(doc)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(doc)
    )
    assert schema.applications[0].import_path == "graph.app:build_app"
    http, args = load_serve_config(ROOT / "serve_config.yaml")
    assert http == {"host": "127.0.0.1", "port": 8000}
    config = AppConfig.load(args)
    assert config.model.uri == "builtin:tiny-sd"
    assert config.limits.max_side == "auto" and config.limits.max_steps == 150 and config.limits.max_num_images == 8


def test_autoscaling_is_validated_by_serve_and_passed_through():
    from graph.app import _options

    with pytest.raises(ConfigError, match=r"denoiser\.autoscaling"):
        AppConfig.load({"denoiser": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})
    cfg = AppConfig.load({"vae": {"autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}}})
    opts = _options(cfg.vae)
    assert opts["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in opts
    assert _options(cfg.text_encoder)["num_replicas"] == 1
