"""Two base models in one application, one of them scaled to zero, through real HTTP and Ray Serve.

A third application on the session's Ray instance (``multi_app`` in conftest.py): ``models: [tiny-sd,
tiny-sdxl]`` behind one ingress under ``/multi``. tiny-sd runs one replica per stage; tiny-sdxl has
``min_replicas: 0`` on all three stages and so costs no replica until asked.

The cold start is made deterministic, not raced: while a placeholder actor holds every free CPU, tiny-sdxl's
replicas (``num_cpus: 0.25`` each) cannot be placed, so its job stays ``loading_model`` for as long as the test
needs; tiny-sd's replicas take no CPU reservation and keep serving. Releasing the placeholder lets the
replicas start and the job finish.
"""

import base64
import io
import json
import re

import pytest
import requests
from PIL import Image

from conftest import ADMIN_TOKEN, assert_clean_error, free_cpus_held, wait_until
from conftest import multi_running as running


def expect_error(r: requests.Response, status: int, code: str, field: str | None) -> None:
    assert r.status_code == status, r.text
    assert_clean_error(r.text)
    assert (r.json()["error"]["code"], r.json()["error"]["field"]) == (code, field), r.text


pytestmark = pytest.mark.e2e

SMALL = {"width": 64, "height": 64, "steps": 3}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def multi(multi_app):
    return multi_app


def test_a_model_at_zero_starts_on_a_request_while_the_other_keeps_serving(multi):

    # Idle, the cold model costs no replica; readiness does not wake it. (Another test may have used it:
    # idle for downscale_delay_s, it is back at zero.)
    wait_until(lambda: running("Denoiser-tiny-sdxl") == 0, "the cold model at zero", timeout_s=180, interval_s=1.0)
    assert (running("TextEncoder-tiny-sdxl"), running("Denoiser-tiny-sdxl"), running("VAE-tiny-sdxl")) == (0, 0, 0)
    assert running("Denoiser") == 1
    ready = multi.get("/readyz").json()
    assert (
        ready["deployments"]["Denoiser-tiny-sdxl"] == "scales from zero" and ready["deployments"]["Denoiser"] == "ready"
    )
    warm_body = {"prompt": "a lighthouse", "model": "tiny-sd", "seed": 5, **SMALL}
    before = multi.post("/v1/generate", warm_body, headers={"Accept": "image/png"})
    assert before.status_code == 200 and before.headers["X-Model"] == "tiny-sd"

    with free_cpus_held():
        r = multi.post("/v1/jobs", {"prompt": "a harbour", "model": "tiny-sdxl", "seed": 9, **SMALL})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        job = wait_until(
            lambda: (j := multi.get(f"/v1/jobs/{job_id}").json())["phase"] == "loading_model" and j,
            "the job to show loading_model",
        )
        assert (job["status"], job["model"], job["eta_s"]) == ("queued", "tiny-sdxl", 45.0)  # nothing measured yet

        # Meanwhile the other model serves as before: same images, its own replicas.
        for _ in range(3):
            again = multi.post("/v1/generate", warm_body, headers={"Accept": "image/png"})
            assert again.status_code == 200 and again.content == before.content
        job = multi.get(f"/v1/jobs/{job_id}").json()
        assert (job["status"], job["phase"]) == ("queued", "loading_model")
        assert running("Denoiser-tiny-sdxl") == 0

    done = wait_until(
        lambda: (j := multi.get(f"/v1/jobs/{job_id}").json())["status"] in ("done", "failed") and j,
        "the cold model's job to finish",
        timeout_s=300,
        interval_s=0.5,
    )
    assert done["status"] == "done" and done["phase"] is None, done
    # The job's image is the one the model gives for this request once warm.
    sync = multi.post(
        "/v1/generate",
        {"prompt": "a harbour", "model": "tiny-sdxl", "seed": 9, **SMALL},
        headers={"Accept": "image/png"},
    )
    assert sync.status_code == 200 and sync.headers["X-Model"] == "tiny-sdxl"
    assert base64.b64decode(done["images"][0]["b64"]) == sync.content
    assert Image.open(io.BytesIO(sync.content)).size == (64, 64)

    # Idle again, it goes back to zero (downscale_delay_s: 2).
    wait_until(lambda: running("Denoiser-tiny-sdxl") == 0, "the cold model back at zero", timeout_s=180, interval_s=1.0)


def test_models_are_listed_and_every_api_picks_one(multi):
    from openai import OpenAI

    data = multi.get("/v1/models").json()["data"]
    assert [(m["id"], m["kind"], m["default_size"]) for m in data] == [
        ("tiny-sd", "sd1", "256x256"),
        ("tiny-sdxl", "sdxl", "256x256"),
    ]
    body = {"prompt": "a field", "seed": 3, **SMALL}
    assert multi.post("/v1/generate", body).json()["model"] == "tiny-sd"  # the default: the first
    assert multi.post("/v1/generate", {**body, "model": "tiny-sdxl"}).json()["model"] == "tiny-sdxl"
    r = multi.post("/v1/generate", {**body, "model": "sd3"})
    expect_error(r, 404, "model_not_found", "model")
    assert "'tiny-sd', 'tiny-sdxl'" in r.json()["error"]["message"]

    client = OpenAI(base_url=multi.url + "/v1", api_key="unused")
    xl = client.images.generate(model="tiny-sdxl", prompt="a field", size="64x64", extra_body={"steps": 3, "seed": 3})
    sd = client.images.generate(model="tiny-sd", prompt="a field", size="64x64", extra_body={"steps": 3, "seed": 3})
    assert xl.data[0].b64_json != sd.data[0].b64_json

    models = multi.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["tiny-sd", "tiny-sdxl"]
    a1111 = {"prompt": "a field", "seed": 3, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}
    r = multi.post("/sdapi/v1/txt2img", {**a1111, "override_settings": {"sd_model_checkpoint": models[1]["title"]}})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["sd_model_name"] == "tiny-sdxl" and "override_settings" not in info.get("ignored_fields", [])
    r = multi.post("/sdapi/v1/txt2img", {**a1111, "override_settings": {"sd_model_checkpoint": "nope.safetensors"}})
    expect_error(r, 404, "model_not_found", "override_settings.sd_model_checkpoint")


def test_adapters_belong_to_a_base(multi, tiny_dir, tiny_sdxl_dir, tmp_path):
    from lora_registry.base_model import base_model_spec_from_dir

    from lora_helpers import write_kohya_sdxl_file
    from registry_helpers import small_lora_bytes

    def register(name: str, data: bytes, model: str | None) -> requests.Response:
        form = {"name": name} if model is None else {"name": name, "model": model}
        return requests.post(
            multi.url + "/v1/adapters",
            files={"file": (f"{name}.safetensors", data)},
            data=form,
            headers=ADMIN,
            timeout=120,
        )

    r = register("sd-ink", small_lora_bytes(base_model_spec_from_dir(tiny_dir), seed=1), None)
    assert r.status_code == 201 and r.json()["model"] == "tiny-sd", r.text
    xl_file = write_kohya_sdxl_file(
        base_model_spec_from_dir(tiny_sdxl_dir), tmp_path / "xl.safetensors", seed=2, rank=4
    )
    r = register("xl-ink", xl_file.read_bytes(), "tiny-sdxl")
    assert r.status_code == 201 and r.json()["model"] == "tiny-sdxl", r.text
    r = register("xl-wrong", xl_file.read_bytes(), "tiny-sd")  # an SDXL file for the SD1 model
    assert r.status_code == 422 and r.json()["error"]["code"] == "base_mismatch", r.text

    listed = multi.get("/v1/adapters?model=tiny-sdxl", headers=ADMIN).json()["data"]
    assert [(a["name"], a["model"]) for a in listed] == [("xl-ink", "tiny-sdxl")]
    everything = multi.get("/v1/adapters", headers=ADMIN).json()["data"]
    assert {(a["name"], a["model"]) for a in everything} == {("sd-ink", "tiny-sd"), ("xl-ink", "tiny-sdxl")}

    body = {"prompt": "a field", "seed": 3, **SMALL}
    r = multi.post("/v1/generate", {**body, "model": "tiny-sdxl", "loras": [{"name": "sd-ink"}]})
    expect_error(r, 422, "adapter_incompatible", "loras[0]")
    message = r.json()["error"]["message"]
    assert re.search(r"sd-ink@1 is for model tiny-sd \(sd1\); the request's model is tiny-sdxl \(sdxl\)", message)
    plain = multi.post("/v1/generate", {**body, "model": "tiny-sdxl"}, headers={"Accept": "image/png"})
    styled = multi.post(
        "/v1/generate", {**body, "model": "tiny-sdxl", "loras": [{"name": "xl-ink"}]}, headers={"Accept": "image/png"}
    )
    assert plain.status_code == styled.status_code == 200 and plain.content != styled.content


def test_metrics_carry_the_model(multi, cluster):
    multi.post("/v1/generate", {"prompt": "a field", "model": "tiny-sdxl", **SMALL})

    def series() -> set[str]:
        text = requests.get(cluster.metrics_url, timeout=30).text
        return {m for m in re.findall(r'ray_lorafleet_images_total\{[^}]*model="([^"]+)"', text)}

    assert wait_until(lambda: {"tiny-sd", "tiny-sdxl"} <= series() and series(), "images by model", timeout_s=60)
    text = requests.get(cluster.metrics_url, timeout=30).text
    assert re.search(r'ray_lorafleet_step_latency_ms_count\{[^}]*model="tiny-sdxl"', text)
