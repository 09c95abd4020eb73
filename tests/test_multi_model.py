"""Several base models behind one ingress, in-process (no Ray): the config, how each API picks a model, the
listings, adapters per base, and the jobs' ``loading_model`` phase while a model scales from zero.

The real HTTP ingress over two models (``builtin:tiny-sd`` and ``builtin:tiny-sdxl``), the graph replaced by
a fake that records each plan (``plan.model`` says which model's deployments would run it). The same app on
Ray Serve, with one model at zero replicas, is ``test_e2e_multi_model.py``.
"""

import asyncio
import json

import pytest

from graph.config import AppConfig, ConfigError

from ingress_helpers import ADMIN, is_error_shape, make_ingress

SMALL = {"width": 64, "height": 64, "steps": 2}


def two_models(tmp_path, cache_dir, **extra) -> AppConfig:
    return AppConfig.load(
        {
            "models": [
                {"name": "sd", "uri": "builtin:tiny-sd", "cache_dir": str(cache_dir)},
                {
                    "name": "xl",
                    "uri": "builtin:tiny-sdxl",
                    "cache_dir": str(cache_dir),
                    "denoiser": {"autoscaling": {"min_replicas": 0}},
                },
            ],
            "registry": {"uri": str(tmp_path / "registry"), "cache_dir": str(tmp_path / "adapter-cache")},
            "admin": {"token": "in-process-admin-token"},
            **extra,
        }
    )


@pytest.fixture
def served(tmp_path, cache_dir, tiny_dir, tiny_sdxl_dir, monkeypatch):
    return make_ingress(two_models(tmp_path, cache_dir), monkeypatch)


# -- config ------------------------------------------------------------------------------------


def test_each_model_gets_its_sections_merged_over_the_top_level_ones(tmp_path, cache_dir):
    config = two_models(
        tmp_path,
        cache_dir,
        denoiser={"max_rows_per_tick": 8, "autoscaling": {"min_replicas": 1, "max_replicas": 4}},
    )
    sd, xl = config.served_models()
    assert (sd.name, sd.suffix, sd.model.uri, sd.model.name) == ("sd", "", "builtin:tiny-sd", "sd")
    assert (xl.name, xl.suffix, xl.model.uri) == ("xl", "-xl", "builtin:tiny-sdxl")
    assert sd.denoiser.autoscaling == {"min_replicas": 1, "max_replicas": 4}
    assert xl.denoiser.autoscaling == {"min_replicas": 0, "max_replicas": 4}  # merged key by key
    assert sd.denoiser.max_rows_per_tick == xl.denoiser.max_rows_per_tick == 8


def test_a_single_model_config_is_one_served_model_named_by_the_model():
    (only,) = AppConfig.load({}).served_models()
    assert (only.name, only.suffix, only.model.uri) == (None, "", "builtin:tiny-sd")


@pytest.mark.parametrize(
    "args, message",
    [
        ({"models": []}, "models: list at least one model"),
        ({"models": [{"name": "a"}, {"name": "a"}]}, "each name must be unique; listed twice: a"),
        ({"model": {"uri": "builtin:tiny-sd"}, "models": [{"name": "a"}]}, "`models` (several base models) or `model`"),
        ({"models": [{"name": "a:b"}]}, "models.0.name"),
        ({"models": [{"uri": "builtin:tiny-sd"}]}, "models.0.name: Field required"),
        ({"models": [{"name": "a", "denoiser": {"max_rows_per_tick": 1}}]}, "models[a].denoiser: max_rows_per_tick"),
        ({"models": [{"name": "a", "vae": {"typo": 1}}]}, "models[a].vae: typo: Extra inputs are not permitted"),
        (
            {"models": [{"name": "a", "denoiser": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}}]},
            "models[a].denoiser.autoscaling",
        ),
        ({"models": [{"name": "a", "uri": "x.ckpt"}]}, "models.0.uri"),
    ],
)
def test_a_bad_models_list_fails_at_start_naming_the_field(args, message):
    with pytest.raises(ConfigError) as e:
        AppConfig.load(args)
    assert message in str(e.value)


def test_build_app_binds_three_deployments_per_model_and_one_ingress(tmp_path, cache_dir):
    from graph.app import build_app

    app = build_app(two_models(tmp_path, cache_dir))
    ingress = app._bound_deployment
    graphs, config, jobs = ingress.init_args

    def deployment(app):
        return app._bound_deployment

    assert [tuple(deployment(h).name for h in (g.text_encoder, g.denoiser, g.vae)) for g in graphs] == [
        ("TextEncoder", "Denoiser", "VAE"),
        ("TextEncoder-xl", "Denoiser-xl", "VAE-xl"),
    ]
    assert deployment(graphs[1].denoiser)._deployment_config.autoscaling_config.min_replicas == 0
    assert deployment(jobs).name == "Jobs" and deployment(jobs).init_args[0] == graphs


# -- picking a model ----------------------------------------------------------------------------


def test_models_lists_every_base_the_default_first(served):
    client, _ = served
    data = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["kind"], m["family"], m["inpainting"], m["default_size"], m["max_size"]) for m in data] == [
        ("sd", "sd1", "sd1", False, "256x256", "1024x1024"),
        ("xl", "sdxl", "sdxl", False, "256x256", "1024x1024"),
    ]
    assert (
        "uri" not in data[0] and client.get("/v1/models", headers=ADMIN).json()["data"][1]["uri"] == "builtin:tiny-sdxl"
    )


def test_the_native_model_field_picks_the_base(served):
    client, ingress = served
    body = {"prompt": "a boat", **SMALL}
    assert client.post("/v1/generate", json=body).json()["model"] == "sd"  # no model: the first
    assert client.post("/v1/generate", json={**body, "model": "xl"}).json()["model"] == "xl"
    r = client.post("/v1/generate", json={**body, "model": "xl"}, headers={"Accept": "image/png"})
    assert r.headers["X-Model"] == "xl"
    assert [p.model for p in ingress.graph.plans] == ["sd", "xl", "xl"]
    r = client.post("/v1/generate", json={**body, "model": "sd3"})
    assert r.status_code == 404 and is_error_shape(r.json())
    assert r.json()["error"] == {
        "code": "model_not_found",
        "field": "model",
        "message": "unknown model 'sd3'; served: 'sd', 'xl'",
    }


def test_each_model_checks_requests_by_its_own_rules(served):
    """SDXL's size conditioning is a 422 on the SD1 model, accepted on the SDXL one; jobs plan per model too."""
    client, ingress = served
    body = {"prompt": "a boat", "original_size": [512, 512], **SMALL}
    r = client.post("/v1/generate", json={**body, "model": "sd"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_field"
    assert client.post("/v1/generate", json={**body, "model": "xl"}).status_code == 200
    assert client.post("/v1/jobs", json={**body, "model": "xl"}).status_code == 202
    assert ingress.jobs.submitted[-1].model == "xl" and ingress.jobs.submitted[-1].micro is not None


def test_openai_model_names_the_base_and_an_adapter(served):
    client, ingress = served
    r = client.post("/v1/images/generations", json={"prompt": "a boat", "model": "xl", "size": "64x64"})
    assert r.status_code == 200 and ingress.graph.plans[-1].model == "xl"
    r = client.post("/v1/images/generations", json={"prompt": "a boat", "model": "xl:ink", "size": "64x64"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"  # the base was found
    r = client.post("/v1/images/generations", json={"prompt": "a boat", "model": "sd3:ink"})
    assert (r.status_code, r.json()["error"]["param"]) == (404, "model")  # OpenAI's error shape


def test_a1111_sd_model_checkpoint_picks_the_base(served):
    client, ingress = served
    models = client.get("/sdapi/v1/sd-models").json()
    assert [(m["model_name"], m["kind"]) for m in models] == [("sd", "sd1"), ("xl", "sdxl")]
    body = {"prompt": "a boat", "steps": 2, "width": 64, "height": 64}
    for checkpoint, want in [
        (models[1]["title"], "xl"),  # "xl [hash]", as A1111's own clients send it
        ("xl", "xl"),
        (models[1]["hash"], "xl"),
        ("xl.safetensors", "xl"),
        ("sd", "sd"),
    ]:
        r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": checkpoint}})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert ingress.graph.plans[-1].model == want and info["sd_model_name"] == want
        assert "override_settings" not in info.get("ignored_fields", [])
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert ingress.graph.plans[-1].model == "sd"
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": "nope"}})
    assert r.status_code == 404 and r.json()["error"]["field"] == "override_settings.sd_model_checkpoint"
    assert "'sd [" in r.json()["error"]["message"]
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": 3}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "override_settings.sd_model_checkpoint"
    # Other overrides still have no effect here, and are still named.
    r = client.post(
        "/sdapi/v1/txt2img",
        json={**body, "override_settings": {"sd_model_checkpoint": "xl", "CLIP_stop_at_last_layers": 2}},
    )
    assert json.loads(r.json()["info"])["ignored_fields"] == ["override_settings"]


# -- adapters per base --------------------------------------------------------------------------


def test_adapters_register_for_a_base_and_list_by_it(served, tiny_dir, tiny_sdxl_dir, tmp_path):
    from lora_registry.base_model import base_model_spec_from_dir

    from lora_helpers import write_kohya_sdxl_file
    from registry_helpers import small_lora_bytes

    client, _ = served

    def register(name, data, model=None):
        form = {"name": name, **({"model": model} if model else {})}
        return client.post("/v1/adapters", files={"file": ("f.safetensors", data)}, data=form, headers=ADMIN)

    sd_bytes = small_lora_bytes(base_model_spec_from_dir(tiny_dir), seed=1)
    xl_bytes = write_kohya_sdxl_file(base_model_spec_from_dir(tiny_sdxl_dir), tmp_path / "xl.safetensors").read_bytes()
    assert register("ink", sd_bytes).json()["model"] == "sd"
    assert register("xl-ink", xl_bytes, "xl").json()["model"] == "xl"
    r = register("wrong", xl_bytes, "sd")
    assert r.status_code == 422 and r.json()["error"]["code"] == "base_mismatch"
    r = register("nowhere", sd_bytes, "sd3")
    assert r.status_code == 404 and r.json()["error"]["field"] == "model"

    def listed(query=""):
        return [(a["name"], a["model"]) for a in client.get("/v1/adapters" + query, headers=ADMIN).json()["data"]]

    assert listed() == [("ink", "sd"), ("xl-ink", "xl")]
    assert listed("?model=xl") == [("xl-ink", "xl")]
    assert listed("?model=sd") == [("ink", "sd")]
    assert client.get("/v1/adapters/xl-ink", headers=ADMIN).json()["model"] == "xl"
    assert client.get("/v1/adapters?model=sd3", headers=ADMIN).status_code == 404

    body = {"prompt": "a boat", **SMALL}
    r = client.post("/v1/generate", json={**body, "model": "xl", "loras": [{"name": "ink"}]})
    assert r.status_code == 422 and r.json()["error"] == {
        "code": "adapter_incompatible",
        "field": "loras[0]",
        "message": "adapter ink@1 is for model sd (sd1); the request's model is xl (sdxl)",
    }
    r = client.post("/v1/generate", json={**body, "model": "sd", "prompt": "a boat <lora:xl-ink:0.5>"})
    assert (
        r.status_code == 422
        and "is for model xl (sdxl); the request's model is sd (sd1)" in r.json()["error"]["message"]
    )
    assert client.post("/v1/generate", json={**body, "model": "xl", "loras": [{"name": "xl-ink"}]}).status_code == 200


def test_the_page_knows_every_model(served):
    client, _ = served
    html = client.get("/").text
    start = html.index('{"model"')
    config = json.loads(html[start : html.index("</script>", start)])
    assert config["model"] == "sd" and [m["model"] for m in config["models"]] == ["sd", "xl"]
    assert config["models"][1]["family"] == "sdxl"


def test_readiness_does_not_wake_a_model_at_zero(served):
    client, ingress = served
    assert ingress.scales_from_zero == {"sd": False, "xl": True}
    r = client.get("/readyz")  # no deployments in-process: sd is not ready, xl is not asked
    deployments = json.loads(r.json()["error"]["message"].split(": ", 1)[1].replace("'", '"'))
    assert deployments["TextEncoder-xl"] == deployments["Denoiser-xl"] == deployments["VAE-xl"] == "scales from zero"
    assert deployments["Denoiser"].startswith("not ready")


# -- jobs while a model scales from zero ----------------------------------------------------------


def test_cold_starts_report_an_eta_until_one_is_measured():
    from deployments.messages import Queued, Step
    from graph.jobs import ColdStarts

    replicas = {"Denoiser-xl": 0}
    now = [100.0]
    cold = ColdStarts({"xl": "Denoiser-xl"}, replicas.__getitem__, default_eta_s=60.0, clock=lambda: now[0])
    assert asyncio.run(cold.loading("sd")) is None  # never scales to zero
    assert asyncio.run(cold.loading("xl")) == 60.0
    seen = []
    on_event = cold.timed("xl", seen.append)
    now[0] = 112.5
    on_event(Queued(position=0, eta_s=1.0))
    now[0] = 130.0
    on_event(Step(step=1, steps=2, eta_s=0.5))  # only the first event times the start
    assert cold.eta_s("xl") == 12.5 and len(seen) == 2
    assert asyncio.run(cold.loading("xl")) == 12.5
    replicas["Denoiser-xl"] = 1
    assert asyncio.run(cold.loading("xl")) is None

    def broken(_):
        raise RuntimeError("controller unreachable")

    assert asyncio.run(ColdStarts({"xl": "Denoiser-xl"}, broken, 60.0).loading("xl")) is None  # the job runs anyway


def test_a_job_shows_loading_model_then_queued_then_running():
    from deployments.messages import DecodedImages, Queued, Step
    from graph.job_store import JobManager, JobStore, LoadingModel

    from conftest import make_plan

    gate = asyncio.Event()
    seen = []

    async def run(plan, on_event):
        on_event(LoadingModel("xl", 30.0))
        seen.append(manager.get(job.id).to_dict())
        await gate.wait()
        on_event(Queued(position=0, eta_s=2.0))
        seen.append(manager.get(job.id).to_dict())
        on_event(Step(step=1, steps=plan.steps, eta_s=1.0))
        seen.append(manager.get(job.id).to_dict())
        return DecodedImages((b"png",), 0.0, 0.0, 0.0, 0.0)

    async def main():
        nonlocal manager, job
        manager = JobManager(JobStore(10, 60), run)
        job = manager.submit(make_plan(model="xl", num_images=1))
        await asyncio.sleep(0)
        gate.set()
        await job.task

    manager = job = None
    asyncio.run(main())
    phases = [(d["status"], d["phase"], d["position"], d["eta_s"], d["model"]) for d in seen]
    assert phases == [
        ("queued", "loading_model", None, 30.0, "xl"),
        ("queued", None, 0, 2.0, "xl"),
        ("running", None, None, 1.0, "xl"),
    ]
    assert manager.get(job.id).to_dict()["phase"] is None


def test_plans_run_on_their_models_graph_and_a_single_graph_takes_every_plan():
    from graph.chain import GraphRouter

    from conftest import make_plan

    class Client:
        def __init__(self, name):
            self.name = name

        async def run(self, plan, **kwargs):
            return self.name

    both = GraphRouter({"sd": Client("sd"), "xl": Client("xl")})
    assert [asyncio.run(both.run(make_plan(model=m))) for m in ("xl", "sd")] == ["xl", "sd"]
    with pytest.raises(KeyError):
        asyncio.run(both.run(make_plan(model="sd3")))
    # The Jobs replica of a single-model app keys its graph "" (the name comes from the model itself).
    single = GraphRouter({"": Client("only")})
    assert asyncio.run(single.run(make_plan(model="tiny-sd"))) == "only"


def test_the_page_under_a_route_prefix_loads_its_files_relative_to_itself(served):
    """``/multi`` (Serve's route prefix, no trailing slash) redirects to ``/multi/``, whose ``static/...``
    then resolve under the prefix."""
    from fastapi.testclient import TestClient

    from graph import ingress as ingress_module

    client, _ = served
    assert 'src="static/app.js"' in client.get("/").text
    prefixed = TestClient(ingress_module.app, root_path="/multi", raise_server_exceptions=False)
    r = prefixed.get("/multi", follow_redirects=False)
    assert r.status_code in (307, 308) and r.headers["location"].endswith("/multi/")
    assert prefixed.get("/multi/").status_code == 200
