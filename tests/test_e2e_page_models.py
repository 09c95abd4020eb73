"""The browser page of an app that serves two base models (``multi_app`` in conftest.py, under ``/multi``).

The page offers a model picker; the chosen model's config (from the page's JSON block) lays out the form:
sizes and their bounds, its schedulers, its family in the line under the title, and only its adapters in
the style picker. Every request the page sends names the model, and the image that comes back is the
one that model gives for that request. tiny-sdxl scales from zero, so its first image waits for replicas
to start; the waits below poll with deadlines that only turn a hang into a failure.
"""

from __future__ import annotations

import json
import re

import pytest
import requests

from conftest import ADMIN_TOKEN, free_cpus_held
from conftest import multi_running as running
from page_helpers import artifacts_dir, by_id, fill, wait

pytestmark = pytest.mark.e2e

SD, XL = "tiny-sd", "tiny-sdxl"
SD_STYLE, XL_STYLE = "page-sd-style", "page-xl-style"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SIDES = ("width", "height")
COLD_START_S = 600  # a replica of each of tiny-sdxl's three stages starting on a busy 2-core machine


@pytest.fixture(scope="module")
def styles(multi_app, tiny_dir, tiny_sdxl_dir, tmp_path_factory):
    """One adapter per base model, registered through the two-model app's admin API."""
    from lora_registry.base_model import base_model_spec_from_dir

    from lora_helpers import write_kohya_sdxl_file
    from registry_helpers import small_lora_bytes

    def register(name: str, data: bytes, model: str) -> dict:
        r = requests.post(
            multi_app.url + "/v1/adapters",
            files={"file": (f"{name}.safetensors", data)},
            data={"name": name, "model": model, "description": f"A style for {model}"},
            headers=ADMIN,
            timeout=120,
        )
        assert r.status_code == 201 and r.json()["model"] == model, r.text
        return r.json()

    xl_file = write_kohya_sdxl_file(
        base_model_spec_from_dir(tiny_sdxl_dir), tmp_path_factory.mktemp("page-xl") / "xl.safetensors", seed=12
    )
    return {
        SD: register(SD_STYLE, small_lora_bytes(base_model_spec_from_dir(tiny_dir), seed=11), SD),
        XL: register(XL_STYLE, xl_file.read_bytes(), XL),
    }


def server_config(url: str) -> dict:
    html = requests.get(url + "/", timeout=30).text
    return json.loads(re.search(r'<script type="application/json" id="config">(.*?)</script>', html).group(1))


def adapters_for(multi_app, model: str) -> list[str]:
    """The names /sdapi/v1/loras lists for ``model``, in its order (other tests may have registered more)."""
    entries = multi_app.get("/sdapi/v1/loras").json()
    return [e["name"] for e in entries if e["model"] == model]


def options(driver, select_id: str) -> list[list[str]]:
    """[value, text] of each option of a select, read in one script call (the page replaces them)."""
    return driver.execute_script(
        "return [...document.getElementById(arguments[0]).options].map(o => [o.value, o.text])", select_id
    )


def size_fields(driver) -> dict:
    return {
        name: tuple(by_id(driver, name).get_attribute(a) for a in ("value", "min", "max"))
        for name in ("width", "height")
    }


def expected_sizes(model: dict) -> dict:
    sizes = (str(model["default_side"]), str(model["min_side"]), str(model["max_side"]))
    return {"width": sizes, "height": sizes}


def open_page(driver, url: str, style: str):
    """Load the page and wait until the style picker lists ``style`` (the list came from /sdapi/v1/loras)."""
    driver.get(url + "/")
    wait(
        driver,
        lambda d: style in [value for value, _ in options(d, "adapter-pick")],
        30,
        f"the style picker never listed {style}",
    )
    # Record what the page POSTs and every text of the progress line.
    driver.execute_script(
        """
        window.sent = [];
        const realFetch = window.fetch;
        window.fetch = (url, init) => {
          if (init && init.method === "POST") window.sent.push({url, body: JSON.parse(init.body)});
          return realFetch(url, init);
        };
        window.statuses = [];
        const line = document.getElementById("job-status");
        new MutationObserver(() => window.statuses.push(line.textContent))
          .observe(line, {childList: true, characterData: true, subtree: true});
        """
    )


def pick_model(driver, name: str):
    from selenium.webdriver.support.ui import Select

    Select(by_id(driver, "model")).select_by_value(name)


def test_the_picker_lays_the_form_out_for_the_chosen_model(multi_app, browser, styles):
    from selenium.webdriver.common.by import By

    driver = browser
    config = server_config(multi_app.url)
    models = {m["model"]: m for m in config["models"]}
    assert [m["model"] for m in config["models"]] == [SD, XL] and config["model"] == SD
    # What the form must change between the two (their sizes are equal: see the next test).
    assert (models[SD]["family"], models[XL]["family"]) == ("sd1", "sdxl")
    assert models[SD]["schedulers"] != models[XL]["schedulers"]

    open_page(driver, multi_app.url, SD_STYLE)
    assert by_id(driver, "model-field").is_displayed()
    assert driver.find_element(By.CSS_SELECTOR, "label[for=model]").text == "Model"
    assert options(driver, "model") == [[SD, f"{SD} (SD1.x)"], [XL, f"{XL} (SDXL)"]]

    def assert_laid_out_for(name: str, family: str, default_scheduler: str):
        assert by_id(driver, "model").get_attribute("value") == name
        assert by_id(driver, "model-line").text.startswith(f"Model: {name} ({family}, native ")
        assert size_fields(driver) == expected_sizes(models[name])
        schedulers = options(driver, "scheduler")
        assert [v for v, _ in schedulers] == [s["value"] for s in models[name]["schedulers"]]
        assert [default_scheduler + " (the model's own)"] == [t for v, t in schedulers if v == "default"]
        # Only this model's styles: every one /sdapi/v1/loras lists for it, and none of the other's.
        assert options(driver, "adapter-pick")[1:] == [[n, n] for n in adapters_for(multi_app, name)]

    assert_laid_out_for(SD, "SD1.x", "PLMS")
    assert XL_STYLE not in [v for v, _ in options(driver, "adapter-pick")]

    # A style chosen for tiny-sd cannot go with tiny-sdxl: switching drops it, and says so.
    from selenium.webdriver.support.ui import Select

    Select(by_id(driver, "adapter-pick")).select_by_value(SD_STYLE)
    by_id(driver, "adapter-add").click()
    assert len(driver.find_elements(By.CSS_SELECTOR, "#adapter-list li")) == 1
    Select(by_id(driver, "scheduler")).select_by_value("ddim")

    pick_model(driver, XL)
    assert_laid_out_for(XL, "SDXL", "Default")
    assert SD_STYLE not in [v for v, _ in options(driver, "adapter-pick")]
    assert driver.find_elements(By.CSS_SELECTOR, "#adapter-list li") == []
    assert by_id(driver, "adapter-info").text == f"Removed {SD_STYLE}: not for {XL}."
    assert by_id(driver, "scheduler").get_attribute("value") == "ddim"  # both models offer it

    pick_model(driver, SD)
    assert_laid_out_for(SD, "SD1.x", "PLMS")
    driver.save_screenshot(str(artifacts_dir() / "page-models.png"))


def test_sizes_follow_the_chosen_model(multi_app, browser, styles):
    """The two tiny models share their native and largest sides, so the page's copy of tiny-sdxl's config
    is given the real SDXL ones (1024 native, 2048 at most) before it is picked: the form must read the
    chosen model's config, not keep the first one's."""
    driver = browser
    open_page(driver, multi_app.url, SD_STYLE)
    sd = server_config(multi_app.url)["models"][0]
    driver.execute_script(
        "Object.assign(config.models.find(m => m.model === arguments[0]), {default_side: 1024, max_side: 2048})", XL
    )
    xl = {**sd, "default_side": 1024, "max_side": 2048}
    assert size_fields(driver) == expected_sizes(sd)

    pick_model(driver, XL)  # untouched sizes become the new model's native side
    assert size_fields(driver) == expected_sizes(xl)
    pick_model(driver, SD)
    assert size_fields(driver) == expected_sizes(sd)

    fill(driver, "width", 640)  # a size the person typed stays, within the new model's bounds
    pick_model(driver, XL)
    assert by_id(driver, "width").get_attribute("value") == "640"
    assert by_id(driver, "height").get_attribute("value") == "1024"
    fill(driver, "width", 1536)
    pick_model(driver, SD)
    assert by_id(driver, "width").get_attribute("value") == str(sd["max_side"])
    assert by_id(driver, "height").get_attribute("value") == str(sd["default_side"])


def test_an_image_from_tiny_sdxl_with_its_style(multi_app, browser, styles):
    """Picked on the page, tiny-sdxl makes the image: the job is for it (the page shows it starting from
    zero), and the image equals what /v1/generate gives for tiny-sdxl with the same settings."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser
    open_page(driver, multi_app.url, SD_STYLE)
    pick_model(driver, XL)
    fill(driver, "prompt", "a harbour at night")
    for element_id, value in (("seed", 77), ("steps", 4), ("width", 64), ("height", 64)):
        fill(driver, element_id, value)
    Select(by_id(driver, "adapter-pick")).select_by_value(XL_STYLE)
    assert by_id(driver, "adapter-info").text == f"A style for {XL} Version {styles[XL]['version']}."
    by_id(driver, "adapter-add").click()
    fill(driver, f"scale-{XL_STYLE}", "0.7")

    # tiny-sdxl at zero, and kept there (every free CPU held, as test_e2e_multi_model does) until the page
    # has shown the job waiting for it to start.
    wait_s = 180
    wait(driver, lambda _: running("Denoiser-tiny-sdxl") == 0, wait_s, "tiny-sdxl never went back to zero")

    with free_cpus_held():
        by_id(driver, "submit").click()
        wait(
            driver,
            lambda d: any(s.startswith(f"Starting {XL}") for s in d.execute_script("return window.statuses")),
            message="the page never showed tiny-sdxl starting",
        )

    [sent] = driver.execute_script("return window.sent")
    assert sent["url"] == "/multi/v1/jobs"
    body = sent["body"]
    assert body["model"] == XL and body["loras"] == [{"name": XL_STYLE, "scale": 0.7}]
    image = wait(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery figure img"),
        COLD_START_S,
        "no image reached the gallery",
    )[0]
    caption = driver.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
    assert XL in caption and "Seed 77" in caption and f"{XL_STYLE}@{styles[XL]['version']} ×0.7" in caption
    assert by_id(driver, "job-status").text == "Done."
    assert not by_id(driver, "form-error").is_displayed()

    request = {
        "prompt": "a harbour at night",
        "negative_prompt": "",
        "seed": 77,
        "steps": 4,
        "width": 64,
        "height": 64,
        "loras": [{"name": XL_STYLE, "scale": 0.7}],
    }
    native = multi_app.post("/v1/generate", {**request, "model": XL})
    assert native.status_code == 200 and native.json()["model"] == XL, native.text
    assert image.get_attribute("src") == "data:image/png;base64," + native.json()["images"][0]["b64"]
    # The comparison tells models and styles apart: tiny-sd, or tiny-sdxl without the style, give others.
    for other in ({**request, "model": SD, "loras": []}, {**request, "model": XL, "loras": []}):
        r = multi_app.post("/v1/generate", other)
        assert r.status_code == 200 and r.json()["images"][0]["b64"] != native.json()["images"][0]["b64"], r.text

    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(r.startswith(multi_app.url.removesuffix("/multi")) or r.startswith("data:") for r in resources)
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe
    driver.save_screenshot(str(artifacts_dir() / "page-models-xl.png"))


def test_one_model_has_no_picker(cluster, browser):
    """The session's one-model app: no picker; the line under the title names the model, and requests name it."""
    driver = browser
    driver.get(cluster.url + "/")
    wait(driver, lambda d: options(d, "adapter-pick")[0][1] != "Loading…", 30, "the style list never loaded")
    assert not by_id(driver, "model-field").is_displayed()
    assert by_id(driver, "model-line").text.startswith("Model: tiny-sd (SD1.x, native 256×256).")
    assert options(driver, "model") == [["tiny-sd", "tiny-sd (SD1.x)"]]
